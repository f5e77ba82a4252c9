"""The image-level call's automatic batch size against the fixed 8 it used before, on one small model.

Trains (or reuses) a run of the `mnist_demo` preset shortened to `--steps` diffusion steps (the model's size is
what matters, not its quality), then times `pipe(class_label=[3], n=N)` with `batch_size=8` and with the batch
size left unset (`pipeline/memory.py` picks it), alternating the two over `--rounds` rounds (ABAB, so shared load
hits both) and reporting the fastest round of each. The images are compared too: the batch size must not
change a picture by more than float rounding.

    .venv/bin/python benchmarks/auto_batch.py               # about 2 minutes on 2 cores, the run cached in runs/
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ldmkit.jobs.train import train_ldm
from ldmkit.pipeline import LatentDiffusionPipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/bench_auto_batch")
    p.add_argument("--steps", type=int, default=100, help="diffusion training steps of the cached run")
    p.add_argument("--n", type=int, default=50, help="images per call")
    p.add_argument("--sampling-steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    run = Path(args.run)
    if not (run / "ldm.safetensors").exists():
        train_ldm("mnist_demo", run, overrides={"train_autoencoder.steps": 20, "train_diffusion.steps": args.steps,
                                                "data.limit": 2000},
                  progress=False, log=lambda *a: None)
    pipe = LatentDiffusionPipeline.from_checkpoint(run)
    kw = dict(class_label=[3], n=args.n, steps=args.sampling_steps, seed=0)
    best = {"batch 8": float("inf"), "auto": float("inf")}
    images = {}
    batches = {}
    for _ in range(args.rounds):
        for name, extra in (("batch 8", {"batch_size": 8}), ("auto", {})):
            seen: list[int] = []
            t = time.perf_counter()
            out = pipe(**kw, **extra, callback=lambda info, seen=seen: seen.append(info["batches"]))
            best[name] = min(best[name], time.perf_counter() - t)
            images[name] = np.stack([np.asarray(im, dtype=np.int16) for im in out.images])
            batches[name] = seen[-1]
    diff = int(np.abs(images["batch 8"] - images["auto"]).max())
    for name, s in best.items():
        print(f"{name:8s} {batches[name]:3d} batches  {s / args.n:.4f} s per image")
    print(f"auto / batch 8 speed: {best['batch 8'] / best['auto']:.2f}x; largest pixel difference {diff} / 255")


if __name__ == "__main__":
    main()
