"""The end-to-end demo: both LDM stages trained on real MNIST on a CPU, sampled, and measured.

1. a judge CNN (trained on the real train set with noise/background augmentation) for the metrics;
2. stage 1: the f=4 KL autoencoder, scored by PSNR on held-out test images;
3. stage 2: the class-conditional latent diffusion model (cross-attention on a learned class token);
4. a 10 x 8 grid of guided DDIM samples, and the metrics: conditional accuracy (share of samples the
   judge assigns to their class) and the Frechet distance between judge features of samples and of the
   real test set.

Every stage writes its result into the run directory and is skipped when that result exists, so rerunning
the same command resumes an interrupted demo.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import load_config
from ..data.images import save_grid
from ..data.mnist import mnist_tensor
from ..evaluation.classifier import evaluate_classifier, load_or_train_judge, predict
from ..evaluation.frechet import feature_statistics, frechet_distance
from ..evaluation.image_metrics import psnr
from ..latent import LatentCodec
from ..ldm.files import LDM_FILE
from ..pipeline import LatentDiffusionPipeline
from ..training.autoencoder import train_autoencoder
from .train import train_second_stage

JUDGE_FILE = "judge.safetensors"


def _timed(timings: dict[str, float], path: Path, name: str, fn: Callable[[], Any]) -> Any:
    """Run one stage, keeping its wall time in timings.json (a stage reloaded from disk keeps its old time)."""
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    if name not in timings or dt > 1.0:
        timings[name] = round(dt, 1)
    path.write_text(json.dumps(timings, indent=2))
    return out


@torch.no_grad()
def autoencoder_psnr(codec: LatentCodec, images: torch.Tensor, batch_size: int = 500) -> float:
    """Mean PSNR (dB, [0, 1] range) of posterior-mode reconstructions."""
    # faster CPU convolutions; torch's stubs lack Module.to's memory_format keyword, which it takes at run time
    ae = codec.autoencoder.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    try:
        vals = [psnr(ae.decode(ae.encode(x.contiguous(memory_format=torch.channels_last)).mode()).clamp(-1, 1), x)
                for x in images.split(batch_size)]
    finally:
        ae.to(memory_format=torch.contiguous_format)
    return torch.cat(vals).mean().item()


def run_demo(
    run_dir: str | Path = "runs/demo",
    preset: str = "mnist_demo",
    *,
    overrides: dict[str, Any] | None = None,
    samples_per_class: int = 50,
    judge_steps: int = 600,
    eval_images: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and evaluate the MNIST demo; returns (and writes) the metrics.

    `eval_images` (default: all 10000) test images measure the autoencoder's PSNR and the judge's accuracy and
    are the real side of the Frechet distance: fewer make a quick check run (tests), not comparable figures.
    """
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(preset, overrides)
    tpath = run_dir / "timings.json"
    timings: dict[str, float] = json.loads(tpath.read_text()) if tpath.exists() else {}

    train_x, train_y = mnist_tensor("train", cfg.data.root)
    test_x, test_y = mnist_tensor("test", cfg.data.root)
    test_x, test_y = test_x[:eval_images], test_y[:eval_images]
    # data.limit (e.g. --set data.limit=2000) shortens what both stages train on; the judge always trains on the
    # whole train set
    fit_x, fit_y = train_x[: cfg.data.limit], train_y[: cfg.data.limit]
    log(f"MNIST: {len(train_x)} train / {len(test_x)} test images, {tuple(train_x.shape[1:])}"
        + (f"; the model trains on the first {len(fit_x)}" if len(fit_x) < len(train_x) else ""))

    judge = _timed(timings, tpath, "judge",
                   lambda: load_or_train_judge(run_dir / JUDGE_FILE, train_x, train_y, judge_steps, progress))
    judge_acc = evaluate_classifier(judge, test_x, test_y)
    log(f"judge: test accuracy {judge_acc:.2%}")

    ae = _timed(timings, tpath, "autoencoder", lambda: train_autoencoder(cfg, fit_x, run_dir, progress=progress))
    codec = LatentCodec(ae)
    ae_psnr = autoencoder_psnr(codec, test_x)
    log(f"autoencoder: f={ae.downsample_factor}, latent {codec.latent_shape(cfg.data.resolution)}, "
        f"test PSNR {ae_psnr:.2f} dB")

    if not (run_dir / LDM_FILE).exists():
        _timed(timings, tpath, "diffusion",
               lambda: train_second_stage(cfg, codec, fit_x, fit_y, run_dir, progress, log))
    pipe = LatentDiffusionPipeline.from_pretrained(run_dir)
    sc = cfg.sampling

    # the grid: one row per class
    t0 = time.perf_counter()
    grid_classes = [c for c in range(10) for _ in range(8)]
    grid = pipe.sample(class_label=grid_classes, steps=sc.steps, guidance=sc.guidance, eta=sc.eta, seed=0)
    grid_seconds = time.perf_counter() - t0
    save_grid(grid, run_dir / "samples.png", nrow=8, scale=2)

    # the metrics: samples_per_class per class, another seed
    t0 = time.perf_counter()
    classes = [c for c in range(10) for _ in range(samples_per_class)]
    samples = pipe.sample(class_label=classes, steps=sc.steps, guidance=sc.guidance, eta=sc.eta, seed=1)
    sample_seconds = time.perf_counter() - t0
    timings["sampling"] = round(grid_seconds + sample_seconds, 1)
    tpath.write_text(json.dumps(timings, indent=2))
    target = torch.tensor(classes)
    cond_acc = (predict(judge, samples) == target).double().mean().item()
    with torch.no_grad():
        f_gen = judge.features(samples)
        f_real = torch.cat([judge.features(x) for x in test_x.split(1000)])
        f_train = torch.cat([judge.features(x) for x in train_x[: len(test_x)].split(1000)])
    fd = frechet_distance(*feature_statistics(f_gen), *feature_statistics(f_real))
    # the same distance for real train images of the same count: the floor that sampling noise sets
    fd_floor = frechet_distance(*feature_statistics(f_train[: len(samples)]), *feature_statistics(f_real))

    metrics = {
        "autoencoder_psnr_db": round(ae_psnr, 2),
        "judge_test_accuracy": round(judge_acc, 4),
        "conditional_accuracy": round(cond_acc, 4),
        "frechet_distance_judge_features": round(fd, 3),
        "frechet_distance_real_train_vs_test": round(fd_floor, 3),
        "n_generated_for_metrics": len(samples),
        "n_test_images_for_metrics": len(test_x),
        "sampler": f"DDIM {sc.steps} steps, eta {sc.eta}, guidance {sc.guidance}",
        "sampling_seconds_per_image": round((grid_seconds + sample_seconds) / (len(grid) + len(samples)), 4),
        "scale_factor": round(pipe.codec.scale_factor, 5),
        "stage_seconds": timings,
        "total_seconds_this_run": round(time.perf_counter() - t_start, 1),
        "torch_threads": torch.get_num_threads(),
        "preset": preset,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log(json.dumps(metrics, indent=2))
    return metrics
