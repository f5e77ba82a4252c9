"""UNetModel against the CompVis / Stability-AI reference fixtures, plus config checks and a backward pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.models.unet import UNetConfig, UNetModel

TOL = 1e-5
UNET_FIXTURES = ["unet_sd1_conv", "unet_sd2_linear", "unet_sd2_linear_heads2", "unet_classcond_attnblock"]
HOOKED = ["time_embed", *(f"input_blocks.{i}" for i in range(4)), "middle_block"]


# conftest.one_thread; reference: reads tests/fixtures/reference (conftest.reference_dir)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.reference]


def _sidecar(reference_dir: Path, name: str) -> dict:
    return json.loads((reference_dir / "parity" / f"{name}.json").read_text())


def _load_weights(reference_dir: Path, name: str) -> dict[str, torch.Tensor]:
    parity = reference_dir / "parity"
    if name == "unet_sd2_linear_heads2":
        # No own weights file: unet_sd1_conv weights with the 1x1-conv projections reshaped to Linear.
        weights = load_file(parity / "unet_sd1_conv.weights.safetensors")
        return {
            k: v.reshape(v.shape[0], v.shape[1]) if k.endswith(("proj_in.weight", "proj_out.weight")) else v
            for k, v in weights.items()
        }
    return load_file(parity / f"{name}.weights.safetensors")


def _build(reference_dir: Path, name: str) -> UNetModel:
    model = UNetModel(UNetConfig(**_sidecar(reference_dir, name)["constructor_kwargs"])).eval()
    model.load_state_dict(_load_weights(reference_dir, name), strict=True)
    return model


def _load_io(reference_dir: Path, name: str) -> dict[str, torch.Tensor]:
    # Clone: load_file tensors can sit at unaligned offsets, which changes float32 kernel results (README).
    return {k: v.clone() for k, v in load_file(reference_dir / "parity" / f"{name}.io.safetensors").items()}


@pytest.mark.parametrize("name", UNET_FIXTURES)
def test_unet_matches_reference(reference_dir: Path, name: str) -> None:
    model = _build(reference_dir, name)
    io = _load_io(reference_dir, name)

    captured: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(sub).register_forward_hook(
            lambda _m, _i, out, sub=sub: captured.__setitem__(sub, out.detach().clone())
        )
        for sub in HOOKED
    ]
    with torch.no_grad():
        out = model(io["input.x"], io["input.timesteps"], io.get("input.context"), io.get("input.y"))
    for h in handles:
        h.remove()

    errors = {"output": (out - io["output"]).abs().max().item()}
    for sub in HOOKED:
        key = f"intermediate.{sub}"
        if key in io:
            assert captured[sub].shape == io[key].shape, key
            errors[key] = (captured[sub] - io[key]).abs().max().item()
    print(f"{name}: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    assert out.shape == io["output"].shape
    assert all(err <= TOL for err in errors.values()), errors


@pytest.mark.parametrize("name", ["unet_sd1_conv", "unet_sd2_linear", "unet_classcond_attnblock"])
def test_state_dict_keys_in_reference_order(reference_dir: Path, name: str) -> None:
    sidecar = _sidecar(reference_dir, name)
    expected = sidecar["files"][f"{name}.weights.safetensors"]["keys"]
    model = UNetModel(UNetConfig(**sidecar["constructor_kwargs"]))
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)
    assert got == expected


UNET_MANIFESTS = [
    "sd_v1",
    "sd_v2_v",
    "ldm_cin256_v2",
    "ldm_celebahq_vq4",
    "ldm_txt2img_1p4B",
    "ldm_bsr_sr",
    "ldm_layout2img_openimages256",
]


@pytest.mark.parametrize("manifest", UNET_MANIFESTS)
def test_full_size_keys_match_manifest(reference_dir: Path, manifest: str) -> None:
    """Full-size configs (built on the meta device, no memory) give exactly the checkpoint's UNet keys."""
    data = json.loads((reference_dir / "manifests" / f"{manifest}.json").read_text())
    kwargs = data["config"]["params"]["unet_config"]["params"]
    prefix = "model.diffusion_model."
    expected = {k[len(prefix) :]: v for k, v in data["keys"].items() if k.startswith(prefix)}
    with torch.device("meta"):
        model = UNetModel(UNetConfig(**kwargs))
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == expected


# ----------------------------------------------------------------------------------------------------------
# Config and input validation.

TINY = dict(
    image_size=8,
    in_channels=4,
    model_channels=32,
    out_channels=4,
    num_res_blocks=1,
    attention_resolutions=[2],
    channel_mult=[1, 2],
    num_heads=2,
)


def test_y_without_num_classes_raises() -> None:
    model = UNetModel(UNetConfig(**TINY)).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="num_classes"):
        model(x, t, y=torch.tensor([0, 1]))


