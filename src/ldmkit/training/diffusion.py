"""Stage 2: train the latent diffusion model (LDM sec. 3.2-3.3) on a frozen first stage.

The autoencoder's posterior moments are computed once for the whole dataset; each step draws a fresh
latent z ~ q(z|x) from them (as LDM's `get_first_stage_encoding` does per batch), scales it, and takes a
denoising step. Class conditioning is a learned embedding read by cross-attention; a share
`cond_drop_prob` of labels is replaced by the null class so the same network also learns the
unconditional model that classifier-free guidance needs. EMA weights are what gets sampled.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from ..conditioning import kind_of
from ..conditioning.sources import ConditionSource, TokenCondition
from ..config import LDMConfig
from ..data.datasets import TaskData
from ..data.stream import ShardStream
from ..diffusion import diffusion_loss
from ..latent import LatentCodec
from ..ldm.build import LDMParts, build_conditioner, build_schedule, build_unet
from ..ldm.conditioned_unet import ConditionedUNet, is_frozen
from ..ldm.files import LDM_FILE, save_ldm
from ..models.distributions import DiagonalGaussianDistribution
from ..models.unet import UNetModel
from ..models.vq import VQModel
from .distributed import Dist, barrier, gather_objects, mean_over_ranks, micro_batches, micro_generator
from .ema import EMA
from .keeper import CheckpointKeeper
from .loop import Progress, check_finite, draw_batch, lr_at, seeded_init, set_lr
from .previews import preview_samples

STATE_FILE = "ldm_train.safetensors"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def encode_moments(codec: LatentCodec, images: Tensor, batch_size: int = 500) -> Tensor:
    """Unscaled first-stage encodings of every image, in eval mode: posterior parameters [N, 2C, h, w]
    (mean | logvar) for a KL first stage, the deterministic pre-quantisation latents [N, C, h, w] for VQ."""
    codec.eval()
    device = next(codec.autoencoder.parameters()).device
    # faster CPU convolutions for this one pass; torch's stubs lack Module.to's memory_format keyword
    codec.autoencoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    try:
        parts = [_encoding(codec, x.to(device).contiguous(memory_format=torch.channels_last)).cpu()
                 for x in images.split(batch_size)]
    finally:
        # back to the default layout; the same stub gap as above
        codec.autoencoder.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return torch.cat(parts).contiguous()


def _encoding(codec: LatentCodec, x: Tensor) -> Tensor:
    if isinstance(codec.autoencoder, VQModel):
        return codec.autoencoder.encode(x)
    return codec.posterior(x).parameters


def draw_latents(moments: Tensor, latent_channels: int, generator: torch.Generator) -> Tensor:
    """Unscaled latents from `encode_moments` output: a posterior sample (KL) or the latents themselves (VQ)."""
    if moments.shape[1] == latent_channels:
        return moments
    return DiagonalGaussianDistribution(moments).sample(generator)


def train_diffusion(
    cfg: LDMConfig,
    codec: LatentCodec,
    moments: Tensor | None,
    labels: Tensor | ConditionSource | None,
    run_dir: str | Path,
    *,
    progress: bool = True,
    conditioner: nn.Module | None = None,
    dist: Dist | None = None,
    stream: ShardStream | None = None,
) -> LDMParts:
    """Train (or resume) the denoiser on latents drawn from `moments`; writes `ldm.safetensors`.

    `labels` is a `ConditionSource` (see conditioning.sources) or, for class-conditional models, the class
    labels [N]. `conditioner` is a prebuilt cond stage (a frozen text encoder whose context the source holds).
    `dist` says which rank this process is (training.distributed.setup; None = one process on tc.device).
    With a `stream` (then `moments` is None) every micro-batch is read from the shards, encoded and given its
    conditions as it comes, as LD trains on large datasets; the stream's position goes into the checkpoints.
    """
    run_dir = Path(run_dir)
    tc = cfg.train_diffusion
    schedule = build_schedule(cfg)
    conditional = cfg.conditioning.kind != "none"
    source: ConditionSource | None
    if stream is not None:
        source = None  # made per micro-batch from what the stream carries
    elif isinstance(labels, Tensor) or labels is None:
        if conditional and cfg.conditioning.kind != "class":
            raise ValueError(f"conditioning kind {cfg.conditioning.kind!r} needs a ConditionSource, not labels")
        assert moments is not None  # without a stream the caller passes the moments (jobs.train)
        if conditional and (labels is None or len(labels) != len(moments)):
            raise ValueError("class-conditional training needs one label per image")
        null = torch.tensor(cfg.conditioning.n_classes)
        source = None if labels is None else TokenCondition(labels, null, tc.cond_drop_prob)
    else:
        source = labels
    key = cfg.conditioning.resolved_key()

    def build() -> tuple[ConditionedUNet, nn.Module | None]:
        unet = build_unet(cfg)  # the UNet first, then the conditioner: one seeded initialisation order
        cs = conditioner if conditioner is not None else build_conditioner(cfg)
        # frozen encoders stay out of the optimiser, the EMA and the training state
        return ConditionedUNet(unet, None if is_frozen(cs) else cs, key), cs

    net, cond_stage = seeded_init(tc.seed, build)
    frozen = is_frozen(cond_stage)
    d = dist if dist is not None else Dist()
    device = d.device(tc.device)
    micro, my_micros = micro_batches(tc.batch_size, tc.grad_accum, d)
    if tc.precision not in PRECISIONS:
        raise ValueError(f"unknown train_diffusion.precision {tc.precision!r}; choose one of {PRECISIONS}")
    net.to(device).train()
    codec.to(device)  # conditions that encode images (inpainting) run the first stage where the UNet runs
    if cond_stage is not None and frozen:
        cond_stage.to(device)
    ema = EMA(net, tc.ema_decay)
    # fused: one kernel for all parameters instead of a handful of small ops per tensor (~20% of a CPU step)
    # the conditioner may learn more slowly than the UNet: a small transformer at the UNet's CPU-sized rate
    # collapses to a near-constant context within a few hundred steps (cond_lr_ratio, 1 = one rate for all)
    groups = [{"params": list(net.unet.parameters()), "lr_ratio": 1.0}]
    if net.conditioner is not None:
        groups.append({"params": list(net.conditioner.parameters()), "lr_ratio": tc.cond_lr_ratio})
    opt = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
    keeper = CheckpointKeeper(run_dir / STATE_FILE, tc.keep_checkpoints)
    step, loss_avg = 0, None
    loaded = keeper.load(log=print if d.is_main else (lambda *a: None))
    if loaded is not None:
        state, meta = loaded
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        loss_avg = state.get("loss_avg", meta.get("metric"))  # older states hold it as their metric only
        if stream is not None and state.get("data"):
            stream.load_state_dict(state["data"][min(d.rank, len(state["data"]) - 1)])
    # one process: the network itself; under torchrun: DDP averages the gradients during backward
    model: nn.Module = net
    if d.distributed:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    peak_lr = tc.lr * (d.world_size if tc.scale_lr else 1)
    autocast = torch.autocast(device.type, dtype=PRECISIONS[tc.precision], enabled=tc.precision != "fp32")

    def save(metric: float | None) -> None:
        data = gather_objects(stream.state_dict(), d) if stream is not None else []  # every rank's position
        if d.is_main:
            keeper.save({"model": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                         "scaler": scaler.state_dict(), "step": step, "data": data, "loss_avg": bar.running},
                        {"kind": "ldm_train", "scale_factor": codec.scale_factor}, step, metric)
        barrier(d)

    bar = Progress(tc.steps, step, "diffusion", run_dir / "ldm_log.jsonl", progress and d.is_main,
                   write=d.is_main, tb_dir=run_dir / "tb" if tc.tensorboard else None, running=loss_avg)
    while step < tc.steps:
        t_step = time.perf_counter()
        lr = lr_at(step, tc.steps, peak_lr, tc.warmup_steps, tc.lr_min_ratio)
        set_lr(opt, lr)
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for a, m in enumerate(my_micros):
            gen = micro_generator(tc.seed, step, m)  # this micro-batch's data, latents and noise
            if stream is None:
                assert moments is not None  # without a stream the caller passes the moments (jobs.train)
                idx = draw_batch(len(moments), micro, gen)
                z = codec.scale(draw_latents(moments[idx], codec.latent_channels, gen)).to(device)
            else:  # the next micro-batch of the shards, encoded now, its conditions made from what it carries
                images, labels_b, captions = stream.take(micro)
                z = codec.scale(draw_latents(encode_moments(codec, images), codec.latent_channels, gen)).to(device)
                source = kind_of(cfg).training_source(cfg, TaskData(images, labels=labels_b, captions=captions),
                                                      codec, cond_stage if frozen else None)
                idx = torch.arange(micro)
            cond = None if source is None else {k: v.to(device) for k, v in source.batch(idx, gen).items()}
            # DDP all-reduces on the last micro-batch's backward only (model is DDP exactly when d.distributed)
            sync = (model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and a < len(my_micros) - 1
                    else contextlib.nullcontext())
            with sync:
                with autocast:
                    loss = diffusion_loss(model, z, schedule, cond=cond, generator=gen,
                                          parameterization=cfg.parameterization, loss_type=tc.loss_type,
                                          weighting=tc.weighting) / len(my_micros)
                scaler.scale(loss).backward()
            total += loss.detach().float()
        total = mean_over_ranks(total, d)  # every rank sees the same value: a NaN anywhere stops them all
        check_finite(total, "diffusion", step, keeper.path)
        scaler.unscale_(opt)
        grad_norm = nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        scaler.step(opt)
        scaler.update()
        ema.update(net)
        step += 1
        bar.update(step, total.item(), lr, grad_norm=float(grad_norm),
                   images_per_s=tc.batch_size / (time.perf_counter() - t_step))
        if tc.sample_every and (step % tc.sample_every == 0 or step == tc.steps) and d.is_main:
            shape = codec.latent_shape(cfg.data.resolution)
            n_data = micro if moments is None else len(moments)
            grid = preview_samples(ema.model, codec, schedule, cfg.parameterization, source, n_data, shape)
            bar.image("samples", grid, step, run_dir / "samples" / f"step{step:08d}.png")
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            save(bar.running)
    bar.close()
    best = cast(ConditionedUNet, ema.model)  # EMA holds a deep copy of net, which mypy can't follow
    unet = cast(UNetModel, best.unet)  # build() wraps build_unet's UNetModel; ConditionedUNet types it nn.Module
    parts = LDMParts(unet, codec.autoencoder, cond_stage if frozen else best.conditioner, schedule)
    if d.is_main:
        save_ldm(run_dir / LDM_FILE, parts, cfg, codec.scale_factor)
    barrier(d)
    return parts
