"""The SD-v1-size UNet on a CUDA device: ldmkit next to diffusers, same weights, fp32 / fp16 / bf16.

For each precision both libraries hold the same seeded random weights (the `sd-v1` preset's 860 M-parameter
UNet; the reference's zero-initialised output layers are filled too so that outputs are not trivially zero,
converted to diffusers' names by `ldmkit.interop.diffusers_export.unet_to_diffusers`) and run a
classifier-free-guidance batch (2 x 4 x S x S latents, 2 x 77 x 768 context, t = 500):

  - inference step time (median of CUDA-event-timed iterations, the libraries alternating) and peak memory,
  - a training step: forward + backward of a squared-output loss,
  - agreement: max |ldmkit - diffusers| at each precision, and each library's error against ldmkit's fp32
    output (TF32 off), both relative to the fp32 output's standard deviation.

Then every registered sampler runs a few steps of a tiny UNet on the CPU and on the GPU from the same seed
(noise is drawn from a CPU generator on both), and the two results are compared.

Without a CUDA device the script says so and exits 0. The command (diffusers must be importable):

    python benchmarks/gpu.py [--size 64] [--iters 10] [--compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cuda_time(fn: Callable[[], Any], iters: int, warmup: int) -> float:
    """Median seconds of fn() over `iters` runs timed with CUDA events, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def build_pair(size: int) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """ldmkit's and diffusers' SD-v1 UNets holding the same seeded random weights, on the CPU in fp32."""
    from diffusers import UNet2DConditionModel
    from sd_unet_step import seeded_sd_unet  # benchmarks/ is on sys.path when this script runs

    from ldmkit.interop.diffusers_export import unet_to_diffusers

    cfg, ours = seeded_sd_unet()
    dconfig, dstate = unet_to_diffusers(cfg.unet, ours.state_dict(), sample_size=size)
    theirs = UNet2DConditionModel(**{k: v for k, v in dconfig.items() if not k.startswith("_")})
    theirs.load_state_dict(dstate, strict=True)
    return ours.eval(), theirs.eval(), sum(p.numel() for p in ours.parameters())


def forward_fn(impl: str, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
               ctx: torch.Tensor) -> Callable[[], torch.Tensor]:
    if impl == "ldmkit":
        return lambda: model(x, t, context=ctx)
    return lambda: model(x, t, encoder_hidden_states=ctx).sample


def measure_unets(args: argparse.Namespace, report: dict[str, Any]) -> None:
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    models = dict(zip(("ldmkit", "diffusers"), build_pair(args.size)[:2], strict=True))
    print(f"# weights built and converted in {time.perf_counter() - t0:.0f} s", flush=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, args.size, args.size, generator=g).to(dev)
    ctx = torch.randn(2, 77, 768, generator=g).to(dev)
    t = torch.full((2,), 500, dtype=torch.long, device=dev)
    ref: torch.Tensor | None = None
    rows = []
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        outs: dict[str, torch.Tensor] = {}
        res: dict[str, dict[str, float]] = {}
        for m in models.values():
            m.to(dev, dtype)
        xi, ci = x.to(dtype), ctx.to(dtype)
        order = list(models) if len(rows) % 2 == 0 else list(models)[::-1]
        for impl in order:
            m = models[impl]
            fwd = forward_fn(impl, m, xi, t, ci)
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                outs[impl] = fwd().float()
                step = cuda_time(fwd, args.iters, args.warmup)
            mem_inf = torch.cuda.max_memory_allocated() / 2**30
            m.requires_grad_(True)

            def train_step(m: torch.nn.Module = m, fwd: Callable[[], torch.Tensor] = fwd) -> None:
                loss = fwd().float().pow(2).mean()
                loss.backward()
                m.zero_grad(set_to_none=True)

            torch.cuda.reset_peak_memory_stats()
            train = cuda_time(train_step, args.iters, 2)
            mem_train = torch.cuda.max_memory_allocated() / 2**30
            m.requires_grad_(False)
            res[impl] = {"step_s": step, "train_s": train, "mem_gib": mem_inf, "train_mem_gib": mem_train}
            if impl == "ldmkit":
                res[impl].update(graph_step(m, xi, t, ci, outs[impl], args))
        if ref is None:
            ref = outs["ldmkit"]  # fp32 comes first
        std = float(ref.std())
        row = {"dtype": name, **{f"{impl}_{k}": v for impl, r in res.items() for k, v in r.items()},
               "ldmkit_vs_diffusers": float((outs["ldmkit"] - outs["diffusers"]).abs().max()) / std,
               "ldmkit_vs_fp32": float((outs["ldmkit"] - ref).abs().max()) / std,
               "diffusers_vs_fp32": float((outs["diffusers"] - ref).abs().max()) / std,
               "finite": bool(all(torch.isfinite(o).all() for o in outs.values()))}
        rows.append(row)
        print(json.dumps(row), flush=True)
        for m in models.values():
            m.to("cpu", torch.float32)
        torch.cuda.empty_cache()
    report["unet"] = rows
    print("\n| precision | ldmkit step (ms) | CUDA graphs (ms) | diffusers step (ms) | ratio | graphs ratio "
          "| ldmkit train (ms) | diffusers train (ms) "
          "| ratio | peak GiB ldmkit / diffusers | max err ldmkit-diffusers | max err vs fp32 ldmkit / diffusers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['ldmkit_step_s'] * 1e3:.1f} | {r['ldmkit_graph_step_s'] * 1e3:.1f} | "
              f"{r['diffusers_step_s'] * 1e3:.1f} | {r['diffusers_step_s'] / r['ldmkit_step_s']:.2f}x | "
              f"{r['diffusers_step_s'] / r['ldmkit_graph_step_s']:.2f}x | {r['ldmkit_train_s'] * 1e3:.1f} | "
              f"{r['diffusers_train_s'] * 1e3:.1f} | {r['diffusers_train_s'] / r['ldmkit_train_s']:.2f}x | "
              f"{r['ldmkit_mem_gib']:.2f} / {r['diffusers_mem_gib']:.2f} | {r['ldmkit_vs_diffusers']:.1e} | "
              f"{r['ldmkit_vs_fp32']:.1e} / {r['diffusers_vs_fp32']:.1e} |")
    print("(ratio = diffusers time / ldmkit time: above 1 means ldmkit is faster; errors relative to the fp32 "
          "output's std; CUDA graphs: Pipeline.enable_cuda_graphs, max difference from eager "
          + ", ".join(f"{r['dtype']} {r['ldmkit_graph_vs_eager']:.1e}" for r in rows) + ")", flush=True)
    measure_sampling(models, x, ctx, args, report)
    if args.compile:
        measure_compiled(models, x, t, ctx, args, report)


