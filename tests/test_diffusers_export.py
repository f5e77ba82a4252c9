"""`ldmkit.interop.diffusers_export`: tiny random models exported, reloaded with diffusers / transformers offline,
and compared output for output with ldmkit's modules."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ldmkit.config import load_config
from ldmkit.interop.diffusers_export import (
    export_parts_to_diffusers,
    export_to_diffusers,
    scheduler_config,
    unet_to_diffusers,
    vae_to_diffusers,
)
from ldmkit.ldm.build import LDMParts, build_autoencoder, build_schedule, build_unet

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def one_thread_in_this_module() -> Iterator[None]:
    """Every test here at 1 OpenMP thread (tiny models: two threads only spin on a busy 2-core machine), and the
    previous count back for the tests that run after this module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


TINY_VAE = {
    "autoencoder.ch": 32,
    "autoencoder.ch_mult": [1, 2],
    "autoencoder.num_res_blocks": 1,
    "autoencoder.resolution": 16,
    "data.resolution": 16,
}
TINY_UNET = {
    "unet.model_channels": 32,
    "unet.channel_mult": [1, 2],
    "unet.attention_resolutions": [1],
    "unet.num_res_blocks": 1,
    "unet.context_dim": 32,
    "unet.use_checkpoint": False,
}


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Replace every parameter (zero-initialised output layers included) with small random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval()


def tiny_parts(cfg, conditioner=None, seed: int = 0) -> LDMParts:
    return LDMParts(randomize(build_unet(cfg), seed), randomize(build_autoencoder(cfg), seed + 1),
                    None if conditioner is None else randomize(conditioner, seed + 2), build_schedule(cfg))


def clip_embedder():
    from ldmkit.models.text_clip import CLIPTextConfig, FrozenCLIPEmbedder

    return FrozenCLIPEmbedder(CLIPTextConfig(width=32, layers=2, heads=2, mlp_width=64))


def openclip_embedder():
    from ldmkit.models.text_clip import FrozenOpenCLIPEmbedder, OpenCLIPTextConfig

    return FrozenOpenCLIPEmbedder(OpenCLIPTextConfig(width=32, heads=2, layers=3, embed_dim=16), layer="penultimate")


def check_unet(out: Path, unet, context_dim: int, y=None) -> None:
    theirs = diffusers.UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True).eval()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=gen)
    ctx = torch.randn(2, 7, context_dim, generator=gen)
    t = torch.tensor([3, 911])
    with torch.no_grad():
        ours = unet(x, t, ctx, y=y)
        got = theirs(x, t, encoder_hidden_states=ctx, class_labels=y).sample
    assert ours.abs().max() > 1e-2  # not a trivially zero network
    torch.testing.assert_close(got, ours, atol=1e-4, rtol=1e-4)


def check_vae(out: Path, ae) -> None:
    theirs = diffusers.AutoencoderKL.from_pretrained(out / "vae", local_files_only=True).eval()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 3, 16, 16, generator=gen)
    z = torch.randn(1, ae.config.embed_dim, 8, 8, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x).latent_dist.mean, ae.encode(x).mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(theirs.decode(z).sample, ae.decode(z), atol=1e-4, rtol=1e-4)


