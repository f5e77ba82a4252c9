"""Stage 1: train the perceptual-compression autoencoder (LDM sec. 3.1, appendix G), KL- or VQ-regularised.

The objective is LD's `LPIPSWithDiscriminator` (KL) / `VQLPIPSWithDiscriminator` (VQ):
  reconstruction  |x - D(E(x))| (+ perceptual_weight * LPIPS), through the log-variance nll of the KL loss,
  regulariser     kl_weight * KL(q(z|x) || N(0, I))   or   codebook_weight * (codebook + beta * commitment),
  adversarial     a patch discriminator from `disc_start` on, weighted adaptively by the ratio of gradient
                  norms at the decoder's last layer (Esser et al. 2021, eq. 7).
Two optimisers as the reference: Adam over the autoencoder (LD leaves the KL loss's `logvar` out of it, so it
stays at logvar_init unless `learn_logvar`), Adam over the discriminator; both step on every batch once the
discriminator is on. Without LPIPS weights (none can be downloaded here) the perceptual term is left out and
the run says so once; random VGG weights are never used as if they were LPIPS.

Resuming is rerunning the same command: the loop reloads `autoencoder_train.safetensors` from the run
directory (model, loss module, both optimisers, step) and continues with the same data order: each step's
images and noise come from a generator seeded by (seed, step, rank), see training.distributed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict, cast

import torch
from torch import Tensor, nn

from ..config import FirstStageConfig, LDMConfig, to_dict
from ..data.stream import ShardStream
from ..ldm.build import build_first_stage
from ..ldm.checkpoint import save_checkpoint
from ..ldm.files import AUTOENCODER_FILE, load_autoencoder
from ..models.ae_modules import Decoder
from ..models.autoencoder_kl import AutoencoderKL
from ..models.first_stage_loss import LPIPSWithDiscriminator, VQLPIPSWithDiscriminator
from ..models.identity import IdentityFirstStage
from ..models.perceptual import LPIPS
from ..models.vq import VQModel
from .distributed import (
    Dist,
    average_gradients,
    barrier,
    broadcast_module,
    gather_objects,
    mean_over_ranks,
    micro_batches,
    micro_generator,
)
from .keeper import CheckpointKeeper
from .loop import Progress, check_finite, draw_batch, lr_at, seeded_init, set_lr
from .previews import preview_reconstructions

STATE_FILE = "autoencoder_train.safetensors"
FirstStageLoss = LPIPSWithDiscriminator | VQLPIPSWithDiscriminator


class _StepLog(TypedDict, total=False):
    """The extra scalars a step writes to the log (keyword arguments of Progress.update)."""

    rec: float
    d_loss: float
    g_loss: float
    usage: float
    perplexity: float


def build_perceptual(cfg: LDMConfig | FirstStageConfig) -> LPIPS | None:
    """LPIPS from the user's local files, or None when they are not given (the loss module then warns once
    that it trains without the perceptual term)."""
    tc = cfg.train_autoencoder
    if tc.perceptual_weight <= 0 or (tc.lpips_vgg is None and tc.lpips_lin is None):
        return None
    if tc.lpips_vgg is None or tc.lpips_lin is None:
        raise ValueError("LPIPS needs both train_autoencoder.lpips_vgg (torchvision VGG16 weights) and "
                         "train_autoencoder.lpips_lin (the lpips package's vgg.pth)")
    return LPIPS.from_files(tc.lpips_vgg, tc.lpips_lin)


def build_first_stage_loss(cfg: LDMConfig | FirstStageConfig, perceptual: LPIPS | None) -> FirstStageLoss:
    tc, ae = cfg.train_autoencoder, cfg.autoencoder
    # without a discriminator the GAN term is switched on "never"; its weights still exist, as in the reference
    disc_start = tc.disc_start if tc.disc_start is not None else tc.steps + 1
    common: dict[str, Any] = dict(
        disc_start=disc_start, disc_num_layers=tc.disc_num_layers, disc_in_channels=ae.out_ch,
        disc_factor=tc.disc_factor, disc_weight=tc.disc_weight, perceptual_weight=tc.perceptual_weight,
        disc_loss=tc.disc_loss, perceptual=perceptual, pixel_loss=tc.pixel_loss, disc_ndf=tc.disc_channels,
        generator=torch.Generator().manual_seed(tc.seed + 1),
    )
    if ae.kind == "vq":
        return VQLPIPSWithDiscriminator(codebook_weight=tc.codebook_weight, **common)
    return LPIPSWithDiscriminator(logvar_init=tc.logvar_init, kl_weight=tc.kl_weight, **common)


def _ae_parameters(ae: nn.Module, loss: FirstStageLoss, learn_logvar: bool) -> list[nn.Parameter]:
    params = list(ae.parameters())
    if learn_logvar and isinstance(loss, LPIPSWithDiscriminator):
        params.append(loss.logvar)
    return params


def first_stage_step(ae: nn.Module, loss_mod: FirstStageLoss, x: Tensor, step: int, optimizer_idx: int,
                     generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """One loss evaluation: (loss, log, reconstruction) for the autoencoder (0) or the discriminator (1)."""
    # `ae` is an AutoencoderKL or a VQModel (identity first stages are never trained): both decode with
    # ae_modules.Decoder, which nn.Module's attribute typing can't see
    last_layer = cast(Decoder, ae.decoder).conv_out.weight
    if isinstance(ae, VQModel):
        rec, qloss, info = ae(x, generator=generator)
        loss, log = loss_mod(qloss, x, rec, optimizer_idx, step, last_layer=last_layer)
        log = {**log, "train/perplexity": info.perplexity, "train/codebook_usage": info.usage}
    else:
        rec, posterior = ae(x, sample_posterior=True, generator=generator)
        loss, log = loss_mod(x, rec, posterior, optimizer_idx, step, last_layer=last_layer)
    return loss, log, rec


def train_autoencoder(cfg: LDMConfig | FirstStageConfig, images: Tensor | ShardStream, run_dir: str | Path, *,
                      progress: bool = True, dist: Dist | None = None) -> AutoencoderKL | VQModel | IdentityFirstStage:
    """Train (or resume, or reload when finished) the first stage on `images` [N, C, H, W] in [-1, 1], or on
    a `ShardStream` (read on, never held in memory; its position is saved with the checkpoints).

    Under torchrun (`dist`) each rank takes its micro-batches of every step (batch_size / (world size x
    grad_accum) images each, drawn from their own generators, see training.distributed) and the gradients of
    both optimisers are averaged over ranks. The GAN's adaptive weight is computed per micro-batch.
    """
    if cfg.autoencoder.kind == "identity":  # pixel space: nothing to train, the LDM checkpoint holds its config
        return IdentityFirstStage(cfg.autoencoder)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tc = cfg.train_autoencoder
    final = run_dir / AUTOENCODER_FILE
    if final.exists():
        return load_autoencoder(final)
    stream = images if isinstance(images, ShardStream) else None
    if not isinstance(images, ShardStream) and (images.ndim != 4 or images.shape[1] != cfg.autoencoder.in_channels):
        raise ValueError(f"expected images [N, {cfg.autoencoder.in_channels}, H, W], got {tuple(images.shape)}")

    d = dist if dist is not None else Dist()
    device = d.device(tc.device)
    micro, my_micros = micro_batches(tc.batch_size, tc.grad_accum, d)
    ae = seeded_init(tc.seed, lambda: build_first_stage(cfg.autoencoder)).to(device).train()
    loss_mod = build_first_stage_loss(cfg, build_perceptual(cfg)).to(device).train()
    opt_ae = torch.optim.Adam(_ae_parameters(ae, loss_mod, tc.learn_logvar), lr=tc.lr, betas=tc.betas, fused=True)
    opt_d = torch.optim.Adam(loss_mod.discriminator_parameters(), lr=tc.lr, betas=tc.betas)
    keeper = CheckpointKeeper(run_dir / STATE_FILE, tc.keep_checkpoints)
    state_path = keeper.path
    step, loss_avg = 0, None
    loaded = keeper.load(log=print if d.is_main else (lambda *a: None))
    if loaded is not None:
        state, meta = loaded
        ae.load_state_dict(state["model"])
        loss_mod.load_state_dict(state["loss"])
        opt_ae.load_state_dict(state["optimizer"])
        opt_d.load_state_dict(state["optimizer_disc"])
        step = int(state["step"])
        loss_avg = state.get("loss_avg", meta.get("metric"))  # older states hold it as their metric only
        if stream is not None and state.get("data"):
            stream.load_state_dict(state["data"][min(d.rank, len(state["data"]) - 1)])

    def save(metric: float | None) -> None:
        data = gather_objects(stream.state_dict(), d) if stream is not None else []  # every rank's position
        if d.is_main:
            keeper.save({"model": ae.state_dict(), "loss": loss_mod.state_dict(), "optimizer": opt_ae.state_dict(),
                         "optimizer_disc": opt_d.state_dict(), "step": step, "data": data,
                         "loss_avg": bar.running},
                        {"kind": "autoencoder_train"}, step, metric)
        barrier(d)

    disc_start = tc.disc_start if tc.disc_start is not None else tc.steps + 1
    bar = Progress(tc.steps, step, "autoencoder", run_dir / "autoencoder_log.jsonl", progress and d.is_main,
                   write=d.is_main, tb_dir=run_dir / "tb" if tc.tensorboard else None, running=loss_avg)
    ae_params = _ae_parameters(ae, loss_mod, tc.learn_logvar)
    shown = None if isinstance(images, ShardStream) else images[:8]
    while step < tc.steps:
        lr = lr_at(step, tc.steps, tc.lr * (d.world_size if tc.scale_lr else 1), tc.warmup_steps, tc.lr_min_ratio)
        set_lr(opt_ae, lr)
        set_lr(opt_d, lr)
        opt_ae.zero_grad(set_to_none=True)
        total, seen, logs = torch.zeros((), device=device), [], []
        for m in my_micros:
            gen = micro_generator(tc.seed, step, m)  # this micro-batch's images and posterior noise
            x = (images.take(micro)[0] if isinstance(images, ShardStream)
                 else images[draw_batch(len(images), micro, gen)])
            x = x.to(device)
            if shown is None:
                shown = x[:8].cpu()  # the reconstruction previews show the same images all run
            loss, log, rec = first_stage_step(ae, loss_mod, x, step, 0, gen)
            (loss / len(my_micros)).backward()
            total += loss.detach() / len(my_micros)
            seen.append((x, rec.detach()))
            logs.append(log)
        total = mean_over_ranks(total, d)
        check_finite(total, "autoencoder", step, state_path)
        average_gradients(ae_params, d)
        opt_ae.step()
        log = logs[-1]
        extra: _StepLog = {"rec": float(log["train/rec_loss"])}
        if step >= disc_start:  # the discriminator's turn on the same images (Lightning's optimizer_idx 1)
            opt_d.zero_grad(set_to_none=True)  # the generator's backward reached it too
            d_total = torch.zeros((), device=device)
            for x, rec in seen:
                d_loss, _ = loss_mod(*_disc_args(ae, x, rec, step))
                (d_loss / len(seen)).backward()
                d_total += d_loss.detach() / len(seen)
            d_total = mean_over_ranks(d_total, d)
            check_finite(d_total, "discriminator", step, state_path)
            average_gradients(list(loss_mod.discriminator_parameters()), d)
            opt_d.step()
            extra["d_loss"] = d_total.item()
            extra["g_loss"] = float(log.get("train/g_loss", 0.0))
        if "train/codebook_usage" in log:  # VQ: share of codes used in the batch, and their perplexity
            extra["usage"] = float(log["train/codebook_usage"])
            extra["perplexity"] = float(log["train/perplexity"])
        if isinstance(ae, VQModel):  # EMA statistics and dead-code restarts change the codebook off the gradient
            broadcast_module(ae.quantize, d)
        step += 1
        bar.update(step, total.item(), lr, **extra)
        if tc.sample_every and (step % tc.sample_every == 0 or step == tc.steps) and d.is_main:
            assert shown is not None  # set by this step's first micro-batch at the latest
            grid = preview_reconstructions(ae, shown)
            bar.image("reconstructions", grid, step, run_dir / "samples" / f"autoencoder_step{step:08d}.png")
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            save(bar.running)
    bar.close()
    ae.eval()
    if d.is_main:
        save_checkpoint(final, ae.state_dict(), {"kind": "autoencoder", "autoencoder": to_dict(cfg.autoencoder)})
    barrier(d)
    return ae


def _disc_args(ae: nn.Module, x: Tensor, rec: Tensor, step: int) -> tuple[Any, ...]:
    # the discriminator's loss reads only the images; the other arguments keep the reference signature
    if isinstance(ae, VQModel):
        return (torch.zeros(()), x, rec, 1, step)
    return (x, rec, None, 1, step)
