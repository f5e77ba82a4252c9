"""One Stable-Diffusion-v1-size UNet step (860M parameters) on this CPU: ldmkit next to diffusers, same weights.

The parent process builds the `sd-v1` preset's UNet with seeded random weights (the reference's zero-initialised
output layers are filled too, so that the outputs are not trivially zero), writes them once in each library's
naming (ldmkit = CompVis keys; diffusers via `ldmkit.interop.diffusers_export.unet_to_diffusers`), and then
runs each library in a fresh child process, so that each peak resident memory (VmHWM) is that library's
alone. Each child loads the weights, runs `--warmup` untimed steps and `--steps` timed ones of a
classifier-free-guidance batch (2 x 4 x 64 x 64 latents, 2 x 77 x 768 text context, t = 500), and saves its output.
`--train` also times a training step (forward + backward of the mean squared output into every parameter's
gradient) and compares the two libraries' gradients. `--channels` shrinks the base width (SD: 320) for a small
SD-style UNet with the same layout.

    .venv/bin/python benchmarks/sd_unet_step.py [--steps 1] [--threads 2] [--size 64]
    .venv/bin/python benchmarks/sd_unet_step.py --channels 128 --size 32 --train --steps 3 --warmup 1
    .venv/bin/python benchmarks/sd_unet_step.py --quick      # a tiny UNet, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _peak_kib() -> int:
    """This process's peak resident size in KiB: VmHWM, since ru_maxrss starts at the parent's peak at fork."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(impl: str, weights: str, config: str, out: str, steps: int, warmup: int, size: int, threads: int,
          channels: int, train: bool) -> None:
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    base_rss = _peak_kib()
    t0 = time.perf_counter()
    if impl == "ldmkit":
        from ldmkit.config import load_config
        from ldmkit.ldm.build import build_unet

        cfg = load_config("sd-v1")
        cfg.unet.use_checkpoint = False
        cfg.unet.model_channels = channels
        with torch.device("meta"):
            model = build_unet(cfg)
        model.load_state_dict(load_file(weights), assign=True)
    else:
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            model = UNet2DConditionModel(**json.loads(Path(config).read_text()))
        model.load_state_dict(load_file(weights), assign=True)
    model.eval()
    load_s = time.perf_counter() - t0
    unet_forward = model.forward
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    t = torch.full((2,), 500, dtype=torch.long)

    def step() -> torch.Tensor:
        if impl == "ldmkit":
            return unet_forward(x, t, context=ctx)
        return unet_forward(x, t, encoder_hidden_states=ctx).sample

    with torch.inference_mode():
        for _ in range(warmup):
            step()
        times = []
        for _ in range(steps):
            t1 = time.perf_counter()
            y = step()
            times.append(time.perf_counter() - t1)
    train_times: list[float] = []
    grads: dict[str, torch.Tensor] = {}
    if train:  # a training step's compute: forward with autograd, backward into every parameter
        model.train()
        for i in range(warmup + steps):
            model.zero_grad(set_to_none=True)
            t1 = time.perf_counter()
            step().square().mean().backward()
            if i >= warmup:
                train_times.append(time.perf_counter() - t1)
        grads = {"conv_in": model.conv_in.weight.grad if impl == "diffusers" else model.input_blocks[0][0].weight.grad}
    torch.save({"y": y, **grads}, out)
    peak = _peak_kib()
    print(json.dumps({"impl": impl, "load_s": load_s, "step_s": min(times), "steps": times,
                      "train_s": min(train_times) if train_times else None,
                      "out_std": float(y.std()), "out_finite": bool(torch.isfinite(y).all()),
                      "peak_rss_gb": peak / 2**20, "rss_before_load_gb": base_rss / 2**20}))