def check_text(out: Path, conditioner, pad_id: int) -> None:
    from safetensors import safe_open

    # The transformers 4.x layout is written whatever version is installed (transformers 5 strips the prefix).
    with safe_open(str(out / "text_encoder" / "model.safetensors"), framework="pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
    model, info = transformers.CLIPTextModel.from_pretrained(out / "text_encoder", local_files_only=True,
                                                             output_loading_info=True)
    model.eval()
    # Every weight loaded from the export: none left randomly initialised, none ignored.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys"), info
    tokenizer = transformers.CLIPTokenizer.from_pretrained(out / "tokenizer", local_files_only=True)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.pad_token_id == pad_id and tokenizer.model_max_length == 77
    ids = tokenizer(["a photo of a cat", "an astronaut riding a horse"], padding="max_length", max_length=77,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, conditioner(ids), atol=1e-5, rtol=1e-5)


def test_sd1_round_trip(tmp_path: Path) -> None:
    cfg = load_config("sd-v1", {**TINY_UNET, **TINY_VAE, "unet.num_heads": 2})
    parts = tiny_parts(cfg, clip_embedder())
    report = export_parts_to_diffusers(cfg, parts, tmp_path / "out", scale_factor=0.18215)
    out = report.out_dir
    assert report.pipeline == "StableDiffusionPipeline" and not report.notes
    unet_cfg = json.loads((out / "unet" / "config.json").read_text())
    assert unet_cfg["attention_head_dim"] == 2 and unet_cfg["use_linear_projection"] is False
    assert unet_cfg["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    assert unet_cfg["sample_size"] == 8
    check_unet(out, parts.unet, 32)
    check_vae(out, parts.autoencoder)
    check_text(out, parts.conditioner, pad_id=49407)

    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    latents = pipe("a photo of a cat", height=16, width=16, num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()

    sched = diffusers.DDIMScheduler.from_pretrained(out / "scheduler", local_files_only=True)
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.prediction_type == "epsilon"
    torch.testing.assert_close(sched.alphas_cumprod, parts.schedule.alphas_cumprod_f32, atol=1e-6, rtol=0)


def test_sd2_round_trip(tmp_path: Path) -> None:
    # num_head_channels 16: 2 heads at width 32, 4 at width 64 (diffusers: attention_head_dim [2, 4])
    cfg = load_config("sd-v2-v", {**TINY_UNET, **TINY_VAE, "unet.num_head_channels": 16})
    parts = tiny_parts(cfg, openclip_embedder(), seed=10)
    out = export_parts_to_diffusers(cfg, parts, tmp_path / "out", scale_factor=0.18215).out_dir
    unet_cfg = json.loads((out / "unet" / "config.json").read_text())
    assert unet_cfg["attention_head_dim"] == [2, 4] and unet_cfg["use_linear_projection"] is True
    check_unet(out, parts.unet, 32)
    check_vae(out, parts.autoencoder)
    te = json.loads((out / "text_encoder" / "config.json").read_text())
    assert te["num_hidden_layers"] == 2 and te["hidden_act"] == "gelu"  # penultimate of 3 blocks
    check_text(out, parts.conditioner, pad_id=0)
    sched = diffusers.DDIMScheduler.from_pretrained(out / "scheduler", local_files_only=True)
    assert sched.config.prediction_type == "v_prediction"


def test_multi_level_unet_and_vae_attention(tmp_path: Path) -> None:
    # Level 0 and 2 plain, level 1 with a depth-2 transformer whose attn1 attends to the context; unequal
    # ResBlock counts per level; a class-label embedding; a VAE with attention at the 8-pixel level.
    overrides = {
        **TINY_UNET, **TINY_VAE,
        "unet.channel_mult": [1, 2, 2], "unet.attention_resolutions": [2], "unet.num_res_blocks": [1, 2, 1],
        "unet.num_heads": 2, "unet.transformer_depth": 2, "unet.disable_self_attentions": [False, True, False],
        "unet.num_classes": 5, "autoencoder.attn_resolutions": [8],
    }
    cfg = load_config("sd-v1", overrides)
    parts = tiny_parts(cfg, seed=20)
    config, _ = unet_to_diffusers(cfg.unet, parts.unet.state_dict())
    assert config["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    assert config["up_block_types"] == ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert config["layers_per_block"] == [1, 2, 1] and config["only_cross_attention"] == [False, True, False]
    vae_config, _ = vae_to_diffusers(cfg.autoencoder, parts.autoencoder.state_dict())
    assert vae_config["down_block_types"] == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]

    cfg.conditioning.kind = "none"  # the UNet and VAE alone, no pipeline
    report = export_parts_to_diffusers(cfg, parts, tmp_path / "out", scale_factor=1.0)
    assert report.pipeline is None and not (report.out_dir / "model_index.json").exists()
    check_unet(report.out_dir, parts.unet, 32, y=torch.tensor([0, 4]))
    check_vae(report.out_dir, parts.autoencoder)


def test_export_from_run_dir(tmp_path: Path) -> None:
    from ldmkit.ldm.files import save_ldm
    from ldmkit.models.conditioners import ClassEmbedder

    cfg = load_config("mnist_tiny")
    c = cfg.conditioning
    parts = tiny_parts(cfg, ClassEmbedder(c.n_classes + 1, c.embed_dim), seed=30)
    run = tmp_path / "run"
    save_ldm(run / "ldm.safetensors", parts, cfg, 0.5)
    out = export_to_diffusers(run, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["class_embeddings.safetensors", "scheduler", "unet", "vae"]
    vae = diffusers.AutoencoderKL.from_pretrained(out / "vae", local_files_only=True)
    assert vae.config.scaling_factor == 0.5 and vae.config.latent_channels == 3
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(out / "class_embeddings.safetensors")["weight"],
                               parts.conditioner.embedding.weight)
    with pytest.raises(ValueError, match="not empty"):
        export_to_diffusers(run, out)
    assert export_to_diffusers(run, out, overwrite=True) == out
    context = parts.conditioner(torch.tensor([3, 10]))  # one-token context, label 10 = the null class
    theirs = diffusers.UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, 10, encoder_hidden_states=context).sample,
                                   parts.unet(x, torch.tensor(10), context), atol=1e-4, rtol=1e-4)


def test_scheduler_schedules() -> None:
    for kind, name in (("linear", "scaled_linear"), ("sqrt_linear", "linear"), ("cosine", None)):
        cfg = load_config("sd-v1", {"schedule.kind": kind, "parameterization": "x0"})
        config = scheduler_config(cfg)
        assert config["prediction_type"] == "sample"
        assert (config["trained_betas"] is None) == (name is not None)
        sched = diffusers.DDIMScheduler.from_config(config)
        torch.testing.assert_close(sched.alphas_cumprod, build_schedule(cfg).alphas_cumprod_f32, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"unet.use_scale_shift_norm": True}, "use_scale_shift_norm"),
        ({"unet.resblock_updown": True}, "resblock_updown"),
        ({"unet.use_spatial_transformer": False, "unet.context_dim": None}, "AttentionBlock"),
        ({"unet.channel_mult": [2, 2]}, r"channel_mult\[0\]"),
        ({"unet.num_attention_blocks": [1, 0]}, "num_attention_blocks"),
        ({"unet.num_heads": 3}, "heads"),
    ],
)
def test_unsupported_unet(override: dict, message: str) -> None:
    cfg = load_config("sd-v1", {**TINY_UNET, "unet.num_heads": 2, **override})
    unet = build_unet(cfg)
    with pytest.raises(ValueError, match=message):
        unet_to_diffusers(cfg.unet, unet.state_dict())