def graph_step(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, eager: torch.Tensor,
               args: argparse.Namespace) -> dict[str, float]:
    """ldmkit's UNet replayed from a CUDA graph (what Pipeline.enable_cuda_graphs runs): step time, peak memory
    and max difference from the eager output (relative to its std)."""
    from ldmkit.nn.cuda_graph import CUDAGraphRunner

    runner = CUDAGraphRunner(model)
    fwd = forward_fn("ldmkit", runner, x, t, ctx)  # type: ignore[arg-type]
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        out = fwd().float()
        step = cuda_time(fwd, args.iters, args.warmup)
    mem = torch.cuda.max_memory_allocated() / 2**30
    runner.reset()
    return {"graph_step_s": step, "graph_mem_gib": mem,
            "graph_vs_eager": float((out - eager).abs().max() / eager.std())}


def measure_sampling(models: dict[str, torch.nn.Module], x: torch.Tensor, ctx: torch.Tensor,
                     args: argparse.Namespace, report: dict[str, Any]) -> None:
    """What a user waits for: `--sample-steps` DDIM steps with classifier-free guidance (one batch-2 UNet call
    a step: the conditional and unconditional halves together) through ldmkit's sampler, in fp16, with each
    library's UNet, and with ldmkit's replayed from CUDA graphs. Wall clock, the whole loop."""
    from ldmkit.config import load_config
    from ldmkit.diffusion import DiscreteDenoiser, guided_denoiser
    from ldmkit.diffusion.samplers.registry import run_sampler
    from ldmkit.ldm.build import build_schedule
    from ldmkit.nn.cuda_graph import CUDAGraphRunner

    schedule = build_schedule(load_config("sd-v1"))
    dev, dtype = torch.device("cuda"), torch.float16
    cond, uncond = {"context": ctx[:1].to(dev, dtype)}, {"context": ctx[1:].to(dev, dtype)}
    runs: dict[str, Callable[..., torch.Tensor]] = {}
    for impl, m in models.items():
        m.to(dev, dtype)
        # the latents stay fp32 in the sampler; each UNet call runs in fp16 (as a pipeline's autocast would)
        if impl == "ldmkit":
            runs["ldmkit"] = lambda x, t, context=None, m=m: m(x.to(dtype), t, context=context).float()
            runner = CUDAGraphRunner(m)
            runs["ldmkit, CUDA graphs"] = lambda x, t, context=None, r=runner: r(x.to(dtype), t,
                                                                                 context=context).float()
        else:
            runs[impl] = lambda x, t, context=None, m=m: m(x.to(dtype), t, encoder_hidden_states=context).sample.float()
    out: dict[str, dict[str, float]] = {}
    finals: dict[str, torch.Tensor] = {}
    for rep in range(2):  # the first round warms up (and captures the graph); the second is timed
        for name, fn in runs.items():
            den = DiscreteDenoiser(fn, schedule)
            guided = guided_denoiser(den, cond, uncond, 7.5)
            noise = x[:1].to(dev)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                finals[name] = run_sampler("ddim", guided, noise, schedule, steps=args.sample_steps, eta=0.0,
                                           generator=torch.Generator().manual_seed(0)).float()
            torch.cuda.synchronize()
            if rep == 1:
                out[name] = {"seconds": time.perf_counter() - t0}
    scale = float(finals["ldmkit"].std())
    for name in out:
        out[name]["max_diff_vs_ldmkit_eager"] = float((finals[name] - finals["ldmkit"]).abs().max()) / scale
        out[name]["speedup_vs_diffusers"] = out["diffusers"]["seconds"] / out[name]["seconds"]
        print(f"# sampling fp16, {args.sample_steps} DDIM steps, guidance 7.5, {name}: {out[name]['seconds']:.3f} s, "
              f"{out[name]['speedup_vs_diffusers']:.2f}x diffusers' speed, max diff from ldmkit eager "
              f"{out[name]['max_diff_vs_ldmkit_eager']:.1e}", flush=True)
    for m in models.values():
        m.to("cpu", torch.float32)
    torch.cuda.empty_cache()
    report["sampling_fp16"] = out


