"""The UNet's speed and memory options side by side on this CPU: one run, the same seeded weights and inputs.

A small Stable-Diffusion-style UNet (the `sd-v1` preset's layout with `--model-channels` 128 instead of 320: 142 M
parameters; batch 2 x 4 x 32 x 32 latents, 2 x 77 x 768 text context, t = 500, float32) is run with each option:

* inference (ratios against `torch.no_grad`, eager, `--threads` threads): `torch.inference_mode`,
  `channels_last` (model and input), fused QKV projections, attention slicing, all of the first three together,
  `torch.compile` (inductor; compile time reported apart from the steady-state step), and twice the threads;
* training (ratios against an eager NCHW forward + backward of an MSE loss): the same in `channels_last`.

Timing: after one untimed warm-up call of every variant, `--rounds` rounds call every variant once, in forward
order in even rounds and reversed in odd ones (ABBA), so that machine load shared with other processes hits all
variants alike; the fastest call of each variant is reported. Peak memory: a child process runs each variant
once more, resets the kernel's peak-RSS mark (/proc/self/clear_refs) and reports VmHWM after one call minus
VmRSS before it, i.e. the resident memory the call itself added (glibc's mmap threshold is pinned, so freed
buffers go back to the OS and each call starts from the same state). Differences are max |output - baseline
output| (training: max |parameter gradient - NCHW parameter gradient|).

    .venv/bin/python benchmarks/unet_options.py            # full: 11.5 min on 2 busy cores, 6 of them compiling
    .venv/bin/python benchmarks/unet_options.py --quick    # a tiny UNet, no compile: seconds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from ldmkit.config import load_config  # noqa: E402
from ldmkit.models.unet import UNetModel  # noqa: E402

CL = torch.channels_last


@dataclasses.dataclass
class Variant:
    name: str
    group: str  # "inference" (baseline: eager no_grad) or "training" (baseline: eager NCHW fwd+bwd)
    step: Callable[[], None]  # one timed call
    result: Callable[[], Tensor | list[Tensor]]  # what the last call computed: output, or parameter gradients
    threads: int | None = None  # torch threads for this variant (None: the run's --threads)


def build_unet(args: argparse.Namespace) -> UNetModel:
    """The sd-v1 layout at --model-channels, seeded; zero-initialised output layers filled too (outputs not 0)."""
    cfg = load_config("sd-v1").unet
    if args.quick:
        cfg = dataclasses.replace(cfg, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2))
    cfg = dataclasses.replace(cfg, model_channels=args.model_channels, use_checkpoint=False)
    torch.manual_seed(0)
    unet = UNetModel(cfg).eval()
    with torch.no_grad():
        for prm in unet.parameters():
            if not prm.any():
                prm.normal_(0, 0.02)
    return unet


def make_inputs(args: argparse.Namespace) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.size, args.size, generator=g)
    context = torch.randn(args.batch, 77, 768, generator=g)
    target = torch.randn(args.batch, 4, args.size, args.size, generator=g)
    return x, torch.full((args.batch,), 500), context, target


def variant_factories(args: argparse.Namespace) -> list[tuple[str, str, Callable[..., Variant]]]:
    """(name, group, factory(base, inputs) -> Variant) for every measured option. Factories copy the base model
    where an option changes it, so that the memory child can build and free one variant at a time."""
    heads = load_config("sd-v1").unet.num_heads

    def infer(name: str, model_fn: Callable[[UNetModel], torch.nn.Module], mode: Callable[[], AbstractContextManager],
              channels_last: bool = False, threads: int | None = None) -> Callable[..., Variant]:
        def factory(base: UNetModel, inputs: tuple[Tensor, ...]) -> Variant:
            model = model_fn(base)
            x, t, context, _ = inputs
            if channels_last:
                x = x.contiguous(memory_format=CL)
            out: list[Tensor] = []

            def step() -> None:
                with mode():
                    out[:] = [model(x, t, context)]

            return Variant(name, "inference", step, lambda: out[0], threads)

        return factory

    def train(name: str, channels_last: bool) -> Callable[..., Variant]:
        def factory(base: UNetModel, inputs: tuple[Tensor, ...]) -> Variant:
            model = copy.deepcopy(base).to(memory_format=CL) if channels_last else base
            x, t, context, target = inputs
            if channels_last:
                x = x.contiguous(memory_format=CL)

            def step() -> None:
                model.train()
                model.zero_grad(set_to_none=True)
                F.mse_loss(model(x, t, context), target).backward()
                model.eval()

            def result() -> list[Tensor]:
                grads = [p.grad for p in model.parameters()]
                model.zero_grad(set_to_none=True)  # frees them until the next step
                return grads

            return Variant(name, "training", step, result)

        return factory

    def fused(m: UNetModel) -> UNetModel:
        m = copy.deepcopy(m)
        m.fuse_qkv_projections()
        return m

    def sliced(size: int) -> Callable[[UNetModel], UNetModel]:
        def make(m: UNetModel) -> UNetModel:
            m = copy.deepcopy(m)
            m.set_attention_slice(size)
            return m

        return make

    def combined(m: UNetModel) -> UNetModel:
        m = fused(m).to(memory_format=CL)
        return m

    def compiled(m: UNetModel) -> torch.nn.Module:
        return torch.compile(copy.deepcopy(m), dynamic=False)

    no_grad, inference = torch.no_grad, torch.inference_mode
    rows = [
        ("eager, torch.no_grad (baseline)", "inference", infer("baseline", lambda m: m, no_grad)),
        ("torch.inference_mode", "inference", infer("inference_mode", lambda m: m, inference)),
        ("channels_last", "inference",
         infer("channels_last", lambda m: copy.deepcopy(m).to(memory_format=CL), no_grad, channels_last=True)),
        ("fused QKV", "inference", infer("fused QKV", fused, no_grad)),
    ]
    for size in args.slice_sizes:
        what = f"{size} of {args.batch} x {heads} maps" if size < args.batch * heads else "all maps"
        rows.append((f"attention slicing ({what} at a time)", "inference",
                     infer(f"slice {size}", sliced(size), no_grad)))
    rows.append(("inference_mode + channels_last + fused QKV", "inference",
                 infer("combined", combined, inference, channels_last=True)))
    if not args.no_compile:
        rows.append(("torch.compile (inductor, steady state)", "inference", infer("compile", compiled, no_grad)))
    if not args.quick:  # on a busy machine one more OpenMP thread can cost seconds per call, even on a tiny UNet
        rows.append((f"{2 * args.threads} threads instead of {args.threads}", "inference",
                     infer("threads", lambda m: m, no_grad, threads=2 * args.threads)))
    rows.append(("fwd+bwd, NCHW (training baseline)", "training", train("train", False)))
    rows.append(("fwd+bwd, channels_last", "training", train("train channels_last", True)))
    return rows


def run_step(v: Variant, threads: int) -> float:
    torch.set_num_threads(v.threads or threads)
    t0 = time.perf_counter()
    v.step()
    elapsed = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return elapsed


# ----------------------------------------------------------------------------------------------- memory child


def _proc_status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def memory_child(args: argparse.Namespace) -> int:
    """Peak RSS added by one call of each variant, built one at a time; prints one JSON line {name: MB}."""
    torch.set_num_threads(args.threads)
    base, inputs = build_unet(args), make_inputs(args)
    peaks: dict[str, float] = {}
    for _label, _group, factory in variant_factories(args):
        v = factory(base, inputs)
        run_step(v, args.threads)  # warm-up: caches, one-time buffers, compilation
        v.result()  # drops training gradients, so both the timed and this call allocate them
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        before = _proc_status_kb("VmRSS")
        run_step(v, args.threads)
        peaks[v.name] = (_proc_status_kb("VmHWM") - before) / 1024
        del v
        gc.collect()
    print(json.dumps(peaks))
    return 0


def measure_memory(argv: list[str]) -> tuple[dict[str, float], str]:
    """Run memory_child in a fresh process; ({} and why) where the kernel interface is not there."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as err:
        return {}, f"not measured (/proc/self/clear_refs: {err})"
    # A fixed mmap threshold: glibc otherwise raises it after a free, and later buffers of that size stay in
    # the heap, so how much a call adds would depend on what ran before it.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    res = subprocess.run([sys.executable, __file__, *argv, "--memory-child"], capture_output=True, text=True,
                         env=env)
    if res.returncode != 0:
        return {}, f"not measured (memory child failed: {res.stderr.strip()[-500:]})"
    return json.loads(res.stdout.strip().splitlines()[-1]), "measured"