def seeded_sd_unet(channels: int = 320) -> tuple[Any, Any]:
    """The sd-v1 preset's config and UNet with seeded random weights, zero-initialised layers filled too (so
    that outputs are not trivially zero); `channels` replaces the base width 320. Shared with benchmarks/gpu.py."""
    import torch

    from ldmkit.config import load_config
    from ldmkit.ldm.build import build_unet

    cfg = load_config("sd-v1")
    cfg.unet.use_checkpoint = False
    cfg.unet.model_channels = channels
    torch.manual_seed(0)
    unet = build_unet(cfg)
    with torch.no_grad():
        for prm in unet.parameters():
            if not prm.any():  # zero-initialised output convs / proj_out
                prm.normal_(0, 0.02)
    return cfg, unet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1, help="timed steps per library (the fastest is reported)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps first")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--size", type=int, default=64, help="latent size (64 = 512 px images)")
    p.add_argument("--rounds", type=int, default=2,
                   help="child processes per library, in alternating order (ldmkit first, then diffusers first, ...) "
                        "so that neither always runs on a machine still busy with the previous one; best kept")
    p.add_argument("--channels", type=int, default=320, help="base width (SD: 320); smaller = a small SD-style UNet")
    p.add_argument("--train", action="store_true", help="also time forward + backward (a training step's compute)")
    p.add_argument("--quick", action="store_true", help="a tiny UNet (32 channels, 8 x 8 latents), one round")
    p.add_argument("--child", nargs=3, metavar=("IMPL", "WEIGHTS", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--config-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.channels, args.size, args.rounds, args.train = 32, 8, 1, True
    if args.child:
        impl, weights, out = args.child
        child(impl, weights, args.config_json or "", out, args.steps, args.warmup, args.size, args.threads,
              args.channels, args.train)
        return 0

    import torch
    from safetensors.torch import save_file

    from ldmkit.interop.diffusers_export import unet_to_diffusers

    t0 = time.perf_counter()
    cfg, unet = seeded_sd_unet(args.channels)
    n_params = sum(prm.numel() for prm in unet.parameters())
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    dconfig, dstate = unet_to_diffusers(cfg.unet, state, sample_size=args.size)
    del unet
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = Path(tmp) / "ldmkit.safetensors", Path(tmp) / "diffusers.safetensors"
        save_file(state, str(ours))
        save_file({k: v.contiguous() for k, v in dstate.items()}, str(theirs))
        del state, dstate
        cfg_json = Path(tmp) / "config.json"
        cfg_json.write_text(json.dumps({k: v for k, v in dconfig.items() if not k.startswith("_")}))
        what = "SD-v1 UNet" if args.channels == 320 else f"SD-style UNet, {args.channels} base channels"
        print(f"# {what} step on CPU: {n_params / 1e6:.1f} M parameters, batch 2 x 4 x {args.size} x {args.size}, "
              f"context 2 x 77 x 768, {args.threads} threads, float32 (weights prepared in "
              f"{time.perf_counter() - t0:.0f} s)\n")
        results: dict[str, dict] = {}
        order = [("ldmkit", ours), ("diffusers", theirs)]
        runs = [pair for r in range(args.rounds) for pair in (order if r % 2 == 0 else order[::-1])]
        for impl, path in runs:
            cmd = [sys.executable, __file__, "--child", impl, str(path), str(Path(tmp) / f"{impl}.pt"),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--size", str(args.size),
                   "--threads", str(args.threads), "--config-json", str(cfg_json), "--channels", str(args.channels)]
            if args.train:
                cmd.append("--train")
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(res.stdout.strip().splitlines()[-1])
            if impl not in results or r["step_s"] < results[impl]["step_s"]:
                results[impl] = r
        ours_out, theirs_out = torch.load(Path(tmp) / "ldmkit.pt"), torch.load(Path(tmp) / "diffusers.pt")
        diff = float((ours_out["y"] - theirs_out["y"]).abs().max())
    print("| library | load (s) | UNet step (s) | forward + backward (s) | peak RSS (GB) |")
    print("|---|---|---|---|---|")
    for impl, r in results.items():
        train_s = f"{r['train_s']:.2f}" if r["train_s"] is not None else "-"
        print(f"| {impl} | {r['load_s']:.1f} | {r['step_s']:.2f} | {train_s} | {r['peak_rss_gb']:.2f} |")
    a, b = results["ldmkit"], results["diffusers"]
    print(f"\nratio ldmkit / diffusers: step time {a['step_s'] / b['step_s']:.2f}, "
          f"peak memory {a['peak_rss_gb'] / b['peak_rss_gb']:.2f}")
    if args.train:
        g_ours, g_theirs = ours_out["conv_in"], theirs_out["conv_in"]
        gdiff = float((g_ours - g_theirs).abs().max() / g_theirs.abs().max())
        print(f"forward + backward time ratio ldmkit / diffusers: {a['train_s'] / b['train_s']:.2f}; "
              f"first conv's gradient, max relative difference {gdiff:.1e}")
    print(f"max |ldmkit - diffusers| over the output: {diff:.2e} (output std {a['out_std']:.3g}, "
          f"all finite: {a['out_finite'] and b['out_finite']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