def test_unsupported_first_stage(tmp_path: Path) -> None:
    cfg = load_config("ldm-cin256-v2")
    with pytest.raises(ValueError, match="VQ"):
        vae_to_diffusers(cfg.autoencoder, {})
    cfg = load_config("sd-v1", {**TINY_VAE, "autoencoder.embed_dim": 3})
    with pytest.raises(ValueError, match="z_channels"):
        vae_to_diffusers(cfg.autoencoder, {})
    # weights that do not fit the config are refused, not half-converted
    cfg = load_config("sd-v1", TINY_VAE)
    state = build_autoencoder(cfg).state_dict()
    state["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="no diffusers equivalent"):
        vae_to_diffusers(cfg.autoencoder, state)


@pytest.mark.parametrize("preset", ["sd-v1", "sd-v2-v", "sd-v1-inpainting"])
def test_full_size_layouts(preset: str) -> None:
    """The real SD architectures convert to exactly diffusers' / transformers' key sets and shapes (the
    converters compare against meta-device models when the libraries are installed); no weights allocated."""
    from ldmkit.interop.diffusers_export import text_encoder_to_diffusers
    from ldmkit.ldm.build import build_conditioner

    cfg = load_config(preset)
    with torch.device("meta"):
        unet, ae, cond = build_unet(cfg), build_autoencoder(cfg), build_conditioner(cfg)
    config, state = unet_to_diffusers(cfg.unet, unet.state_dict(), sample_size=64)
    assert len(state) == len(unet.state_dict())
    assert config["block_out_channels"] == [320, 640, 1280, 1280]
    assert config["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert config["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    v2 = preset.startswith("sd-v2")
    assert config["attention_head_dim"] == ([5, 10, 20, 20] if v2 else 8)
    assert config["cross_attention_dim"] == (1024 if v2 else 768)
    assert config["in_channels"] == (9 if "inpainting" in preset else 4)
    vae_config, _ = vae_to_diffusers(cfg.autoencoder, ae.state_dict())
    assert vae_config["block_out_channels"] == [128, 256, 512, 512] and vae_config["layers_per_block"] == 2
    te_config, te_state, pad = text_encoder_to_diffusers(cond)
    assert te_config["num_hidden_layers"] == (23 if v2 else 12) and pad == ("!" if v2 else "<|endoftext|>")
    assert te_config["hidden_act"] == ("gelu" if v2 else "quick_gelu")


def test_export_original_checkpoint_and_ema(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from ldmkit.ldm.build import ldm_state_dict
    from ldmkit.ldm.files import save_ldm
    from ldmkit.models.conditioners import ClassEmbedder

    cfg = load_config("mnist_tiny")
    c = cfg.conditioning
    parts = tiny_parts(cfg, ClassEmbedder(c.n_classes + 1, c.embed_dim), seed=40)
    parts.ema_unet = randomize(build_unet(cfg), 41)
    expected = {}
    for name, unet in (("raw", parts.unet), ("ema", parts.ema_unet)):
        expected[name] = unet_to_diffusers(cfg.unet, unet.state_dict())[1]

    # An original-layout file (CompVis prefixes, no ldmkit metadata): goes through load_ldm_checkpoint.
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_state_dict(parts).items()}, str(ckpt))
    with pytest.raises(ValueError, match="scale factor"):
        export_to_diffusers(ckpt, tmp_path / "a", config=cfg)
    out = export_to_diffusers(ckpt, tmp_path / "a", config=cfg, scale_factor=0.3, use_ema=True)
    got = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in expected["ema"].items())

    # An ldmkit run file with EMA shadows: use_ema picks them, the default the trained weights.
    run = tmp_path / "run"
    save_ldm(run / "ldm.safetensors", parts, cfg, 0.5)
    for use_ema, name in ((False, "raw"), (True, "ema")):
        out = export_to_diffusers(run / "ldm.safetensors", tmp_path / name, use_ema=use_ema, dtype=torch.float16)
        got = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
        assert all(got[k].dtype == torch.float16 and torch.equal(got[k], v.half()) for k, v in expected[name].items())


