"""Stage 1: train the perceptual-compression autoencoder (LDM sec. 3.1).

For now the loss is reconstruction + a small KL pull towards N(0, I) (LDM's "KL-reg.", kl_weight 1e-6),
in the reference's normalisation: summed over pixels and latent elements, averaged over the batch.
The perceptual and patch-GAN terms arrive with the full stage-1 work.

Resuming is rerunning the same command: the loop reloads `autoencoder_train.safetensors` from the run
directory and continues from its step with the same data order.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..config import LDMConfig, from_dict, to_dict
from ..models.autoencoder_kl import AutoencoderConfig, AutoencoderKL
from .build import build_autoencoder, load_strict
from .checkpoint import load_checkpoint, load_state, save_checkpoint, save_state
from .loop import Progress, check_finite, draw_batch, lr_at, seeded_init, set_lr

STATE_FILE = "autoencoder_train.safetensors"
WEIGHTS_FILE = "autoencoder.safetensors"


def autoencoder_loss(ae: AutoencoderKL, x: Tensor, kl_weight: float, pixel_loss: str,
                     generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
    """sum |x - x_rec| / B  (+ sum (x - x_rec)^2 / B)  + kl_weight * KL(q(z|x) || N(0,I)) / B."""
    recon, posterior = ae(x, sample_posterior=True, generator=generator)
    b = x.shape[0]
    rec = (x - recon).abs().sum() / b
    if pixel_loss == "l1+l2":
        rec = rec + ((x - recon) ** 2).sum() / b
    elif pixel_loss != "l1":
        raise ValueError(f"unknown pixel_loss {pixel_loss!r}; choose 'l1' or 'l1+l2'")
    kl = posterior.kl().sum() / b
    return rec + kl_weight * kl, {"rec": rec.item(), "kl": kl.item()}


def train_autoencoder(cfg: LDMConfig, images: Tensor, run_dir: str | Path, *, progress: bool = True) -> AutoencoderKL:
    """Train (or resume, or reload when finished) the autoencoder on `images` [N, C, H, W] in [-1, 1]."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train_autoencoder
    final = run_dir / WEIGHTS_FILE
    if final.exists():
        return load_autoencoder(final)
    if images.ndim != 4 or images.shape[1] != cfg.autoencoder.in_channels:
        raise ValueError(f"expected images [N, {cfg.autoencoder.in_channels}, H, W], got {tuple(images.shape)}")

    ae = seeded_init(tc.seed, lambda: build_autoencoder(cfg)).train()
    opt = torch.optim.Adam(ae.parameters(), lr=tc.lr, betas=(0.9, 0.99), fused=True)
    gen = torch.Generator().manual_seed(tc.seed)
    state_path = run_dir / STATE_FILE
    step = 0
    if state_path.exists():
        state, _ = load_state(state_path)
        ae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step = int(state["step"])

    def save() -> None:
        save_state(state_path, {"model": ae.state_dict(), "optimizer": opt.state_dict(),
                                "generator": gen.get_state(), "step": step}, {"kind": "autoencoder_train"})

    bar = Progress(tc.steps, step, "autoencoder", run_dir / "autoencoder_log.jsonl", progress)
    while step < tc.steps:
        lr = lr_at(step, tc.steps, tc.lr, tc.warmup_steps, tc.lr_min_ratio)
        set_lr(opt, lr)
        x = images[draw_batch(len(images), tc.batch_size, gen)]
        loss, parts = autoencoder_loss(ae, x, tc.kl_weight, tc.pixel_loss, gen)
        check_finite(loss, "autoencoder", step, state_path)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(step, loss.item(), lr, **parts)
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            save()
    bar.close()
    ae.eval()
    save_checkpoint(final, ae.state_dict(), {"kind": "autoencoder_kl", "autoencoder": to_dict(cfg.autoencoder)})
    return ae


def load_autoencoder(path: str | Path) -> AutoencoderKL:
    """Load an autoencoder written by `train_autoencoder` (config from the file's metadata)."""
    tensors, meta = load_checkpoint(path)
    if meta.get("kind") != "autoencoder_kl":
        raise ValueError(f"{path} is not an ldmkit autoencoder checkpoint (kind {meta.get('kind')!r})")
    ae = AutoencoderKL(from_dict(AutoencoderConfig, meta["autoencoder"]))
    load_strict(ae, tensors, "autoencoder")
    return ae.eval()