def measure_compiled(models: dict[str, torch.nn.Module], x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
                     args: argparse.Namespace, report: dict[str, Any]) -> None:
    """fp16 inference under torch.compile (opt-in: the first compile takes minutes)."""
    out = {}
    for impl, m in models.items():
        m.to("cuda", torch.float16)
        compiled = torch.compile(m)
        fwd = forward_fn(impl, compiled, x.half(), t, ctx.half())
        t0 = time.perf_counter()
        with torch.inference_mode():
            fwd()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            step = cuda_time(fwd, args.iters, args.warmup)
        out[impl] = {"compile_s": first, "step_s": step}
        print(f"# compiled fp16 {impl}: first call {first:.0f} s, step {step * 1e3:.1f} ms", flush=True)
        m.to("cpu", torch.float32)
        torch.cuda.empty_cache()
    report["compiled_fp16"] = out


def check_samplers(report: dict[str, Any]) -> None:
    """Every registered sampler on CPU and CUDA from one seed: the results must agree."""
    from ldmkit.config import load_config
    from ldmkit.diffusion import DiscreteDenoiser, guided_denoiser
    from ldmkit.diffusion.samplers.registry import SAMPLERS, run_sampler
    from ldmkit.ldm.build import build_schedule, build_unet

    torch.backends.cuda.matmul.allow_tf32 = False  # cuDNN convolutions default to TF32: compare in true fp32
    torch.backends.cudnn.allow_tf32 = False
    cfg = load_config("mnist_tiny")
    torch.manual_seed(0)
    unet = build_unet(cfg).eval()
    with torch.no_grad():
        for prm in unet.parameters():
            if not prm.any():
                prm.normal_(0, 0.02)
    schedule = build_schedule(cfg)
    ctx = torch.randn(2, 1, cfg.unet.context_dim or 1, generator=torch.Generator().manual_seed(1))
    rows = {}
    for name in SAMPLERS:
        finals = []
        for dev in ("cpu", "cuda"):
            unet.to(dev)
            den = DiscreteDenoiser(lambda x, t, context=None: unet(x, t, context=context), schedule)
            cond = {"context": ctx.to(dev)} if cfg.unet.use_spatial_transformer else {}
            fn = guided_denoiser(den, cond, None, 1.0)
            g = torch.Generator().manual_seed(3)
            noise = torch.randn(2, cfg.unet.in_channels, 8, 8, generator=g).to(dev)
            with torch.inference_mode():
                steps = schedule.num_timesteps if name == "ddpm" else 8  # DDPM walks the whole chain
                finals.append(run_sampler(name, fn, noise, schedule, steps=steps, generator=g).cpu())
        diff = float((finals[0] - finals[1]).abs().max())
        rows[name] = diff
        print(f"# sampler {name}: max |cpu - cuda| = {diff:.2e}", flush=True)
    report["samplers_cpu_vs_cuda"] = rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64, help="latent size (64 = 512 px images)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma-separated, fp32 first")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd fp16 inference")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the timed sampling loop")
    p.add_argument("--skip-unet", action="store_true", help="only the sampler check")
    p.add_argument("--json", type=Path, help="write the measurements here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing measured (this benchmark needs a GPU; see benchmarks/sd_unet_step.py "
              "for the CPU comparison)")
        return 0
    if not args.dtypes.startswith("fp32"):
        p.error("--dtypes must start with fp32 (the reference output)")
    props = torch.cuda.get_device_properties(0)
    report: dict[str, Any] = {"device": props.name, "torch": torch.__version__, "size": args.size}
    print(f"# {props.name}, torch {torch.__version__}, batch 2 x 4 x {args.size} x {args.size}, context 2 x 77 x 768",
          flush=True)
    try:
        check_samplers(report)
        if not args.skip_unet:
            measure_unets(args, report)
    finally:
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
