"""Roofline: achieved FLOP/s of the UNet forward (counted FLOPs) against this CPU's measured fp32 matmul peak.
Goal >= 60 %.

The peak is the best of several timed fp32 sgemms (2048 x 2048 x 2048) at the benchmark's thread count; the
kernels that dominate the sd-v1 UNet (3x3 convolutions, the transformer's linears, flash attention) are timed
alone at the same threads, so the gap between the whole forward and the peak can be attributed.

FLOPs of one forward are counted with `torch.utils.flop_counter.FlopCounterMode` on the real (CPU) run: it
counts matrix products (mm, addmm, bmm, baddbmm: 2 per multiply-add), convolutions (2 * Cin/groups * Cout *
kh * kw * output pixels) and scaled-dot-product attention (4 * B * heads * Lq * Lk * head dim: q k^T and
p v). Elementwise ops, normalisations, softmax and copies are not counted, although they take time. torch's
registry misses the CPU flash-attention op (`_scaled_dot_product_flash_attention_for_cpu`), so it is added
here with torch's own SDPA formula; without it every attention FLOP would be dropped.

Achieved FLOP/s = counted FLOPs / best forward time (after a warm-up forward, under torch.inference_mode) for
ldmkit's UNet and diffusers' UNet2DConditionModel holding the same tensors (the conversion only renames
keys; `load_state_dict(assign=True)` shares the storage, so both fit in memory and run alternately, each
round in the other order). Models: a small SD-style UNet (the sd-v1 preset at 160 channels, 4 heads, so head
widths 40 / 80 / 160 as in SD, 32 x 32 latents) and the full sd-v1 UNet (batch 2 x 4 x 64 x 64, context
2 x 77 x 768, about 10 s per forward on 2 threads; `--quick` skips it and shrinks everything else).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/roofline.py [--threads 2] [--repeats 2] [--quick] [--no-diffusers]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sd_unet_step's helpers, when imported from a test

GOAL = 0.60
# FlopCounterMode op names (str of the OpOverloadPacket) grouped into the shares reported
CONV_OPS = {"aten.convolution", "aten._convolution", "aten.convolution_overrideable", "aten._slow_conv2d_forward",
            "aten.cudnn_convolution"}
MATMUL_OPS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm"}


def _cpu_flash_attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                               out_shape: Any = None, **kwargs: Any) -> int:
    """torch's SDPA count for the CPU flash kernel, which its registry lacks: 4 * B * H * Lq * Lk * D."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs by aten op) of one call of `fn`, CPU flash attention included."""
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS)
    with counter:
        fn()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


def flop_shares(per_op: dict[str, int]) -> dict[str, float]:
    """Fractions of the counted FLOPs in convolutions, matrix products, attention and anything else."""
    total = sum(per_op.values()) or 1
    groups = {"conv": 0, "matmul": 0, "attention": 0, "other": 0}
    for op, n in per_op.items():
        if op in CONV_OPS:
            groups["conv"] += n
        elif op in MATMUL_OPS:
            groups["matmul"] += n
        elif "attention" in op:
            groups["attention"] += n
        else:
            groups["other"] += n
    return {k: v / total for k, v in groups.items()}


def best_seconds(fn: Callable[[], Any], repeats: int, min_s: float = 0.05) -> float:
    """Fastest time of one call over `repeats` rounds; short calls are looped so a round lasts >= min_s."""
    fn()  # warm-up: oneDNN builds its primitives on the first call of a shape
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    inner = max(1, int(min_s / max(once, 1e-9)))
    best = once
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


@dataclass
class Kernel:
    name: str
    flops: int
    kind: str  # "matmul", "conv" or "attention": which share of the UNet's FLOPs it stands for
    run: Callable[[], Any]
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.flops / self.seconds


