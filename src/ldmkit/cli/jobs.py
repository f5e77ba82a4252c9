"""The commands that run a job: demo, train, train-autoencoder, eval, eval-autoencoder."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CLIError, parse_overrides


def cmd_demo(args: argparse.Namespace) -> None:
    import shutil

    from ..jobs.demo import run_demo

    if args.fresh and Path(args.out).exists():
        shutil.rmtree(args.out)
    if min(args.judge_steps, args.samples_per_class, args.eval_images or 1) < 1:
        raise CLIError("--judge-steps, --samples-per-class and --eval-images must be >= 1")
    run_demo(args.out, args.config, overrides=parse_overrides(args.set), samples_per_class=args.samples_per_class,
             judge_steps=args.judge_steps, eval_images=args.eval_images, progress=not args.quiet)
    print(f"demo finished: see {Path(args.out) / 'samples.png'} and {Path(args.out) / 'metrics.json'}")


def cmd_train(args: argparse.Namespace) -> None:
    from ..jobs.train import train_ldm
    from ..training.distributed import setup, teardown

    d = setup()  # a torchrun launch joins its process group; a plain run is a world of 1
    try:
        run_dir = train_ldm(args.config, args.out, overrides=parse_overrides(args.set), progress=not args.quiet,
                            dist=d)
    finally:
        teardown()
    if d.is_main:
        print(f"trained: {run_dir} (sample with: ldmkit sample --checkpoint {run_dir} --out grid.png)")


def cmd_train_autoencoder(args: argparse.Namespace) -> None:
    from ..jobs.train import train_first_stage
    from ..training.distributed import setup, teardown

    d = setup()
    try:
        run_dir = train_first_stage(args.config, args.out, overrides=parse_overrides(args.set),
                                    progress=not args.quiet, dist=d)
    finally:
        teardown()
    if d.is_main:
        print(f"trained: {run_dir / 'autoencoder.safetensors'} (metrics in {run_dir / 'metrics.json'})")


def cmd_eval_autoencoder(args: argparse.Namespace) -> None:
    import json

    from ..config import DataConfig, FirstStageConfig
    from ..data.datasets import load_dataset
    from ..evaluation.autoencoder_eval import evaluate_autoencoder, in_domain_features
    from ..interop.loader import load_first_stage_checkpoint
    from ..ldm.checkpoint import CheckpointError
    from ..ldm.files import AUTOENCODER_FILE, load_autoencoder

    if args.n < 2:
        raise CLIError(f"--n must be >= 2, got {args.n}")
    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / AUTOENCODER_FILE
    if not path.exists():
        raise CLIError(f"checkpoint not found: {path}")
    try:
        ae = load_autoencoder(path)
    except (CheckpointError, ValueError):  # not one of ours: an original first-stage (or LDM) checkpoint
        ae, _ = load_first_stage_checkpoint(path)
    channels = ae.config.in_channels
    size = args.size or {"mnist": 32, "photos": 64}.get(args.data, 256)
    data = DataConfig(name=args.data, root=args.root, resolution=size, channels=channels, limit=args.n)
    images, _ = load_dataset(FirstStageConfig(ae.config, data=data), "test")
    feature_fn = None if args.no_rfd else in_domain_features(args.data, args.cache, progress=not args.quiet)
    metrics = evaluate_autoencoder(ae, images[: args.n], feature_fn)
    if args.json:
        print(json.dumps(metrics, indent=2, default=str))
        return
    rfd = "n/a" if metrics["rfd"] is None else f"{metrics['rfd']:.3f}"
    print(f"{path}: {metrics['n_images']} held-out {args.data} images at {size} px, latent {metrics['latent_shape']}")
    print(f"  PSNR {metrics['psnr_db']:.2f} dB   SSIM {metrics['ssim']:.4f}   rFD {rfd}")


def cmd_eval(args: argparse.Namespace) -> None:
    from ..evaluation.generative_eval import markdown_report
    from ..jobs.evaluate import evaluate_run

    if not Path(args.run).exists():
        raise CLIError(f"run or checkpoint not found: {args.run}")
    report = evaluate_run(args.run, args.out, n=args.n, features=args.features, reference=args.reference,
                          inception_weights=args.inception_weights, batch=args.batch, seed=args.seed,
                          sampler=args.sampler, steps=args.steps, guidance=args.guidance, eta=args.eta,
                          cache_dir=args.cache, log=(lambda *a: None) if args.quiet else print)
    print(markdown_report(report))
    print(f"report: {Path(args.out) / 'report.json'} and report.md; samples in {Path(args.out) / 'samples'}")
