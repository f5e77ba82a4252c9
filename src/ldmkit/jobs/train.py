"""Train a latent diffusion model from a config: data -> stage 1 (autoencoder) -> stage 2 (diffusion).

Every stage leaves its result in the run directory and resumes from its last checkpoint, so rerunning
the same command continues an interrupted run and skips finished stages.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..conditioning import kind_of
from ..config import FirstStageConfig, LDMConfig, load_config, load_first_stage_run, to_dict
from ..data.datasets import TaskData, load_dataset, load_task_data
from ..data.stream import ShardStream
from ..latent import LatentCodec, estimate_scale_factor
from ..ldm.build import build_conditioner
from ..ldm.files import AUTOENCODER_FILE, LDM_FILE, load_autoencoder
from ..training.autoencoder import train_autoencoder
from ..training.diffusion import draw_latents, encode_moments, train_diffusion
from ..training.distributed import Dist, barrier, setup
from ..training.loop import draw_batch


def choose_scale_factor(cfg: LDMConfig, moments: Tensor, latent_channels: int) -> float:
    """cfg.scale_factor, or 1 / std of the first training batch's latent samples (LDM `scale_by_std`)."""
    if cfg.scale_factor is not None:
        return cfg.scale_factor
    gen = torch.Generator().manual_seed(cfg.train_diffusion.seed)
    idx = draw_batch(len(moments), cfg.train_diffusion.batch_size, gen)
    return estimate_scale_factor(draw_latents(moments[idx], latent_channels, gen))


def train_second_stage(cfg: LDMConfig, codec: LatentCodec, images: Tensor, labels: Tensor | None,
                       run_dir: Path, progress: bool = True, log: Any = print, data: TaskData | None = None,
                       dist: Dist | None = None, stream: ShardStream | None = None) -> None:
    """Encode the data once, fix the latent scale, train the denoiser (skipped when already finished).

    With a `stream` (data.stream) nothing is encoded up front: the scale comes from the first 512 samples of
    the shards and every batch is encoded as it is read.

    `data` carries the conditions of the other tasks (captions, layouts, class maps); super-resolution and
    inpainting make theirs from `images`.
    """
    if (run_dir / LDM_FILE).exists():
        return
    kind = kind_of(cfg)
    codec.to((dist or Dist()).device(cfg.train_diffusion.device))
    # a frozen pretrained encoder (MiniLM) is built once: training computes its context, the run's file keeps it
    encoder = build_conditioner(cfg) if kind.frozen_encoder else None
    if stream is not None:
        first = open_stream(cfg).take(512)[0]  # the same samples on every rank: one scale for all
        codec.scale_factor = choose_scale_factor(cfg, encode_moments(codec, first), codec.latent_channels)
        log(f"latent scale factor: {codec.scale_factor:.5f} (from the first 512 samples)")
        train_diffusion(cfg, codec, None, None, run_dir, progress=progress, conditioner=encoder, dist=dist,
                        stream=stream)
        return
    moments = encode_moments(codec, images)
    codec.scale_factor = choose_scale_factor(cfg, moments, codec.latent_channels)
    log(f"latent scale factor: {codec.scale_factor:.5f}")
    source = kind.training_source(cfg, data if data is not None else TaskData(images, labels=labels), codec, encoder)
    train_diffusion(cfg, codec, moments, source, run_dir, progress=progress, conditioner=encoder, dist=dist)


def train_ldm(config: str | Path | LDMConfig, run_dir: str | Path, *, overrides: dict[str, Any] | None = None,
              progress: bool = True, log: Any = print, dist: Dist | None = None) -> Path:
    """Both stages end to end; returns the run directory (holding ldm.safetensors).

    Under torchrun every rank runs this same call (`dist` from training.distributed.setup, which it calls
    itself when not given); rank 0 alone writes files and logs.
    """
    cfg = config if isinstance(config, LDMConfig) else load_config(config, overrides)
    d = dist if dist is not None else setup()
    log = log if d.is_main else (lambda *a: None)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.first_stage is not None:
        cfg = adopt_first_stage(cfg, run_dir, write=d.is_main)
        barrier(d)
    if d.is_main:  # the resolved config (presets, overrides, adopted stage 1) of every run
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    if cfg.data.stream:
        return _train_ldm_streamed(cfg, run_dir, d, progress, log)
    data = load_task_data(cfg)
    images, labels = data.images, data.labels
    log(f"data: {len(images)} images {tuple(images.shape[1:])}" +
        (f", {d.world_size} processes" if d.distributed else ""))
    if data.skipped is not None:
        log(f"data: skipped {data.skipped['skipped']} file(s) {data.skipped['by_reason']}")
        if d.is_main:
            (run_dir / "data_report.json").write_text(json.dumps(data.skipped, indent=2))
    # an adopted first stage is only loaded
    ae = train_autoencoder(cfg, images, run_dir, progress=progress and d.is_main, dist=d)
    conditional = cfg.conditioning.kind != "none"
    train_second_stage(cfg, LatentCodec(ae), images, labels if conditional else None, run_dir, progress, log,
                       data=data, dist=d)
    return run_dir


