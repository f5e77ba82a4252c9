"""Peak memory of Stable-Diffusion-v1-size text-to-image sampling at 512 px, fp32, on CPU. Goal <= 5 GiB.

A child process builds the `sd-v1` preset's pipeline with seeded random weights: the 860M-parameter UNet (as
benchmarks/sd_unet_step.py seeds it), the kl-f8 autoencoder and the CLIP ViT-L/14 text encoder (random
weights too; its tokenizer is the real CLIP BPE vocabulary that ships inside the open-clip-torch wheel, so no
download). It then samples one image through the package's own inference call, `LatentDiffusionPipeline.sample`
(tokenise, encode prompt and "" for classifier-free guidance at 7.5, DDIM with eta 0 for `--steps` steps on
a batch of 2 latents, VAE decode to 1 x 3 x 512 x 512 pixels).

Memory is the child's peak resident set (VmHWM in /proc/self/status), read between phases: when the weights
are built, after the text encoder ran (a forward hook), after each UNet step (the sampler's callback) and at
the end. ru_maxrss is printed too, but it is not the job's own: Linux carries the high-water mark of the
process that vfork()ed the child through exec, so a child started by a big parent (a pytest run, or a parent
that built weights) starts with the parent's peak. VmHWM belongs to the exec'd image alone.

`--load checkpoint` measures the loading path a user takes instead: a helper process writes the weights as
an ldmkit checkpoint, and the sampling child opens it with `Pipeline.from_checkpoint`. `--load original` writes
them as an original Stable Diffusion .safetensors file (CompVis keys, no ldmkit metadata), which
`Pipeline.from_checkpoint` identifies from its keys. `--vae-tile N` decodes
in N x N latent tiles (`Pipeline.enable_vae_tiling`; at 512 px the latent is 64 x 64, so N < 64 to tile).
`--low-cpu-memory` switches on `Pipeline.enable_low_cpu_memory` (freed tensors go straight back to the system).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sd_sampling_memory.py [--steps 2] [--threads 2] [--size 512]
        [--load init|checkpoint|original] [--vae-tile 32] [--low-cpu-memory] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GOAL_GIB = 5.0
PROMPT = "a photograph of an astronaut riding a horse"


def _status_gib(field: str) -> float:
    """A memory line of /proc/self/status (VmHWM = peak resident set, VmRSS = now) in GiB."""
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {field} line: this benchmark needs Linux")
    return int(m.group(1)) / 2**20


class Phases:
    """Peak and current RSS at named points of the job, with the wall time since the process started."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.rows: list[dict[str, Any]] = []

    def mark(self, phase: str) -> None:
        self.rows.append({"phase": phase, "peak_gib": _status_gib("VmHWM"), "rss_gib": _status_gib("VmRSS"),
                          "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                          "t": time.perf_counter() - self.t0})


def build_pipeline(quick: bool) -> Any:
    """The sd-v1 pipeline with seeded random weights; `quick` shrinks UNet, autoencoder and text encoder."""
    import torch

    from ldmkit.config import load_config
    from ldmkit.ldm.build import LDMParts, build_autoencoder, build_conditioner, build_schedule, build_unet
    from ldmkit.models.text_clip import CLIPTextConfig, FrozenCLIPEmbedder
    from ldmkit.pipeline import LatentDiffusionPipeline

    if quick:
        cfg = load_config("sd-v1")
        cfg.unet.use_checkpoint = False
        cfg.unet.model_channels, cfg.unet.context_dim, cfg.autoencoder.ch = 32, 64, 32
        torch.manual_seed(0)
        unet = build_unet(cfg)
        conditioner = FrozenCLIPEmbedder(CLIPTextConfig(width=64, layers=1, heads=2, mlp_width=128))
    else:
        from sd_unet_step import seeded_sd_unet  # benchmarks/ is on sys.path when this script runs

        cfg, unet = seeded_sd_unet()  # seeds torch with 0 and fills the zero-initialised output layers
        conditioner = build_conditioner(cfg, pretrained=False)
    parts = LDMParts(unet, build_autoencoder(cfg), conditioner, build_schedule(cfg))
    return LatentDiffusionPipeline(cfg, parts, float(cfg.scale_factor or 1.0))


def _gib_of(module: Any) -> tuple[float, float]:
    n = sum(p.numel() for p in module.parameters())
    return n / 1e6, sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30


def child(args: argparse.Namespace) -> dict[str, Any]:
    """The measured job: build or load, sample, decode; returns the phases and a few checks."""
    import torch

    from ldmkit.pipeline import LatentDiffusionPipeline

    torch.set_num_threads(args.threads)
    phases = Phases()
    phases.mark("process start (torch, ldmkit imported)")
    if args.checkpoint:
        pipe = LatentDiffusionPipeline.from_checkpoint(args.checkpoint)
        how = "loaded with Pipeline.from_checkpoint"
    else:
        pipe = build_pipeline(args.quick)
        how = "built with seeded random init"
    if args.vae_tile:
        if not hasattr(pipe, "enable_vae_tiling"):
            raise ValueError("--vae-tile: this ldmkit's pipeline has no enable_vae_tiling")
        pipe.enable_vae_tiling(args.vae_tile, args.vae_tile_overlap)
    if args.low_cpu_memory:
        pipe.enable_low_cpu_memory()
    sizes = {name: _gib_of(m) for name, m in (("UNet", pipe.parts.unet), ("autoencoder", pipe.parts.autoencoder),
                                               ("text encoder", pipe.parts.conditioner))}
    phases.mark(f"weights {how}")
    text_calls: list[int] = []

    def on_text(*_: Any) -> None:  # guidance encodes the prompt, then "": one row for both
        if text_calls:
            phases.rows.pop()
        text_calls.append(1)
        phases.mark(f"text encoder ran ({len(text_calls)} calls: prompt, \"\" for guidance)")

    pipe.parts.conditioner.register_forward_hook(on_text)
    step_rows: list[dict[str, Any]] = []

    def on_step(info: dict[str, Any]) -> None:
        phases.mark(f"after UNet step {info['i'] + 1} of {args.steps} (CFG batch 2)")
        step_rows.append(phases.rows[-1])

    with torch.inference_mode():
        images = pipe.sample(prompt=[PROMPT], steps=args.steps, guidance=7.5, sampler="ddim", eta=0.0,
                             height=args.size, width=args.size, seed=0, callback=on_step)
    phases.mark(f"after VAE decode to {' x '.join(map(str, images.shape))} (whole job)")
    middle = {id(r) for r in step_rows[1:-1]}  # the steps between the first and the last look the same
    keep = [r for r in phases.rows if id(r) not in middle]
    return {"phases": keep, "sizes": sizes, "shape": list(images.shape),
            "finite": bool(torch.isfinite(images).all()), "std": float(images.std()),
            "step_s": [b["t"] - a["t"] for a, b in zip(step_rows, step_rows[1:], strict=False)]}


def write_checkpoint(path: str, quick: bool, original: bool) -> None:
    """Helper process for --load checkpoint / original: the same seeded weights as an ldmkit checkpoint file,
    or as an original SD .safetensors file (the same CompVis keys, without ldmkit's metadata)."""
    from safetensors.torch import save_file

    from ldmkit.ldm.build import ldm_state_dict
    from ldmkit.ldm.files import save_ldm

    pipe = build_pipeline(quick)
    if original:  # the state dict is already in CompVis layout: an original file is it without our metadata
        save_file({k: v.contiguous() for k, v in ldm_state_dict(pipe.parts).items()}, path, metadata={"format": "pt"})
    else:
        save_ldm(Path(path), pipe.parts, pipe.cfg, pipe.codec.scale_factor)


def _run(cmd: list[str], threads: int) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{res.stderr[-3000:]}")
    return res.stdout


def report(r: dict[str, Any], args: argparse.Namespace, wall: float) -> None:
    total_w = sum(gib for _, gib in r["sizes"].values())
    parts = ", ".join(f"{name} {n:.1f} M" for name, (n, _) in r["sizes"].items())
    print(f"# SD-v1-size sampling memory on CPU: {args.size} x {args.size} px, float32, {args.steps} DDIM steps, "
          f"guidance 7.5, {args.threads} threads" + (" (--quick: tiny model)" if args.quick else ""))
    print(f"weights: {parts} parameters = {total_w:.2f} GiB in float32"
          + (f"; VAE decode in {args.vae_tile} x {args.vae_tile} latent tiles, overlap {args.vae_tile_overlap}"
             if args.vae_tile else "") + ("; Pipeline.enable_low_cpu_memory" if args.low_cpu_memory else "") + "\n")
    print("| phase | peak RSS so far (GiB) | RSS now (GiB) | wall since imports (s) |")
    print("|---|---|---|---|")
    for p in r["phases"]:
        print(f"| {p['phase']} | {p['peak_gib']:.2f} | {p['rss_gib']:.2f} | {p['t']:.1f} |")
    peak = r["phases"][-1]["peak_gib"]
    print(f"\npeak of the whole job: {peak:.3f} GiB = weights {total_w:.2f} + {peak - total_w:.2f} GiB (the process "
          f"with torch imported started at {r['phases'][0]['rss_gib']:.2f}); goal <= "
          f"{GOAL_GIB:.0f} GiB: {'holds' if peak <= GOAL_GIB else 'does not hold'}")
    if r["step_s"]:
        print(f"UNet steps after the first: {', '.join(f'{s:.1f}' for s in r['step_s'])} s")
    print(f"image {' x '.join(map(str, r['shape']))}, all finite: {r['finite']}, std {r['std']:.3f}; "
          f"ru_maxrss at the end {r['phases'][-1]['ru_maxrss_gib']:.2f} GiB, at the child's start "
          f"{r['phases'][0]['ru_maxrss_gib']:.2f} GiB (it includes the parent's peak, carried through vfork + exec)")
    print(f"(wall time {wall:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2, help="DDIM steps (each is one CFG UNet call, ~10 s at 2 threads)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 512, 64 with --quick)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load", choices=("init", "checkpoint", "original"), default="init",
                   help="init: build the seeded weights in the sampling process; checkpoint / original: open them "
                        "with Pipeline.from_checkpoint from an ldmkit / original SD file a helper process wrote")
    p.add_argument("--vae-tile", type=int, default=None,
                   help="decode in tiles of this many latent pixels (Pipeline.enable_vae_tiling)")
    p.add_argument("--vae-tile-overlap", type=int, default=None,
                   help="latent pixels shared by neighbouring tiles (default: a quarter of the tile)")
    p.add_argument("--low-cpu-memory", action="store_true",
                   help="Pipeline.enable_low_cpu_memory: freed tensors go straight back to the system")
    p.add_argument("--quick", action="store_true", help="a tiny model at 64 px, 1 step (a few seconds)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--write-checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--original", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.vae_tile is not None:
        if args.vae_tile_overlap is None:
            args.vae_tile_overlap = args.vae_tile // 4
        if not 0 <= args.vae_tile_overlap < args.vae_tile:
            raise ValueError(f"--vae-tile-overlap must be in [0, --vae-tile), got {args.vae_tile_overlap}")
    if args.quick and args.load != "init":
        raise ValueError(f"--load {args.load} needs the full model: from_checkpoint builds SD's CLIP text encoder, "
                         "not --quick's tiny one")
    args.size = args.size or (64 if args.quick else 512)
    if args.size % 8:
        raise ValueError(f"--size must be a multiple of 8 (the kl-f8 autoencoder), got {args.size}")
    if args.write_checkpoint:
        write_checkpoint(args.write_checkpoint, args.quick, args.original)
        return 0
    if args.child:
        print(json.dumps(child(args)))
        return 0

    # The parent stays small (no torch): the children's memory figures are theirs alone.
    t0 = time.perf_counter()
    tiles = ["--vae-tile", str(args.vae_tile), "--vae-tile-overlap", str(args.vae_tile_overlap)]
    common = ["--steps", str(args.steps), "--size", str(args.size), "--threads", str(args.threads)] + (
        ["--quick"] if args.quick else []) + (tiles if args.vae_tile else []) + (
        ["--low-cpu-memory"] if args.low_cpu_memory else [])
    with tempfile.TemporaryDirectory() as tmp:
        extra = []
        if args.load != "init":
            ckpt = str(Path(tmp) / ("ldm.safetensors" if args.load == "checkpoint" else "sd-v1.safetensors"))
            _run([sys.executable, __file__, "--write-checkpoint", ckpt, *common]
                 + (["--original"] if args.load == "original" else []), args.threads)
            extra = ["--checkpoint", ckpt]
        out = _run([sys.executable, __file__, "--child", *common, *extra], args.threads)
    report(json.loads(out.strip().splitlines()[-1]), args, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