def test_missing_y_for_class_conditional_raises() -> None:
    model = UNetModel(UNetConfig(**TINY, num_classes=10)).eval()
    with pytest.raises(ValueError, match="class-conditional"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]))


def test_context_without_cross_attention_raises() -> None:
    model = UNetModel(UNetConfig(**TINY)).eval()
    with pytest.raises(ValueError, match="cross-attention"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), context=torch.randn(2, 3, 16))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(num_heads=-1), "num_heads or num_head_channels"),
        (dict(use_spatial_transformer=True), "context_dim"),
        (dict(context_dim=16), "use_spatial_transformer"),
        (dict(dims=3), "dims=2"),
        (dict(num_classes="sequential"), "adm_in_channels"),
        (dict(num_classes="bogus"), "num_classes"),
        (dict(num_res_blocks=[1, 1, 1]), "num_res_blocks"),
        (dict(num_attention_blocks=[2, 2]), "num_attention_blocks"),
        (dict(disable_self_attentions=[True]), "disable_self_attentions"),
        (dict(use_fp16=True, use_bf16=True), "mutually exclusive"),
    ],
)
def test_inconsistent_configs_raise(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNetConfig(**{**TINY, **overrides})


def test_sequential_label_embedding_keys_and_forward() -> None:
    """SD 2.x upscaler style ``num_classes="sequential"``: label_emb.0.{0,2} Linears on a y vector."""
    model = UNetModel(UNetConfig(**TINY, num_classes="sequential", adm_in_channels=12)).eval()
    keys = [k for k in model.state_dict() if k.startswith("label_emb")]
    assert keys == [f"label_emb.0.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    assert model.label_emb[0][0].weight.shape == (128, 12)
    with torch.no_grad():
        out = model(torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), y=torch.randn(2, 12))
    assert out.shape == (2, 4, 8, 8)


def test_id_predictor_head() -> None:
    model = UNetModel(UNetConfig(**TINY, n_embed=16)).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 4, 8, 8), torch.tensor(7))
    assert logits.shape == (2, 16, 8, 8)


# ----------------------------------------------------------------------------------------------------------
# Training: gradients with activation checkpointing.

BACKWARD_CONFIGS = {
    "transformer_classcond": dict(
        TINY,
        attention_resolutions=[1, 2],
        num_classes=5,
        use_spatial_transformer=True,
        context_dim=16,
        transformer_depth=2,
        use_scale_shift_norm=True,
        resblock_updown=True,
        legacy=False,
        disable_self_attentions=[True, False],
        use_linear_in_transformer=True,
    ),
    "attnblock_new_order": dict(
        TINY,
        num_heads=-1,
        num_head_channels=16,
        use_new_attention_order=True,
        num_res_blocks=[1, 2],
    ),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    # Default init leaves the zero-initialised output convs at 0, which would zero most gradients.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("variant", sorted(BACKWARD_CONFIGS))
def test_backward_reaches_every_parameter_with_checkpointing(variant: str) -> None:
    kwargs = BACKWARD_CONFIGS[variant]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 600])
    extra = {}
    if kwargs.get("use_spatial_transformer"):
        extra = dict(context=torch.randn(2, 3, 16, generator=gen), y=torch.tensor([0, 4]))

    grads, runs = {}, {}
    for use_checkpoint in (True, False):
        torch.manual_seed(0)
        model = UNetModel(UNetConfig(**kwargs, use_checkpoint=use_checkpoint)).train()
        _randomise(model, seed=3)
        # Count forward runs of one ResBlock's first layers: checkpointing re-runs them during backward.
        runs[use_checkpoint] = 0
        model.middle_block[0].in_layers.register_forward_hook(
            lambda *_, key=use_checkpoint: runs.__setitem__(key, runs[key] + 1)
        )
        model(x, t, **extra).square().mean().backward()
        grads[use_checkpoint] = {n: p.grad for n, p in model.named_parameters()}

    assert runs == {True: 2, False: 1}

    for name, g in grads[True].items():
        assert g is not None, f"no gradient reached {name}"
        assert torch.isfinite(g).all() and g.abs().sum() > 0, f"zero or non-finite gradient at {name}"
        torch.testing.assert_close(g, grads[False][name], rtol=1e-4, atol=1e-6, msg=name)


def test_cross_attention_mask_equals_dropping_keys() -> None:
    from ldmkit.nn.attention import CrossAttention

    torch.manual_seed(0)
    attn = CrossAttention(query_dim=8, context_dim=6, heads=2, dim_head=4).eval()
    x, ctx = torch.randn(1, 5, 8), torch.randn(1, 4, 6)
    mask = torch.tensor([[True, False, True, False]])
    with torch.no_grad():
        masked = attn(x, ctx, mask=mask)
        dropped = attn(x, ctx[:, mask[0]])
    torch.testing.assert_close(masked, dropped)