def kernels(quick: bool, g: torch.Generator) -> list[Kernel]:
    """The square sgemm (the peak) and the kernel shapes that dominate the sd-v1 UNet at 64 x 64 latents,
    batch 2 (tiny stand-ins with --quick)."""
    n, c, hw, big_c, small_hw, tokens, heads, dim = (
        (256, 32, 16, 64, 8, 256, 2, 16) if quick else (2048, 320, 64, 1280, 16, 4096, 8, 40))
    b = 2
    out: list[Kernel] = []
    a, m = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out.append(Kernel(f"sgemm {n} x {n} x {n} (peak)", 2 * n**3, "matmul", lambda: torch.mm(a, m)))
    for ch, size in ((c, hw), (big_c, small_hw)):
        x = torch.randn(b, ch, size, size, generator=g)
        w = torch.randn(ch, ch, 3, 3, generator=g)
        flops = 2 * ch * ch * 9 * size * size * b
        out.append(Kernel(f"conv 3x3 {ch} -> {ch}, {b} x {size} x {size}, NCHW", flops, "conv",
                          lambda x=x, w=w: F.conv2d(x, w, padding=1)))
        if ch == c:
            xc, wc = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
            out.append(Kernel(f"conv 3x3 {ch} -> {ch}, {b} x {size} x {size}, channels_last", flops, "conv",
                              lambda xc=xc, wc=wc: F.conv2d(xc, wc, padding=1)))
    rows = b * hw * hw  # tokens of the first level's transformer, both batch items
    for cin, cout, what in ((c, 8 * c, "GEGLU proj"), (4 * c, c, "feed-forward out"), (c, c, "q / k / v / out")):
        x = torch.randn(rows, cin, generator=g)
        w, bias = torch.randn(cout, cin, generator=g), torch.randn(cout, generator=g)
        out.append(Kernel(f"linear {rows} x {cin} -> {cout} ({what})", 2 * rows * cin * cout, "matmul",
                          lambda x=x, w=w, bias=bias: F.linear(x, w, bias)))
    q, k, v = (torch.randn(b, heads, tokens, dim, generator=g) for _ in range(3))
    out.append(Kernel(f"SDPA self-attention {b} x {heads} heads x {tokens} tokens x {dim}",
                      4 * b * heads * tokens * tokens * dim, "attention",
                      lambda: F.scaled_dot_product_attention(q, k, v)))
    return out


def fill_zero_params(module: nn.Module, g: torch.Generator) -> None:
    """Fill the zero-initialised output layers (as sd_unet_step does) so that outputs are not trivially zero."""
    with torch.no_grad():
        for prm in module.parameters():
            if not prm.any():
                prm.copy_(0.02 * torch.randn(prm.shape, generator=g))


def build_models(channels: int | None, heads: int, size: int, diffusers: bool) -> tuple[nn.Module, nn.Module | None]:
    """ldmkit's UNet (the sd-v1 preset; `channels` None = the full 320-channel one) and diffusers'
    UNet2DConditionModel sharing its tensors (None without diffusers)."""
    if channels is None:
        from sd_unet_step import seeded_sd_unet

        cfg, unet = seeded_sd_unet()
    else:
        from ldmkit.config import load_config
        from ldmkit.ldm.build import build_unet

        cfg = load_config("sd-v1")
        cfg.unet.use_checkpoint = False
        cfg.unet.model_channels, cfg.unet.num_heads = channels, heads
        torch.manual_seed(0)
        unet = build_unet(cfg)
        fill_zero_params(unet, torch.Generator().manual_seed(1))
    unet.eval()
    if not diffusers:
        return unet, None
    from diffusers import UNet2DConditionModel

    from ldmkit.interop.diffusers_export import unet_to_diffusers

    dconfig, dstate = unet_to_diffusers(cfg.unet, unet.state_dict(), sample_size=size)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**{k: v for k, v in dconfig.items() if not k.startswith("_")})
    theirs.load_state_dict(dstate, assign=True)  # the same storages: no second copy of the weights
    return unet, theirs.eval()


@dataclass
class Row:
    model: str
    flops: int
    per_op: dict[str, int]
    ldmkit_s: float
    diffusers_s: float | None = None
    diffusers_flops: int | None = None
    max_diff: float | None = None
    times: dict[str, list[float]] = field(default_factory=dict)


