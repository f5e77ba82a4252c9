"""Checkpoint files: bitwise round trips, atomic writes, clear errors on bad files."""

import pytest
import torch

from ldmkit.config import load_config
from ldmkit.ldm.build import LDMParts, build_autoencoder, build_conditioner, build_schedule, build_unet
from ldmkit.ldm.checkpoint import CheckpointError, load_checkpoint, load_state, save_checkpoint, save_state
from ldmkit.training.ema import EMA


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def test_tensors_and_meta_round_trip_bitwise(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).double()}
    path = save_checkpoint(tmp_path / "x.safetensors", tensors, {"kind": "test", "nested": {"k": [1, 2.5]}})
    back, meta = load_checkpoint(path)
    assert meta == {"kind": "test", "nested": {"k": [1, 2.5]}}
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    assert not list(tmp_path.glob("*.tmp")), "the temporary file must be renamed away"


def test_training_state_round_trip_bitwise(tmp_path):
    model, opt = _model_and_optimizer()
    ema = EMA(model, 0.9)
    ema.update(model)
    gen = torch.Generator().manual_seed(7)
    torch.rand(3, generator=gen)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "ema": ema.state_dict(),
             "generator": gen.get_state(), "step": 3}
    save_state(tmp_path / "s.safetensors", state, {"kind": "t"})
    back, meta = load_state(tmp_path / "s.safetensors")
    assert meta == {"kind": "t"} and back["step"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(back["model"][k], v)
    o = opt.state_dict()
    assert back["optimizer"]["param_groups"] == o["param_groups"]
    for i, st in o["state"].items():
        for k, v in st.items():
            assert torch.equal(back["optimizer"]["state"][i][k], v)
    # a restored optimizer and generator continue exactly as the originals
    model2, opt2 = _model_and_optimizer()
    opt2.load_state_dict(back["optimizer"])
    gen2 = torch.Generator()
    gen2.set_state(back["generator"])
    assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=gen2))
    ema2 = EMA(model2, 0.5)
    ema2.load_state_dict(back["ema"])
    assert ema2.decay == 0.9 and ema2.num_updates == 1


def test_ldm_parts_state_dict_uses_compvis_prefixes():
    cfg = load_config("mnist_tiny")
    parts = LDMParts(build_unet(cfg), build_autoencoder(cfg), build_conditioner(cfg), build_schedule(cfg))
    from ldmkit.ldm.build import ldm_state_dict

    sd = ldm_state_dict(parts)
    assert "model.diffusion_model.input_blocks.0.0.weight" in sd
    assert "first_stage_model.encoder.conv_in.weight" in sd
    assert "first_stage_model.quant_conv.weight" in sd
    assert sd["cond_stage_model.embedding.weight"].shape == (11, 32)  # 10 classes + the null class
    assert sd["alphas_cumprod"].dtype == torch.float32 and sd["betas"].shape == (1000,)


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(bad)
    # a valid safetensors file truncated mid-way (a crash during a non-atomic copy)
    good = save_checkpoint(tmp_path / "good.safetensors", {"w": torch.randn(100, 100)}, {"kind": "x"})
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError):
        load_checkpoint(trunc)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="no ldmkit metadata"):
        load_checkpoint(tmp_path / "foreign.safetensors")
