"""Original CompVis / Stable Diffusion checkpoints: key manifests, presets, detection, strict loading, safety.

Full-size synthetic checkpoints are written as pickles of stride-0 tensors (every key at its manifest shape,
a few hundred kB on disk) and verified with `check_only` (modules on the meta device); real loads run on
the smaller models and on tiny configs.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import reference_folder
from ldmkit.config import load_config, load_first_stage_config
from ldmkit.interop.ckpt_reader import CheckpointReadError, UnsafeCheckpointError, read_checkpoint
from ldmkit.interop.compvis import CheckpointMismatchError
from ldmkit.interop.compvis_config import ConfigTranslationError, ldm_config_from_compvis, read_compvis_yaml
from ldmkit.interop.loader import load_first_stage_checkpoint, load_ldm_checkpoint
from ldmkit.ldm.build import (
    LDMParts,
    build_autoencoder,
    build_conditioner,
    build_schedule,
    build_unet,
    ema_name,
    ldm_state_dict,
)
from ldmkit.models.autoencoder_kl import AutoencoderKL
from ldmkit.models.vq import VQModel

pytestmark = pytest.mark.reference  # reads tests/fixtures/reference/compvis/manifests

# manifest -> the preset that must reproduce it, and what auto-detection must say
LDM_MANIFESTS = {
    "sd_v1": "sd-v1",
    "sd_v2_v": "sd-v2-v",
    "ldm_cin256_v2": "ldm-cin256-v2",
    "ldm_celebahq_vq4": "ldm-celebahq-vq4",
    "ldm_txt2img_1p4B": "ldm-txt2img-1p4B",
    "ldm_bsr_sr": "ldm-bsr-sr",
    "ldm_layout2img_openimages256": "ldm-layout2img-openimages256",
}
FIRST_STAGE_MANIFESTS = {"first_stage_kl_f8": "kl-f8", "first_stage_vq_f4": "vq-f4"}


def manifest(name: str) -> dict:
    return json.loads((reference_folder("compvis") / "manifests" / f"{name}.json").read_text())


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def preset_state_shapes(cfg, ema: bool) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        parts = LDMParts(build_unet(cfg), build_autoencoder(cfg), build_conditioner(cfg), None)  # type: ignore[arg-type]
    parts.schedule = build_schedule(cfg)
    if ema:
        parts.ema_unet = parts.unet
    return shapes(ldm_state_dict(parts))


def manifest_keys(m: dict, ema: bool = False) -> dict[str, tuple[int, ...]]:
    keys = {k: tuple(v) for k, v in m["keys"].items()}
    if ema and "optional_ema_keys" in m:
        keys.update({k: tuple(v) for k, v in m["optional_ema_keys"]["keys"].items()})
    return keys


@pytest.mark.parametrize("name", sorted(LDM_MANIFESTS))
def test_preset_and_translated_yaml_reproduce_manifest(name: str) -> None:
    m = manifest(name)
    preset = load_config(LDM_MANIFESTS[name])
    expected = manifest_keys(m)
    assert preset_state_shapes(preset, preset.checkpoint_ema) == expected
    # the original YAML (stored in the manifest) translates to the same model
    translated = ldm_config_from_compvis(m["config"])
    assert preset_state_shapes(translated, translated.checkpoint_ema) == expected
    if m.get("optional_ema_keys"):  # SD: LitEma shadows, when the checkpoint has them
        assert preset_state_shapes(preset, True) == manifest_keys(m, ema=True)


@pytest.mark.parametrize("name", sorted(FIRST_STAGE_MANIFESTS))
def test_first_stage_presets_reproduce_manifest(name: str) -> None:
    cfg = load_first_stage_config(FIRST_STAGE_MANIFESTS[name])
    with torch.device("meta"):
        model = VQModel(cfg) if cfg.kind == "vq" else AutoencoderKL(cfg)
    assert shapes(model.state_dict()) == manifest_keys(manifest(name))


def test_every_preset_builds() -> None:
    from ldmkit.config import list_presets

    for name in list_presets():
        cfg = load_config(name)
        with torch.device("meta"):
            build_unet(cfg), build_autoencoder(cfg), build_conditioner(cfg)


# ------------------------------------------------------------------------------ synthetic full-size files


def synthetic_state(m: dict, ema: bool) -> dict[str, torch.Tensor]:
    """Every manifest key at its shape as a stride-0 view of one value (tiny on disk), real schedule buffers."""
    state: dict[str, torch.Tensor] = {}
    ints = set(m.get("dtypes_non_float32", {})) | set(m.get("optional_ema_keys", {}).get("dtypes_non_float32", {}))
    for k, shp in manifest_keys(m, ema).items():
        dt = torch.int64 if k in ints else torch.float32
        state[k] = torch.zeros((1,) * len(shp), dtype=dt).expand(shp) if shp else torch.zeros((), dtype=dt)
    if "config" in m and m["config"]["target"].endswith("LatentDiffusion"):
        state.update(build_schedule(ldm_config_from_compvis(m["config"])).buffers())
    return state


@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("name", sorted(LDM_MANIFESTS))
def test_synthetic_lightning_ckpt_detects_and_fits(tmp_path: Path, name: str, ema: bool) -> None:
    m = manifest(name)
    state = synthetic_state(m, ema)
    has_ema = any(k.startswith("model_ema.") for k in state)
    fname = {"sd_v2_v": "768-v-ema.ckpt"}.get(name, f"{name}.ckpt")
    path = tmp_path / fname
    torch.save({"state_dict": state, "global_step": 7, "epoch": 1}, path)
    loaded = load_ldm_checkpoint(path, check_only=True, use_ema=has_ema)
    assert loaded.variant.preset == LDM_MANIFESTS[name]
    assert loaded.used_ema == has_ema
    assert loaded.meta["global_step"] == 7
    if name == "sd_v2_v":
        assert loaded.config.parameterization == "v"
        # the same weights under a "512" name are the eps model, unless the caller says otherwise
        other = tmp_path / "512-base-ema.ckpt"
        os.link(path, other)
        assert load_ldm_checkpoint(other, check_only=True).config.parameterization == "eps"
        assert load_ldm_checkpoint(other, check_only=True, prediction="v").config.parameterization == "v"


@pytest.mark.parametrize("name", sorted(LDM_MANIFESTS))
def test_synthetic_safetensors_detects_and_fits(tmp_path: Path, name: str) -> None:
    # real bytes for every tensor (1-byte float8, so SD v1 is a 1 GB file), EMA shadows included where the
    # model has them; removed at the end so repeated runs do not pile up gigabytes in pytest's temp dirs
    m = manifest(name)
    state = {k: torch.zeros(v.shape, dtype=torch.float8_e4m3fn if v.is_floating_point() else v.dtype)
             for k, v in synthetic_state(m, ema=True).items()}
    state.update(build_schedule(ldm_config_from_compvis(m["config"])).buffers())
    path = tmp_path / ("768-v-ema.safetensors" if name == "sd_v2_v" else f"{name}.safetensors")
    save_file(state, str(path))
    try:
        has_ema = any(k.startswith("model_ema.") for k in state)
        loaded = load_ldm_checkpoint(path, check_only=True, use_ema=has_ema)
        assert loaded.variant.preset == LDM_MANIFESTS[name] and loaded.used_ema == has_ema
    finally:
        path.unlink()


@pytest.mark.parametrize("name", sorted(FIRST_STAGE_MANIFESTS))
def test_first_stage_file_with_loss_keys_detects(tmp_path: Path, name: str) -> None:
    m = manifest(name)
    state = synthetic_state(m, False)
    state.update({k: torch.zeros(tuple(v)) for k, v in m["loss_keys"]["keys"].items()})  # training-loss weights
    torch.save({"state_dict": state}, tmp_path / "model.ckpt")
    model, variant = load_first_stage_checkpoint(tmp_path / "model.ckpt")
    assert variant.preset == FIRST_STAGE_MANIFESTS[name]
    assert isinstance(model, VQModel if "vq" in name else AutoencoderKL)


def test_real_load_from_safetensors_puts_every_value_in_place(tmp_path: Path) -> None:
    # bsr_sr at full size (114M UNet + 55M VQ), real random values, float16 on disk as many releases are
    m = manifest("ldm_bsr_sr")
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(tuple(v), generator=g) * 0.02).half() for k, v in m["keys"].items()
             if k.startswith(("model.diffusion_model.", "first_stage_model."))}
    state.update(build_schedule(load_config("ldm-bsr-sr")).buffers())
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bsr.safetensors"))
    loaded = load_ldm_checkpoint(tmp_path / "bsr.safetensors")
    assert loaded.variant.preset == "ldm-bsr-sr" and not loaded.used_ema
    unet_sd, fs_sd = loaded.parts.unet.state_dict(), loaded.parts.autoencoder.state_dict()
    for k, v in state.items():
        if k.startswith("model.diffusion_model."):
            assert torch.equal(unet_sd[k[len("model.diffusion_model."):]], v.float()), k
        elif k.startswith("first_stage_model."):
            assert torch.equal(fs_sd[k[len("first_stage_model."):]], v.float()), k
    assert next(loaded.parts.unet.parameters()).dtype == torch.float32


# ----------------------------------------------------------------------------- tiny real models, EMA


@pytest.fixture
def tiny_cfg():
    cfg = load_config("mnist_tiny")
    return cfg


def tiny_checkpoint(cfg, ema_offset: float | None) -> tuple[dict[str, torch.Tensor], LDMParts]:
    torch.manual_seed(0)
    parts = LDMParts(build_unet(cfg), build_autoencoder(cfg), build_conditioner(cfg), build_schedule(cfg))
    if ema_offset is not None:
        parts.ema_unet = copy.deepcopy(parts.unet)
        with torch.no_grad():
            for p in parts.ema_unet.parameters():
                p.add_(ema_offset)
    return ldm_state_dict(parts), parts


def test_use_ema_loads_the_shadows(tmp_path: Path, tiny_cfg) -> None:
    state, parts = tiny_checkpoint(tiny_cfg, ema_offset=0.5)
    torch.save({"state_dict": state}, tmp_path / "tiny.ckpt")
    plain = load_ldm_checkpoint(tmp_path / "tiny.ckpt", config=tiny_cfg)
    ema = load_ldm_checkpoint(tmp_path / "tiny.ckpt", config=tiny_cfg, use_ema=True)
    for (n, p), q, e in zip(parts.unet.named_parameters(), plain.parts.unet.parameters(),
                            ema.parts.unet.parameters(), strict=True):
        assert torch.equal(q, p), n
        assert torch.equal(e, p + 0.5), n
    assert f"model_ema.{ema_name('input_blocks.0.0.weight')}" in state
    no_ema, _ = tiny_checkpoint(tiny_cfg, ema_offset=None)
    torch.save({"state_dict": no_ema}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="no EMA weights"):
        load_ldm_checkpoint(tmp_path / "plain.ckpt", config=tiny_cfg, use_ema=True)


def test_the_unet_adopts_the_files_float32_tensors_instead_of_copying_them(tmp_path: Path, tiny_cfg) -> None:
    state, parts = tiny_checkpoint(tiny_cfg, ema_offset=None)
    torch.save({"state_dict": state}, tmp_path / "tiny.ckpt")
    raw = read_checkpoint(tmp_path / "tiny.ckpt")
    loaded = load_ldm_checkpoint(tmp_path / "tiny.ckpt", config=tiny_cfg, raw=raw)
    for name, p in loaded.parts.unet.named_parameters():  # one copy of the weights in memory, not two
        assert p.data_ptr() == raw.tensors[f"model.diffusion_model.{name}"].data_ptr(), name
        assert isinstance(p, torch.nn.Parameter) and not p.is_meta
    z = torch.randn(2, tiny_cfg.unet.in_channels, tiny_cfg.unet.image_size, tiny_cfg.unet.image_size)
    steps = torch.tensor([10, 500])
    ctx = torch.randn(2, 1, tiny_cfg.unet.context_dim) if tiny_cfg.unet.context_dim else None
    with torch.no_grad():
        torch.testing.assert_close(loaded.parts.unet(z, steps, context=ctx), parts.unet.eval()(z, steps, context=ctx))


def test_broken_checkpoint_gives_a_report_and_loads_nothing(tmp_path: Path, tiny_cfg) -> None:
    state, _ = tiny_checkpoint(tiny_cfg, ema_offset=None)
    broken = dict(state)
    del broken["model.diffusion_model.out.2.weight"]
    broken["first_stage_model.encoder.conv_in.weight"] = torch.zeros(5, 5, 3, 3)
    broken["cond_stage_model.extra.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in broken.items()}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        load_ldm_checkpoint(tmp_path / "broken.safetensors", config=tiny_cfg)
    text = str(err.value)
    assert "UNet (model.diffusion_model.*)" in text and "out.2.weight" in text and "missing" in text
    assert "encoder.conv_in.weight: (5, 5, 3, 3) vs" in text
    assert "unexpected" in text and "extra.weight" in text
    assert {r.part.split(" ")[0] for r in err.value.reports} == {"UNet", "first", "cond"}
    # wrong betas: a config that does not belong to the file
    state["betas"] = state["betas"] * 2
    torch.save({"state_dict": state}, tmp_path / "betas.ckpt")
    with pytest.raises(ValueError, match="differ from the config's schedule"):
        load_ldm_checkpoint(tmp_path / "betas.ckpt", config=tiny_cfg)


# ----------------------------------------------------------------------------------------- safety


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_execution_payload_is_refused_and_never_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "cb": _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="system") as err:
        read_checkpoint(path)
    assert "Nothing in it was run" in str(err.value)
    assert not marker.exists()
    # the same through the CLI: one message, exit code 1, still nothing ran
    from ldmkit.cli.main import main

    assert main(["info", str(path)]) == 1
    assert main(["sample", "--checkpoint", str(path), "--prompt", "x", "--out", str(tmp_path / "g.png")]) == 1
    assert not marker.exists()
    # a legacy (non-zip) pickle with the payload is refused too
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"x": _Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match=r"\(posix\.system\)|\(nt\.system\)"):
        read_checkpoint(legacy)
    assert not marker.exists()
    # the CLI says ldmkit's one line for each kind of file: the globals asked for and the safe way out, no
    # warning above it and none of torch's advice to load with weights_only=False
    for bad in (path, legacy):
        capsys.readouterr()
        assert main(["info", str(bad)]) == 1
        out = capsys.readouterr()
        assert out.out == "" and len(out.err.strip().splitlines()) == 1, out.err
        assert "system" in out.err and ".safetensors" in out.err
        assert "weights_only" not in out.err and "Warning" not in out.err
    # plain pickle.dump (no torch framing) is not a checkpoint at all
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises((UnsafeCheckpointError, CheckpointReadError)):
        read_checkpoint(raw)
    assert not marker.exists()


def test_corrupt_and_unknown_files_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointReadError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(bad)
    other = tmp_path / "weights.onnx"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointReadError, match="unknown checkpoint type"):
        read_checkpoint(other)
    with pytest.raises(CheckpointReadError, match="not found"):
        read_checkpoint(tmp_path / "none.safetensors")


# ------------------------------------------------------------------------------------ YAML translation


def test_original_yaml_file_translates_and_unknown_options_are_named(tmp_path: Path) -> None:
    m = manifest("ldm_cin256_v2")
    path = tmp_path / "cin256-v2.yaml"
    path.write_text(yaml.safe_dump({"model": m["config"]}))
    cfg = read_compvis_yaml(path)
    assert cfg.conditioning.kind == "class" and cfg.conditioning.n_classes == 1000 and cfg.conditioning.null_class
    assert cfg.unet.model_channels == 192 and cfg.autoencoder.kind == "vq" and cfg.autoencoder.n_embed == 8192
    assert cfg.schedule.linear_end == 0.0195 and not cfg.checkpoint_ema
    bad = copy.deepcopy(m["config"])
    bad["params"]["unet_config"]["params"]["warp_factor"] = 9
    path.write_text(yaml.safe_dump({"model": bad}))
    with pytest.raises(ConfigTranslationError, match="warp_factor"):
        read_compvis_yaml(path)
    bad = copy.deepcopy(m["config"])
    bad["params"]["cond_stage_config"]["target"] = "my.module.Embedder"
    with pytest.raises(ConfigTranslationError, match="my.module.Embedder"):
        ldm_config_from_compvis(bad)
    # a first-stage YAML gives the autoencoder config
    fs = manifest("first_stage_vq_f4")
    path.write_text(yaml.safe_dump({"model": fs["config"]}))
    ae = read_compvis_yaml(path)
    assert ae.kind == "vq" and ae.n_embed == 8192 and ae.embed_dim == 3
