"""The performance suite (issue 9) in one command: every benchmark script in turn, its tables printed as they come.

Each script measures its ratios side by side within its own run (absolute times drift on a shared machine) and is
run here as a child process with the settings docs/ quotes, shortened where a full run would not fit the
suite's 20 minutes. `--quick` runs every script's own `--quick` mode: tiny models, seconds each, no timing
meaning (the CI smoke test). `--only NAME ...` picks scripts.

    .venv/bin/python benchmarks/run_all.py            # sized for 20 minutes on 2 cores
    .venv/bin/python benchmarks/run_all.py --quick    # about a minute
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# switches that say what a row measures (not how long it runs): the smoke test keeps them, so each row runs
KEPT_IN_QUICK = {"--low-cpu-memory"}

# (name, full-run arguments, what it shows); every script also takes --quick
SUITE: list[tuple[str, list[str], str]] = [
    ("sd_unet_step", ["--channels", "128", "--size", "32", "--train", "--steps", "3", "--warmup", "1", "--rounds", "1"],
     "small SD-style UNet vs diffusers: forward, forward + backward, equal outputs"),
    ("sd_unet_step", ["--steps", "1", "--warmup", "0", "--rounds", "1"], "SD-v1-size UNet step vs diffusers"),
    ("roofline", ["--repeats", "1"], "achieved FLOP/s of the UNet forward vs this CPU's matmul peak"),
    ("unet_options", ["--no-compile", "--rounds", "3"],
     "optimisation switches: inference_mode, channels_last, fused QKV, slicing (compile: run the script alone)"),
    ("vae_decode", ["--sizes", "512", "1024", "--whole-max", "1024"], "VAE decode: whole vs tiled vs sliced"),
    ("sd_sampling_memory", [], "peak memory of SD-size sampling at 512 px"),
    ("sd_sampling_memory", ["--low-cpu-memory"], "the same with Pipeline.enable_low_cpu_memory"),
    # pixels against f = 4 only, 120 CPU s each: 60 s for all four factors taught none of them anything; the plot
    # goes under runs/ so that the docs' figure (--budget 300, all four factors, about 45 minutes) stays
    ("latent_vs_pixel", ["--factors", "1", "4", "--budget", "120", "--n-train", "20000", "--threads", "1",
                         "--plot", "runs/latent_vs_pixel/suite.png"],
     "the paper's Fig. 6 on MNIST: pixels vs f=4, 120 CPU s each (the docs' figure: --budget 300, all f)"),
    ("gpu", [], "SD-size UNet on a CUDA device (says so and exits when there is none)"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every script's --quick mode (smoke test)")
    p.add_argument("--only", nargs="+", default=None, help="script names to run (default: all)")
    args = p.parse_args(argv)
    names = {name for name, _, _ in SUITE}
    unknown = sorted(set(args.only or []) - names)
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {sorted(names)}")
    t_start = time.perf_counter()
    failed = []
    for name, full, what in SUITE:
        if args.only and name not in args.only:
            continue
        if name == "gpu":
            extra = ["--iters", "1", "--warmup", "0"] if args.quick else []
        else:
            extra = ["--quick", *(f for f in full if f in KEPT_IN_QUICK)] if args.quick else full
        print(f"\n## {name}: {what}\n", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *extra]).returncode
        print(f"\n({name} {' '.join(extra)}: {time.perf_counter() - t0:.0f} s, exit {rc})", flush=True)
        if rc != 0:
            failed.append(name)
    print(f"\nsuite: {time.perf_counter() - t_start:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
