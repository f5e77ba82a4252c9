"""The training system around the loops: logs (JSON lines, TensorBoard, preview grids), mixed precision,
gradient checkpointing, and configs with their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ldmkit.config import load_config
from ldmkit.diffusion import diffusion_loss
from ldmkit.jobs.train import train_ldm
from ldmkit.ldm.build import build_schedule, build_unet
from ldmkit.training.loop import seeded_init

SMALL = {"data.limit": 128, "train_autoencoder.steps": 4, "train_autoencoder.batch_size": 8,
         "train_diffusion.steps": 6, "train_diffusion.batch_size": 8}


def test_logs_scalars_grids_and_tensorboard_events(tmp_path: Path) -> None:
    tb = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    over = dict(SMALL, **{"train_diffusion.sample_every": 3, "train_autoencoder.sample_every": 4})
    run = train_ldm(load_config("mnist_tiny", over), tmp_path, progress=False, log=lambda s: None)
    last = json.loads((run / "ldm_log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 6 and last["grad_norm"] > 0 and last["images_per_s"] > 0
    samples = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert samples == ["autoencoder_step00000004.png", "step00000003.png", "step00000006.png"]
    acc = tb.EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert {"diffusion/loss", "diffusion/lr", "diffusion/grad_norm", "autoencoder/rec"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("diffusion/loss")] == [1, 6]
    assert "diffusion/samples" in acc.Tags()["images"] and "autoencoder/reconstructions" in acc.Tags()["images"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_to_finite_weights(tmp_path: Path, precision: str) -> None:
    """autocast on the CPU (where bf16 and fp16 are slow, so only a few steps): the loss is finite, the
    weights stay float32, and fp16 carries a gradient scaler in the training state."""
    from ldmkit.ldm.checkpoint import load_state

    over = dict(SMALL, **{"train_diffusion.precision": precision, "train_diffusion.steps": 3})
    run = train_ldm(load_config("mnist_tiny", over), tmp_path, progress=False, log=lambda s: None)
    state, _ = load_state(run / "ldm_train.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state["model"].values()
               if v.is_floating_point())
    if precision == "fp16":
        assert float(state["scaler"]["scale"]) > 0
    with pytest.raises(ValueError, match="unknown train_diffusion.precision"):
        train_ldm(load_config("mnist_tiny", dict(over, **{"train_diffusion.precision": "fp8"})), tmp_path / "x",
                  progress=False, log=lambda s: None)


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch) -> None:
    import ldmkit.nn.blocks as blocks

    calls = []
    real = blocks.checkpoint
    monkeypatch.setattr(blocks, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = load_config("mnist_tiny", {"unet.use_checkpoint": True})
    plain = seeded_init(0, lambda: build_unet(load_config("mnist_tiny"))).train()
    ckpt = seeded_init(0, lambda: build_unet(cfg)).train()
    schedule = build_schedule(cfg)
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(4, 1, 32, generator=torch.Generator().manual_seed(2))
    grads = []
    for net in (plain, ckpt):
        loss = diffusion_loss(net, z, schedule, cond={"context": context}, generator=torch.Generator().manual_seed(1))
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    assert calls, "use_checkpoint did not checkpoint any block"
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_grad_accum_and_device_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not divisible"):
        train_ldm(load_config("mnist_tiny", dict(SMALL, **{"train_diffusion.grad_accum": 3})), tmp_path,
                  progress=False, log=lambda s: None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            train_ldm(load_config("mnist_tiny", dict(SMALL, **{"train_autoencoder.device": "cuda"})),
                      tmp_path / "c", progress=False, log=lambda s: None)
