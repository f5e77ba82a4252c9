"""VAE decode at high resolution: time and peak memory, whole vs tiled vs sliced, and the error tiling costs.

The Stable Diffusion kl-f8 autoencoder (the `sd-v1` preset's first stage, 83.7M parameters, seeded random
weights) decodes a seeded N(0, 1) latent to 512, 1024 and 2048 px. Every (size, mode) runs in a fresh child
process, so that its peak resident memory (VmHWM) is that decode's alone; the table reports the peak of the
whole process and the part added by the decode (peak minus the resident size just before it). Modes:

- whole: `LatentCodec.decode` on the full latent;
- tiled: `LatentCodec.enable_tiling(tile, overlap)`: overlapping latent tiles, blended with linear ramps;
- sliced (batch 2 only): `enable_slicing(1)`, one image per decoder call.

The tiled image is compared with the whole one: max and mean |difference| over the image, and the max inside
and outside the blend bands (a seam would show as a larger error inside them). Outputs are clamped to [-1, 1]
as the pipeline does, so errors are in units of half the pixel range.

    .venv/bin/python benchmarks/vae_decode.py [--sizes 512 1024 2048] [--tile 64] [--overlap 16] [--threads 2]
    .venv/bin/python benchmarks/vae_decode.py --quick      # a tiny autoencoder, a few seconds
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

GIB = 1024**3


def _rss_bytes() -> int:
    """This process's peak resident size (VmHWM): unlike ru_maxrss, not inherited from the parent at fork."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args: argparse.Namespace) -> None:
    import torch

    from ldmkit.config import load_config
    from ldmkit.latent import LatentCodec
    from ldmkit.models.autoencoder_kl import AutoencoderConfig, AutoencoderKL

    torch.set_num_threads(args.threads)
    if args.quick:
        cfg = AutoencoderConfig(kind="kl", double_z=True, z_channels=4, embed_dim=4, resolution=64, in_channels=3,
                                out_ch=3, ch=32, ch_mult=[1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[])
    else:
        cfg = load_config("sd-v1").autoencoder
    torch.manual_seed(0)
    codec = LatentCodec(AutoencoderKL(cfg).eval(), scale_factor=0.18215)
    f = codec.downsample_factor
    if args.mode == "tiled":
        codec.enable_tiling(args.tile, args.overlap)
    if args.mode == "sliced":
        codec.enable_slicing(1)
    z = torch.randn(args.batch, codec.latent_channels, args.size // f, args.size // f,
                    generator=torch.Generator().manual_seed(1))
    before = _current_rss()
    t0 = time.perf_counter()
    with torch.inference_mode():
        x = codec.decode(z).clamp(-1, 1)
    seconds = time.perf_counter() - t0
    peak = _rss_bytes()
    torch.save(x, args.out)
    Path(args.out + ".json").write_text(json.dumps({"seconds": seconds, "peak": peak, "before": before}))


def run_child(size: int, mode: str, batch: int, args: argparse.Namespace, out: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", "--size", str(size), "--mode", mode, "--batch", str(batch),
           "--tile", str(args.tile), "--overlap", str(args.overlap), "--threads", str(args.threads), "--out", out]
    if args.quick:
        cmd.append("--quick")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rc = subprocess.run(cmd, env=env).returncode
    if rc == -9:  # SIGKILL: the kernel's out-of-memory killer (the whole 2048 px decode on a 24 GB machine)
        return {"killed": True}
    if rc != 0:
        raise SystemExit(f"the {size} px {mode} decode failed (exit {rc})")
    return json.loads(Path(out + ".json").read_text())


def seam_bands(size: int, f: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Pixel intervals [a, b) along one axis where two tiles are blended."""
    from ldmkit.latent_tiling import tile_layout

    starts, side = tile_layout(size // f, tile, overlap)
    return [(b * f, (a + side) * f) for a, b in zip(starts, starts[1:], strict=False)]


def compare(whole, tiled, size: int, f: int, tile: int, overlap: int) -> dict[str, float]:  # noqa: ANN001
    import torch

    diff = (whole - tiled).abs()  # (B, C, H, W)
    band = torch.zeros(size, dtype=torch.bool)
    for a, b in seam_bands(size, f, tile, overlap):
        band[a:b] = True
    in_band = band[:, None] | band[None, :]  # (H, W): a blend band along either axis
    return {
        "max": diff.max().item(),
        "mean": diff.mean().item(),
        "max_band": diff[..., in_band].max().item() if in_band.any() else 0.0,
        "max_off": diff[..., ~in_band].max().item() if (~in_band).any() else 0.0,
        "std": whole.std().item(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--tile", type=int, default=64, help="latent pixels per tile side (64 = 512 px)")
    p.add_argument("--overlap", type=int, default=16, help="latent pixels shared by neighbouring tiles")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--whole-max", type=int, default=2048, help="largest size also decoded whole (slow, big)")
    p.add_argument("--quick", action="store_true", help="a tiny autoencoder at 64 / 128 px")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    import torch

    if args.quick:
        args.sizes, args.tile, args.overlap = [64, 128], 4, 2
    f = 8
    rows, errors = [], []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            runs = {}
            for mode in (["whole"] if size <= args.whole_max else []) + ["tiled"]:
                out = str(Path(tmp) / f"{size}_{mode}.pt")
                r = run_child(size, mode, 1, args, out)
                rows.append((f"{size} x {size}", mode, 1, r))
                if "killed" not in r:
                    runs[mode] = {**r, "x": torch.load(out)}
            if "whole" in runs and "tiled" in runs:
                errors.append((size, compare(runs["whole"]["x"], runs["tiled"]["x"], size, f, args.tile,
                                             args.overlap)))
        size = 64 if args.quick else 512  # slicing: a batch of 2 at the everyday size
        for mode in ("whole", "sliced"):
            out = str(Path(tmp) / f"b2_{mode}.pt")
            rows.append((f"{size} x {size}", mode, 2, run_child(size, mode, 2, args, out)))

    print(f"\nVAE decode, {'tiny autoencoder' if args.quick else 'SD kl-f8 (83.7M parameters)'}, fp32, "
          f"{args.threads} threads; tiles of {args.tile} latent px ({args.tile * f} px), overlap {args.overlap} "
          f"({args.overlap * f} px)\n")
    print("| image | mode | batch | decode (s) | peak RSS (GiB) | added by the decode (GiB) |")
    print("|---|---|---|---|---|---|")
    for image, mode, batch, r in rows:
        if "killed" in r:
            print(f"| {image} | {mode} | {batch} | killed: out of memory | - | - |")
            continue
        print(f"| {image} | {mode} | {batch} | {r['seconds']:.1f} | {r['peak'] / GIB:.2f} | "
              f"{(r['peak'] - r['before']) / GIB:.2f} |")
    print("\nTiled vs whole (output clamped to [-1, 1]):\n")
    print("| image | max abs diff | mean abs diff | max in blend bands | max elsewhere | output std |")
    print("|---|---|---|---|---|---|")
    for size, e in errors:
        print(f"| {size} x {size} | {e['max']:.3f} | {e['mean']:.4f} | {e['max_band']:.3f} | {e['max_off']:.3f} | "
              f"{e['std']:.3f} |")
    peak_1024 = [r["peak"] for image, mode, batch, r in rows
                 if image.startswith("1024 ") and batch == 1 and "killed" not in r]
    if peak_1024:
        worst = max(peak_1024) / GIB
        print(f"\ngoal '1024 px decode within 6 GiB': {'holds' if worst <= 6 else 'does not hold'} "
              f"(worst mode {worst:.2f} GiB peak RSS)")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