@pytest.mark.parametrize(("num_classes", "y"), [("sequential", torch.randn(2, 6)), ("continuous", torch.randn(2, 1))])
def test_vector_label_embeddings(num_classes: str, y: torch.Tensor) -> None:
    extra = {"unet.adm_in_channels": 6} if num_classes == "sequential" else {}
    cfg = load_config("sd-v1", {**TINY_UNET, "unet.num_heads": 2, "unet.num_classes": num_classes, **extra})
    unet = randomize(build_unet(cfg), 50)
    config, state = unet_to_diffusers(cfg.unet, unet.state_dict())
    theirs = diffusers.UNet2DConditionModel.from_config(config).eval()
    theirs.load_state_dict(state, strict=True)
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.tensor([5, 500])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, ctx, class_labels=y).sample, unet(x, t, ctx, y=y), atol=1e-4, rtol=1e-4)


def test_vae_without_attention() -> None:
    cfg = load_config("sd-v1", {**TINY_VAE, "autoencoder.attn_type": "none"})
    ae = randomize(build_autoencoder(cfg), 60)
    config, state = vae_to_diffusers(cfg.autoencoder, ae.state_dict())
    assert config["mid_block_add_attention"] is False
    theirs = diffusers.AutoencoderKL.from_config(config).eval()
    theirs.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x).latent_dist.mean, ae.encode(x).mean, atol=1e-4, rtol=1e-4)
