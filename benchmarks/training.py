"""Training throughput (images/s) of stage 2 on this machine: one process against 2-process DDP (torchrun,
gloo), and what gradient checkpointing costs.

Every variant trains the same preset from the same first stage (trained once, then adopted with
`first_stage`), through the real command line, and reads its speed from the run's JSON-lines log (steps 1 to
the last, so start-up and data loading are left out). Ratios are against the one-process run measured in the
same invocation.

    .venv/bin/python benchmarks/training.py [--preset mnist_demo] [--steps 100] [--out runs/bench_training]

On 2 cores the DDP run splits the cores (1 thread per process) and adds gloo all-reduces, so it is not
expected to beat one process using both cores; what it shows is the cost of the distributed machinery that on
a multi-GPU machine buys a near-linear speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def run(cmd: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")


def images_per_s(run_dir: Path, batch: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "ldm_log.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    return (last["step"] - first["step"]) * batch / (last["seconds"] - first["seconds"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mnist_demo")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("runs/bench_training"))
    args = p.parse_args()
    cores = os.cpu_count() or 1
    cli = [sys.executable, "-m", "ldmkit.cli.main"]
    ae = args.out / "first_stage"
    if not (ae / "autoencoder.safetensors").exists():  # a short stage 1: its quality does not matter here
        run(cli + ["train", "--config", args.preset, "--out", str(ae), "--quiet", "--set", "train_autoencoder.steps=50",
                   "--set", "train_diffusion.steps=1"], cores)
    common = ["--set", f"first_stage={ae}", "--set", f"train_diffusion.steps={args.steps}",
              "--set", f"train_diffusion.batch_size={args.batch}", "--set", "train_diffusion.tensorboard=false"]
    variants = {
        f"1 process, {cores} threads": (cli, cores, []),
        f"{cores} processes DDP (gloo), 1 thread each": (
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cores), "-m",
             "ldmkit.cli.main"], 1, []),
        "1 process, gradient checkpointing": (cli, cores, ["--set", "unet.use_checkpoint=true"]),
        "1 process, grad_accum 2": (cli, cores, ["--set", "train_diffusion.grad_accum=2"]),
    }
    results = {}
    for name, (prefix, threads, extra) in variants.items():
        out = args.out / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        shutil.rmtree(out, ignore_errors=True)
        run(prefix + ["train", "--config", args.preset, "--out", str(out), "--quiet", *common, *extra], threads)
        results[name] = images_per_s(out, args.batch)
    base = next(iter(results.values()))
    print(f"\n{args.preset}, stage 2, global batch {args.batch}, {args.steps} steps, {cores} CPU cores\n")
    print("| variant | images/s | vs 1 process |\n|---|---|---|")
    for name, ips in results.items():
        print(f"| {name} | {ips:.1f} | {ips / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