def open_stream(cfg: LDMConfig | FirstStageConfig, d: Dist | None = None, seed: int = 0) -> ShardStream:
    """The shards of `data.root` as this rank's stream (data.stream: true, data.name "shards")."""
    dc = cfg.data
    if dc.name != "shards" or dc.root is None:
        raise ValueError("data.stream reads webdataset shards: set data.name 'shards' and data.root to the shards")
    d = d or Dist()
    return ShardStream(dc.root, dc.resolution, dc.channels, min_size=dc.min_size, seed=seed, rank=d.rank,
                       world_size=d.world_size)


def _train_ldm_streamed(cfg: LDMConfig, run_dir: Path, d: Dist, progress: bool, log: Any) -> Path:
    """Both stages reading the shards as they train; what was skipped is reported at the end."""
    log(f"data: streaming {cfg.data.root}" + (f", {d.world_size} processes" if d.distributed else ""))
    s1 = open_stream(cfg, d, cfg.train_autoencoder.seed)
    ae = train_autoencoder(cfg, s1, run_dir, progress=progress and d.is_main, dist=d)
    s2 = open_stream(cfg, d, cfg.train_diffusion.seed)
    train_second_stage(cfg, LatentCodec(ae), torch.empty(0), None, run_dir, progress, log, dist=d, stream=s2)
    report = s1.report
    report.counts.update(s2.report.counts)
    for k, v in s2.report.examples.items():
        report.examples.setdefault(k, v)
    log(f"data: {report.summary()}")
    if d.is_main:
        (run_dir / "data_report.json").write_text(json.dumps(report.as_dict(), indent=2))
    return run_dir


def adopt_first_stage(cfg: LDMConfig, run_dir: Path, write: bool = True) -> LDMConfig:
    """Copy the finished autoencoder named by `cfg.first_stage` into `run_dir`; the config takes its architecture.

    The copy keeps every run directory self-contained (the pipeline loads it from there) and makes stage 1 a
    finished stage, so `train_autoencoder` only reloads it.
    """
    src = Path(cfg.first_stage or "")
    if src.is_dir():
        src = src / AUTOENCODER_FILE
    if not src.is_file():
        raise FileNotFoundError(f"first_stage: no autoencoder at {src} (give a stage-1 run directory or its "
                                f"{AUTOENCODER_FILE})")
    ae = load_autoencoder(src)
    a = ae.config
    if a.in_channels != cfg.data.channels:
        raise ValueError(f"first_stage {src} encodes {a.in_channels}-channel images but data.channels is "
                         f"{cfg.data.channels}")
    if a.embed_dim != cfg.unet.out_channels:
        raise ValueError(f"first_stage {src} has {a.embed_dim} latent channels but unet.out_channels is "
                         f"{cfg.unet.out_channels}")
    dst = run_dir / AUTOENCODER_FILE
    if write and not dst.exists():
        tmp = dst.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)  # atomic: a crash never leaves a half-copied stage 1 that looks finished
    return replace(cfg, autoencoder=a)


def train_first_stage(config: str | Path | FirstStageConfig, run_dir: str | Path, *,
                      overrides: dict[str, Any] | None = None, progress: bool = True, log: Any = print,
                      dist: Dist | None = None) -> Path:
    """Stage 1 alone (`ldmkit train-autoencoder`): train, then measure PSNR / SSIM on held-out data.

    Writes autoencoder.safetensors and metrics.json into `run_dir`; rerunning resumes or, when finished, only
    re-measures.
    """
    from ..evaluation.autoencoder_eval import evaluate_autoencoder
    from ..training.autoencoder import train_autoencoder as fit

    cfg = config if isinstance(config, FirstStageConfig) else load_first_stage_run(config, overrides)
    d = dist if dist is not None else setup()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if d.is_main:
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    if cfg.data.stream:
        images: Tensor | ShardStream = open_stream(cfg, d, cfg.train_autoencoder.seed)
        if d.is_main:
            log(f"data: streaming {cfg.data.root}")
    else:
        images, _ = load_dataset(cfg)
        if d.is_main:
            log(f"data: {len(images)} images {tuple(images.shape[1:])}")
    ae = fit(cfg, images, run_dir, progress=progress and d.is_main, dist=d)
    if not d.is_main:  # rank 0 measures and writes the metrics
        return run_dir
    # own data has no held-out split: the first images stand in (streamed: the first 512 of the shards)
    held_out = open_stream(cfg).take(512)[0] if cfg.data.stream else load_dataset(cfg, "test")[0]
    metrics = evaluate_autoencoder(ae, held_out[:512])
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    log(f"held-out reconstruction ({metrics['n_images']} images): PSNR {metrics['psnr_db']:.2f} dB, "
        f"SSIM {metrics['ssim']:.4f}, latent {metrics['latent_shape']}")
    return run_dir