# ----------------------------------------------------------------------------------------------- main


def max_diff(a: Tensor | list[Tensor], b: Tensor | list[Tensor]) -> float:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return float((a - b).abs().max())
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a tiny UNet (2 levels, 32 channels, 8x8), without compile and the threads row")
    p.add_argument("--model-channels", type=int, default=None, help="base width (default 128; --quick 32)")
    p.add_argument("--size", type=int, default=None, help="latent size (default 32; --quick 8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None, help="timed calls per variant, best kept (default 5; "
                   "--quick 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every variant but the threads one")
    p.add_argument("--slice-sizes", type=int, nargs="+", default=[1, 8],
                   help="attention slice sizes to measure ((batch, head) maps per SDPA call)")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--no-memory", action="store_true", help="leave the peak-memory child process out")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw)
    args.model_channels = args.model_channels or (32 if args.quick else 128)
    args.size = args.size or (8 if args.quick else 32)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.no_compile = args.no_compile or args.quick
    if args.memory_child:
        return memory_child(args)

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    base, inputs = build_unet(args), make_inputs(args)
    n_params = sum(prm.numel() for prm in base.parameters())
    rows = variant_factories(args)
    variants = [factory(base, inputs) for _name, _group, factory in rows]
    names = [v.name for v in variants]

    # Warm-up (and compilation) of every variant, untimed except for the compiled one.
    first_call: dict[str, float] = {}
    for v in variants:
        first_call[v.name] = run_step(v, args.threads)
    best = {v.name: float("inf") for v in variants}
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            best[v.name] = min(best[v.name], run_step(v, args.threads))

    results = {v.name: v.result() for v in variants}
    base_of = {"inference": "baseline", "training": "train"}
    diffs = {v.name: max_diff(results[v.name], results[base_of[v.group]]) for v in variants}
    out_std = float(results["baseline"].std())
    # Memory after timing (the compiled variant then finds inductor's cache warm), with this process's model
    # copies freed, so that the two processes' copies are never resident together.
    del variants, results, base
    gc.collect()
    memory, memory_note = ({}, "not measured (--no-memory)") if args.no_memory else measure_memory(raw)

    print(f"# UNet options on CPU{' (--quick)' if args.quick else ''}: sd-v1 layout, model_channels "
          f"{args.model_channels}, {n_params / 1e6:.1f} M parameters, batch {args.batch} x 4 x {args.size} x "
          f"{args.size}, context {args.batch} x 77 x 768, float32, torch {torch.__version__}, {args.threads} "
          f"thread(s), best of {args.rounds} interleaved rounds\n")
    print("| option | time (s) | vs baseline | peak memory (MB) | max abs diff |")
    print("|---|---|---|---|---|")
    for (label, group, _factory), name in zip(rows, names, strict=True):
        ref = base_of[group]
        mem = f"{max(memory[name], 0.0):.0f}" if name in memory else "-"
        diff = "-" if name == ref else f"{diffs[name]:.1e}"
        print(f"| {label} | {best[name]:.3f} | {best[name] / best[ref]:.2f} | {mem} | {diff} |")
    print(f"\n- output std {out_std:.3f}; training rows: ratios against the NCHW "
          "forward + backward, differences of the parameter gradients.")
    if "compile" in first_call:
        print(f"- torch.compile: first call {first_call['compile']:.1f} s, i.e. about "
              f"{first_call['compile'] - best['compile']:.1f} s of compilation (inductor cache dir "
              f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')}; a warm cache skips most of it).")
    print(f"- peak memory: {memory_note}; resident memory one call adds, VmHWM after it minus VmRSS before it, "
          "in a child process (reset through /proc/self/clear_refs).")
    print(f"- wall time of this run: {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