def measure(model: str, ours: nn.Module, theirs: nn.Module | None, size: int, repeats: int) -> Row:
    """Count FLOPs (in the warm-up forward) and time the best of `repeats` forwards of each library."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=g)  # [B, 4, h, w] latents of a guidance batch
    ctx = torch.randn(2, 77, 768, generator=g)  # [B, 77, 768] CLIP ViT-L/14 text tokens
    t = torch.full((2,), 500, dtype=torch.long)
    calls: dict[str, Callable[[], Tensor]] = {"ldmkit": lambda: ours(x, t, context=ctx)}
    if theirs is not None:
        calls["diffusers"] = lambda: theirs(x, t, encoder_hidden_states=ctx).sample
    times: dict[str, list[float]] = {name: [] for name in calls}
    outs: dict[str, Tensor] = {}
    with torch.inference_mode():
        counts = {name: count_flops(fn) for name, fn in calls.items()}
        names = list(calls)
        for r in range(repeats):
            for name in names if r % 2 == 0 else names[::-1]:  # neither always runs second on a busy machine
                t0 = time.perf_counter()
                outs[name] = calls[name]()
                times[name].append(time.perf_counter() - t0)
    flops, per_op = counts["ldmkit"]
    row = Row(model, flops, per_op, min(times["ldmkit"]), times=times)
    if theirs is not None:
        row.diffusers_s = min(times["diffusers"])
        row.diffusers_flops = counts["diffusers"][0]
        row.max_diff = float((outs["ldmkit"] - outs["diffusers"]).abs().max())
    return row


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def report(rows: list[Row], ks: list[Kernel], probes: list[float], threads: int, quick: bool) -> None:
    peak = max(probes)
    print(f"\n## fp32 kernels alone, {threads} threads (best of several)\n")
    print("| kernel | GFLOP | best (ms) | GFLOP/s | % of sgemm peak |")
    print("|---|---|---|---|---|")
    for k in ks:
        rate = k.rate if k is not ks[0] else peak
        ms = 1e3 * k.flops / rate
        print(f"| {k.name} | {k.flops / 1e9:.2f} | {ms:.1f} | {rate / 1e9:.1f} | {_pct(rate / peak)} |")
    sgemm = ks[0].name.split(" (")[0]
    print(f"\nmatmul peak: {peak / 1e9:.1f} GFLOP/s, the best of {len(probes)} measurements of the {sgemm}, taken "
          f"first and after each model ({', '.join(f'{x / 1e9:.0f}' for x in probes)}), {threads} threads")

    print(f"\n## UNet forward, {threads} threads, float32, torch.inference_mode\n")
    print("| model | GFLOPs / forward | ldmkit (s) | diffusers (s) | ldmkit GFLOP/s | % of matmul peak | "
          "diffusers GFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ours = r.flops / r.ldmkit_s
        if r.diffusers_s is None:
            d_s = d_rate = d_pct = "-"
        else:
            theirs = r.flops / r.diffusers_s
            d_s, d_rate, d_pct = f"{r.diffusers_s:.3f}", f"{theirs / 1e9:.1f}", _pct(theirs / peak)
        print(f"| {r.model} | {r.flops / 1e9:.2f} | {r.ldmkit_s:.3f} | {d_s} | {ours / 1e9:.1f} | "
              f"{_pct(ours / peak)} | {d_rate} | {d_pct} |")

    print("\n## Where the counted FLOPs are (FlopCounterMode, ldmkit forward)\n")
    print("| model | conv | matmul (mm / addmm / bmm) | attention (SDPA) | GFLOPs by op |")
    print("|---|---|---|---|---|")
    for r in rows:
        s = flop_shares(r.per_op)
        by_op = ", ".join(f"{op.removeprefix('aten.')} {n / 1e9:.1f}" for op, n in sorted(r.per_op.items()))
        print(f"| {r.model} | {_pct(s['conv'])} | {_pct(s['matmul'])} | {_pct(s['attention'])} | {by_op} |")

    print()
    for r in rows:
        if r.diffusers_flops is not None:
            same = "same count" if r.diffusers_flops == r.flops else f"diffusers counts {r.diffusers_flops / 1e9:.2f}"
            print(f"{r.model}: ldmkit / diffusers time {r.ldmkit_s / r.diffusers_s:.2f}; {same}; "
                  f"max |ldmkit - diffusers| {r.max_diff:.1e}")
        print(f"{r.model}: forward times (s) " + "; ".join(
            f"{name} {', '.join(f'{t:.3f}' for t in ts)}" for name, ts in r.times.items()))
    full = [r for r in rows if r.model.startswith("sd-v1 (full")]
    if full and not quick:
        r = full[0]
        rate = {kind: max(k.rate for k in ks[1:] if k.kind == kind) for kind in ("conv", "matmul", "attention")}
        s = flop_shares(r.per_op)
        est = sum(s[kind] * r.flops / rate[kind] for kind in rate)
        print(f"\nsd-v1 at the kernel rates above (conv {rate['conv'] / 1e9:.0f}, linear {rate['matmul'] / 1e9:.0f}, "
              f"attention {rate['attention'] / 1e9:.0f} GFLOP/s): the counted FLOPs take {est:.2f} s of the "
              f"measured {r.ldmkit_s:.2f} s; the other {r.ldmkit_s - est:.2f} s are uncounted ops (norms, "
              "elementwise, softmax outside SDPA, copies) and slower shapes")
    best = full[0] if full else rows[0]  # the goal is about the full UNet; --quick reports the small one
    frac = best.flops / best.ldmkit_s / peak
    print(f"\ngoal >= {_pct(GOAL)} of the matmul peak for {best.model}: ldmkit reaches {_pct(frac)}, "
          f"{'met' if frac >= GOAL else 'not met'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads for every measurement (default 2)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed forwards per library and model, best kept (default 3, 1 with --quick)")
    p.add_argument("--kernel-repeats", type=int, default=5, help="timed rounds per kernel, best kept")
    p.add_argument("--small-channels", type=int, default=None,
                   help="model_channels of the small SD-style UNet (default 160, 64 with --quick)")
    p.add_argument("--small-size", type=int, default=None, help="its latent size (default 32, 16 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny kernels and small model only (a few seconds)")
    p.add_argument("--no-diffusers", action="store_true", help="ldmkit only (importing diffusers takes ~5-15 s)")
    args = p.parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    channels = args.small_channels or (64 if args.quick else 160)
    size = args.small_size or (16 if args.quick else 32)
    if channels % 32:
        raise ValueError(f"--small-channels must be a multiple of 32 (GroupNorm groups), got {channels}")

    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(0)
        ks = kernels(args.quick, g)
        for k in ks:
            k.seconds = best_seconds(k.run, args.kernel_repeats)
        print(f"# Roofline of the UNet forward on this CPU: {args.threads} threads, float32, torch "
              f"{torch.__version__}")
        probes = [ks[0].rate]  # the sgemm again around every model: a busy machine only ever lowers a rate
        rows = []
        heads = max(1, channels // 40)  # SD's 40-channel heads at the first level
        specs: list[tuple[str, int | None, int, int]] = [
            (f"sd-v1 @ {channels} ch, {heads} heads, 2 x 4 x {size} x {size}", channels, heads, size)]
        if not args.quick:
            specs.append(("sd-v1 (full, 320 ch), 2 x 4 x 64 x 64", None, 8, 64))
        for name, ch, nh, sz in specs:
            ours, theirs = build_models(ch, nh, sz, not args.no_diffusers)
            rows.append(measure(name, ours, theirs, sz, repeats))
            probes.append(ks[0].flops / best_seconds(ks[0].run, args.kernel_repeats))
            del ours, theirs
        report(rows, ks, probes, args.threads, args.quick)
        print(f"\n(wall time {time.perf_counter() - t0:.0f} s)")
    finally:
        torch.set_num_threads(previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
