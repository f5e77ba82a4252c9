"""Latent vs pixel space (LDM paper, Fig. 6) on MNIST: quality against training time for f = 1, 2, 4, 8.

For each downsampling factor f a class-conditional diffusion model trains on the same CPU-time budget and is
measured at 1/8, 1/4, 1/2 and all of it. f = 1 is pixel space (`IdentityFirstStage`); f = 2, 4, 8 are the KL
autoencoders `kl-f{2,4,8}-mnist` (2 x 16 x 16, 3 x 8 x 8, 4 x 4 x 4 latents: the paper's channel widths),
pretrained once and cached under `--out`. As in the paper, their pretraining time is reported separately.

Budget = process CPU time (`time.process_time`, summed over threads) of the diffusion training steps alone.
Other processes on the machine do not eat into it at one thread (see Threads below); wall time is recorded
too. Evaluation is not counted.
Recipe (mnist_demo's, for every f): batch 128, AdamW lr 1e-3 after a 50-step linear warm-up, then constant (a
time budget fixes no step count for a cosine decay), EMA 0.999 (sampled), 10 % labels dropped for guidance.

The UNet is the same for every f except its input/output channels and its number of levels: mnist_demo's UNet
(32 channels, 2 ResBlocks per level, cross-attention on a learned class token, 32-channel heads), halving the
latent down to 4 x 4 (at least two levels, as mnist_demo's f = 4 model). Every level has 32 channels except the
deepest (64); cross-attention sits at 4 x 4 and in the middle block. So f = 1 gets levels 1-1-1-2, f = 2 1-1-2,
f = 4 and f = 8 1-2. The paper also adds levels at low width for larger inputs (its LDM-1 ... LDM-32 have
391-396M parameters); here they have 1.78M, 1.62M, 1.45M and 1.12M for f = 1, 2, 4, 8, while the forward
compute per sample is 0.411, 0.129, 0.058 and 0.015 GFLOPs: 27x from pixels to f = 8, which is the point.

Measured at each point, with the EMA weights: conditional accuracy (the judge CNN's share of samples of the
asked class) and FD, the Frechet distance of judge features of the samples to the real MNIST test set. The
samples: `--per-class` per class, DDIM 50 steps, eta 1, guidance 3 (mnist_demo's sampler), one fixed seed.
Then the goal: the training time at which f = 4 first reaches the pixel model's final FD (and accuracy), as
a share of the pixel model's training time; it holds at <= 1/4.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/latent_vs_pixel.py                 # 60 CPU-s per f
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latent_vs_pixel.py --budget 300    # longer; busy machine
    .venv/bin/python benchmarks/latent_vs_pixel.py --quick --out /tmp/lvp          # smoke test, seconds

Threads: process CPU time is load-proof only at one thread. With two OpenMP threads on a machine that other
processes share, the waiting thread spins, and that spinning counts as CPU time: a pixel-space training step
measured 11 CPU s there against 2.9 CPU s at one thread. On a shared machine run with OMP_NUM_THREADS=1
(or --threads 1); the script warns when it runs on more.

Reruns reuse the cached autoencoders and the finished f's (`--out`, keyed by their settings). The PNG
(`--plot`, default docs/latent_vs_pixel.png) shows FD and accuracy against training CPU time, drawn with PIL.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.flop_counter import FlopCounterMode

from ldmkit.conditioning.sources import TokenCondition
from ldmkit.config import LDMConfig, load_config, load_first_stage_run, to_dict
from ldmkit.data.mnist import mnist_tensor
from ldmkit.diffusion import diffusion_loss
from ldmkit.evaluation.classifier import DigitClassifier, load_or_train_judge, predict
from ldmkit.evaluation.frechet import feature_statistics, frechet_distance
from ldmkit.jobs.demo import autoencoder_psnr
from ldmkit.jobs.train import choose_scale_factor
from ldmkit.latent import LatentCodec
from ldmkit.ldm.build import LDMParts, build_conditioner, build_schedule, build_unet
from ldmkit.ldm.conditioned_unet import ConditionedUNet
from ldmkit.models.identity import IdentityFirstStage, identity_config
from ldmkit.pipeline import LatentDiffusionPipeline
from ldmkit.training.autoencoder import train_autoencoder
from ldmkit.training.diffusion import draw_latents, encode_moments
from ldmkit.training.ema import EMA
from ldmkit.training.loop import draw_batch, lr_at, seeded_init, set_lr

FACTORS = {1: None, 2: "kl-f2-mnist", 4: "kl-f4-mnist", 8: "kl-f8-mnist"}  # f -> first-stage preset
FRACTIONS = (0.125, 0.25, 0.5, 1.0)  # evaluation points, shares of the budget
GOAL_SHARE = 0.25


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def unet_layout(latent_size: int) -> tuple[list[int], list[int]]:
    """(channel_mult, attention_resolutions): halve down to 4 x 4 (at least two levels), 64 channels at the
    deepest level and 32 above it, cross-attention at 4 x 4 (plus the middle block)."""
    levels = max(2, int(math.log2(max(latent_size // 4, 1))) + 1)
    return [1] * (levels - 1) + [2], [max(latent_size // 4, 1)]


def ldm_config(f: int, ae_cfg: Any, args: argparse.Namespace) -> LDMConfig:
    """mnist_demo with this f's first stage and UNet; pixel space runs at scale factor 1 (images in [-1, 1])."""
    size = 32 // f
    mult, attn = unet_layout(size)
    c = ae_cfg.embed_dim
    over: dict[str, Any] = {
        "autoencoder": to_dict(ae_cfg), "unet.image_size": size, "unet.in_channels": c, "unet.out_channels": c,
        "unet.channel_mult": mult, "unet.attention_resolutions": attn, "scale_factor": 1.0 if f == 1 else None,
        "train_diffusion.batch_size": args.batch_size, "train_diffusion.warmup_steps": args.warmup,
        "train_diffusion.tensorboard": False,
    }
    if args.quick:  # 2 DDIM steps, below
        over["sampling.steps"] = 2
    return load_config("mnist_demo", over)


def first_stage(f: int, args: argparse.Namespace, train_x: torch.Tensor, test_x: torch.Tensor,
                log: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """f's first stage, trained once into <out>/ae/<preset>-<key> (reused afterwards), and its figures."""
    preset = FACTORS[f]
    if preset is None:
        return IdentityFirstStage(identity_config(1, 32)), {"preset": "identity", "psnr_db": None, "cpu_s": 0.0,
                                                             "wall_s": 0.0}
    over = {"train_autoencoder.steps": args.ae_steps, "train_autoencoder.batch_size": args.ae_batch,
            "train_autoencoder.tensorboard": False, "train_autoencoder.checkpoint_every": max(1, args.ae_steps // 2)}
    cfg = load_first_stage_run(preset, over)
    run = Path(args.out) / "ae" / f"{preset}-{_key(to_dict(cfg))}"
    info_path = run / "info.json"
    if info_path.exists():
        return train_autoencoder(cfg, train_x, run, progress=False), json.loads(info_path.read_text())
    c0, w0 = time.process_time(), time.perf_counter()
    ae = train_autoencoder(cfg, train_x, run, progress=False)  # resumes its own checkpoints when interrupted
    info = {"preset": preset, "steps": args.ae_steps, "batch": args.ae_batch,
            "cpu_s": round(time.process_time() - c0, 1), "wall_s": round(time.perf_counter() - w0, 1),
            "psnr_db": round(autoencoder_psnr(LatentCodec(ae), test_x[: 16 if args.quick else 1000]), 2)}
    info_path.write_text(json.dumps(info, indent=2))
    log(f"f={f}: autoencoder {preset}, {args.ae_steps} steps of {args.ae_batch}: {info['cpu_s']:.0f} CPU s, "
        f"PSNR {info['psnr_db']:.2f} dB on test images")
    return ae, info


def unet_gflops(net: torch.nn.Module, shape: tuple[int, int, int]) -> float:
    """Forward GFLOPs of the denoiser (UNet + class embedding) for one sample, one timestep."""
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(torch.zeros(1, *shape), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    return fc.get_total_flops() / 1e9


class Judge:
    """Conditional accuracy and FD (judge features of samples vs the real test set) of a set of samples."""

    def __init__(self, model: torch.nn.Module, test_x: torch.Tensor) -> None:
        self.model = model
        with torch.no_grad():
            self.real = feature_statistics(torch.cat([model.features(x) for x in test_x.split(1000)]))

    def __call__(self, samples: torch.Tensor, classes: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            fd = frechet_distance(*feature_statistics(self.model.features(samples)), *self.real)
        return fd, (predict(self.model, samples) == classes).double().mean().item()


def train_on_budget(cfg: LDMConfig, codec: LatentCodec, latents: torch.Tensor, labels: torch.Tensor,
                    budget: float, measure: Any, log: Any) -> tuple[list[dict[str, Any]], ConditionedUNet]:
    """Train stage 2 until `budget` CPU seconds of training steps; measure the EMA model at each FRACTIONS point.

    `latents`: posterior moments [N, 2C, h, w] (KL) or the latents themselves [N, C, h, w] (pixels).
    """
    tc = cfg.train_diffusion
    schedule = build_schedule(cfg)
    net = seeded_init(tc.seed, lambda: ConditionedUNet(build_unet(cfg), build_conditioner(cfg), "crossattn")).train()
    ema = EMA(net, tc.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
    source = TokenCondition(labels, torch.tensor(cfg.conditioning.n_classes), tc.cond_drop_prob)
    points: list[dict[str, Any]] = []
    cpu = wall = 0.0
    step = 0
    for frac in FRACTIONS:
        while cpu < frac * budget:
            c0, w0 = time.process_time(), time.perf_counter()
            # constant after warm-up: the total step count is not known in advance
            set_lr(opt, lr_at(step, tc.warmup_steps + 1, tc.lr, tc.warmup_steps, 1.0))
            gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)  # this step's data and noise
            idx = draw_batch(len(latents), tc.batch_size, gen)
            z = codec.scale(draw_latents(latents[idx], codec.latent_channels, gen))  # [B, C, h, w]
            loss = diffusion_loss(net, z, schedule, cond=source.batch(idx, gen), generator=gen,
                                  parameterization=cfg.parameterization)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
            opt.step()
            ema.update(net)
            step += 1
            cpu += time.process_time() - c0
            wall += time.perf_counter() - w0
        c0, t0 = time.process_time(), time.perf_counter()
        fd, acc = measure(ema.model)
        points.append({"fraction": frac, "step": step, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
                       "fd": round(fd, 2), "accuracy": round(acc, 4), "loss": round(loss.item(), 4),
                       "eval_cpu_s": round(time.process_time() - c0, 1),
                       "eval_wall_s": round(time.perf_counter() - t0, 1)})
        log(f"  {frac:>5.3f} of the budget: step {step}, {cpu:.1f} CPU s, loss {loss.item():.4f}, FD {fd:.1f}, "
            f"accuracy {acc:.1%} (measured in {points[-1]['eval_wall_s']:.0f} s)")
    return points, ema.model


def run_factor(f: int, args: argparse.Namespace, data: dict[str, torch.Tensor], judge: Judge,
               log: Any) -> dict[str, Any]:
    """Pretrain (or reuse) f's first stage, train stage 2 on the budget, measure; cached per settings."""
    ae, ae_info = first_stage(f, args, data["train_x"], data["test_x"], log)
    cfg = ldm_config(f, ae.config, args)
    settings = {"cfg": to_dict(cfg), "ae": ae_info, "budget": args.budget, "per_class": args.per_class,
                "fractions": FRACTIONS, "threads": torch.get_num_threads(), "n_train": len(data["train_x"])}
    path = Path(args.out) / "diffusion" / f"f{f}-{_key(settings)}.json"
    if path.exists():
        log(f"f={f}: reusing {path}")
        return json.loads(path.read_text())
    codec = LatentCodec(ae.eval())
    # the identity's posterior is a point mass: its latents are the images themselves (no [N, 2C] moments)
    latents = data["train_x"] if f == 1 else encode_moments(codec, data["train_x"])
    codec.scale_factor = choose_scale_factor(cfg, latents, codec.latent_channels)
    shape = codec.latent_shape(32)
    sc = cfg.sampling
    classes = [c for c in range(10) for _ in range(args.per_class)]

    def measure(model: ConditionedUNet) -> tuple[float, float]:
        parts = LDMParts(model.unet, ae, model.conditioner, build_schedule(cfg))
        pipe = LatentDiffusionPipeline(cfg, parts, codec.scale_factor)
        samples = pipe.sample(class_label=classes, steps=sc.steps, guidance=sc.guidance, eta=sc.eta, seed=args.seed)
        return judge(samples.clamp(-1, 1), torch.tensor(classes))

    log(f"f={f}: latent {shape}, scale factor {codec.scale_factor:.4f}, training {args.budget:g} CPU s")
    points, net = train_on_budget(cfg, codec, latents, data["train_y"], args.budget, measure, log)
    result = {"f": f, "latent_shape": list(shape), "first_stage": ae_info, "scale_factor": codec.scale_factor,
              "unet_params_m": round(sum(p.numel() for p in net.unet.parameters()) / 1e6, 3),
              "gflops_per_sample": round(unet_gflops(net, shape), 4),
              "channel_mult": list(cfg.unet.channel_mult), "points": points, "threads": torch.get_num_threads()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def first_reaching(points: list[dict[str, Any]], key: str, target: float,
                   lower_is_better: bool) -> tuple[float | None, float | None]:
    """(measured, interpolated) CPU seconds at which `key` first gets at least as good as `target`.

    measured: the first evaluation point that does it (an upper bound; None: never). interpolated: where the
    line between that point and the one before crosses the target (FD interpolated in log), the plot's reading.
    """
    def ok(v: float) -> bool:
        return v <= target if lower_is_better else v >= target

    def fy(v: float) -> float:
        return math.log(max(v, 1e-9)) if key == "fd" else v

    for i, p in enumerate(points):
        if ok(p[key]):
            if i == 0:
                return p["cpu_s"], p["cpu_s"]
            a, b = points[i - 1], p
            span = fy(b[key]) - fy(a[key])
            share = (fy(target) - fy(a[key])) / span if span else 1.0
            return p["cpu_s"], a["cpu_s"] + min(max(share, 0.0), 1.0) * (b["cpu_s"] - a["cpu_s"])
    return None, None


def goal(results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """When f = 4 first matches the pixel model's final FD and accuracy, as a share of the pixel training time.

    It holds when the measured share (an upper bound) is <= 1/4 for both; `holds_interpolated` when the
    interpolated crossing is (the measured points are 1/8, 1/4, ... of the budget, each a step or so past it,
    so a crossing at exactly the 1/4 point reads as 0.251).
    """
    pixel, latent = results[1]["points"], results[4]["points"]
    total = pixel[-1]["cpu_s"]
    out: dict[str, Any] = {"pixel_cpu_s": total}
    for key, lower in (("fd", True), ("accuracy", False)):
        t, t_est = first_reaching(latent, key, pixel[-1][key], lower)
        share = None if t is None else t / total
        share_est = None if t_est is None else t_est / total
        out[key] = {"pixel_final": pixel[-1][key], "f4_cpu_s": t, "share": share, "share_interpolated": share_est,
                    "holds": share is not None and share <= GOAL_SHARE,
                    "holds_interpolated": share_est is not None and share_est <= GOAL_SHARE}
    out["holds"] = out["fd"]["holds"] and out["accuracy"]["holds"]
    out["holds_interpolated"] = out["fd"]["holds_interpolated"] and out["accuracy"]["holds_interpolated"]
    return out


def table(results: dict[int, dict[str, Any]]) -> str:
    head = ("| f | latent | UNet params | GFLOPs / sample | AE pretraining (CPU s) | AE PSNR | steps | CPU s | "
            "wall s | FD | accuracy |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for f, r in sorted(results.items()):
        fs = r["first_stage"]
        psnr = "exact" if fs["psnr_db"] is None else f"{fs['psnr_db']:.2f} dB"
        for i, p in enumerate(r["points"]):
            lead = (f"| {f} | {' x '.join(map(str, r['latent_shape']))} | {r['unet_params_m']:.2f}M | "
                    f"{r['gflops_per_sample']:.3f} | {fs['cpu_s']:.0f} | {psnr} |") if i == 0 else "| | | | | | |"
            lines.append(f"{lead} {p['step']} | {p['cpu_s']:.1f} | {p['wall_s']:.1f} | {p['fd']:.1f} | "
                         f"{p['accuracy']:.1%} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the plot

COLOURS = {1: (200, 30, 30), 2: (230, 140, 20), 4: (30, 110, 200), 8: (40, 150, 60)}


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    for name in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-9) / n))
    step *= min((m for m in (1, 2, 2.5, 5, 10) if (hi - lo) / (step * m) <= n), default=10)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], series: dict[int, list[tuple[float, float]]],
           ylabel: str, log_y: bool, percent: bool, xmax: float, ref: float | None = None) -> None:
    """One line chart in `box` (left, top, right, bottom): axes, ticks, labels, one line per f; `ref` draws a
    dashed line at the pixel model's final value (the goal's target)."""
    font, small = _font(15), _font(13)
    left, top, right, bottom = box
    ys = [y for pts in series.values() for _, y in pts]
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if percent:
        lo, hi = 0.0, 1.0
    fy = (lambda v: math.log10(max(v, 1e-6))) if log_y else (lambda v: v)
    ylo, yhi = fy(lo), fy(hi)
    if log_y and yhi - ylo < 1.0:  # at least one decade, so that the ticks can be told apart
        mid = (ylo + yhi) / 2
        ylo, yhi = mid - 0.5, mid + 0.5
    pad = 0.05 * (yhi - ylo or 1.0)
    ylo, yhi = ylo - pad, yhi + pad

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (right - left) * x / xmax, bottom - (bottom - top) * (fy(y) - ylo) / (yhi - ylo))

    draw.rectangle(box, outline=(0, 0, 0), width=1)
    for xt in _ticks(0, xmax):
        x = px(xt, lo)[0]
        draw.line([(x, bottom), (x, bottom + 5)], fill=(0, 0, 0))
        draw.line([(x, top), (x, bottom)], fill=(232, 232, 232))
        draw.text((x, bottom + 8), f"{xt:g}", fill=(0, 0, 0), font=small, anchor="mt")
    if log_y:
        decades = range(math.floor(ylo), math.ceil(yhi) + 1)
        for mantissas in ((1, 2, 5), (1, 2, 3, 5, 7), range(1, 10)):  # enough ticks for a narrow range too
            yticks = [m * 10**d for d in decades for m in mantissas if ylo <= math.log10(m * 10**d) <= yhi]
            if len(yticks) >= 3:
                break
    else:
        yticks = [t for t in _ticks(ylo, yhi) if ylo <= t <= yhi]
    for yt in yticks:
        y = px(0, yt)[1]
        draw.line([(left - 5, y), (left, y)], fill=(0, 0, 0))
        draw.line([(left, y), (right, y)], fill=(232, 232, 232))
        draw.text((left - 8, y), f"{yt:.0%}" if percent else f"{yt:g}", fill=(0, 0, 0), font=small, anchor="rm")
    draw.text(((left + right) / 2, bottom + 30), "diffusion training time (CPU seconds)", fill=(0, 0, 0), font=font,
              anchor="mt")
    draw.text(((left + right) / 2, top - 10), ylabel, fill=(0, 0, 0), font=font, anchor="mb")
    if ref is not None:
        y = px(0, ref)[1]
        for x0 in range(left, right, 12):
            draw.line([(x0, y), (min(x0 + 6, right), y)], fill=COLOURS[1], width=1)
        draw.text((right - 6, y - 4), "pixel model, final", fill=COLOURS[1], font=small, anchor="rb")
    for f, pts in sorted(series.items()):
        xy = [px(x, y) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, fill=COLOURS[f], width=3)
        for x, y in xy:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=COLOURS[f])


def plot(results: dict[int, dict[str, Any]], path: Path, title: str) -> Path:
    """FD (log scale) and conditional accuracy against training CPU time, one line per f, as a PNG."""
    w, h = 1200, 520
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    xmax = max(p["cpu_s"] for r in results.values() for p in r["points"]) * 1.04
    fd = {f: [(p["cpu_s"], p["fd"]) for p in r["points"]] for f, r in results.items()}
    acc = {f: [(p["cpu_s"], p["accuracy"]) for p in r["points"]] for f, r in results.items()}
    final = results[1]["points"][-1] if 1 in results else None
    _panel(draw, (80, 70, 570, 430), fd, "FD to the MNIST test set, judge features (lower is better; log)",
           True, False, xmax, final and final["fd"])
    _panel(draw, (690, 70, 1180, 430), acc, "conditional accuracy (higher is better)", False, True, xmax,
           final and final["accuracy"])
    draw.text((w / 2, 12), title, fill=(0, 0, 0), font=_font(17), anchor="mt")
    x = 120
    for f in sorted(results):
        draw.line([(x, 495), (x + 30, 495)], fill=COLOURS[f], width=4)
        name = "f=1 (pixel space)" if f == 1 else f"f={f} (latent {' x '.join(map(str, results[f]['latent_shape']))})"
        draw.text((x + 38, 495), name, fill=(0, 0, 0), font=_font(15), anchor="lm")
        x += 260
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=None, help="CPU seconds of diffusion training per f (60)")
    p.add_argument("--quick", action="store_true", help="tiny everything, a few seconds (CI smoke test)")
    p.add_argument("--out", default="runs/latent_vs_pixel", help="cache: autoencoders, judge, finished f's")
    p.add_argument("--plot", default=None, help="PNG (default docs/latent_vs_pixel.png; --quick: in --out)")
    p.add_argument("--judge", default=None, help="judge CNN file (default runs/demo/judge.safetensors if "
                   "present, else <out>/judge.safetensors, trained when missing)")
    p.add_argument("--factors", type=int, nargs="*", default=sorted(FACTORS), choices=sorted(FACTORS))
    p.add_argument("--per-class", type=int, default=None, help="samples per class at each evaluation (6)")
    p.add_argument("--ae-steps", type=int, default=None, help="autoencoder pretraining steps (150)")
    p.add_argument("--ae-batch", type=int, default=32)
    p.add_argument("--n-train", type=int, default=None, help="train on the first N MNIST train images (all "
                   "60,000); fewer shortens encoding them for f = 2, 4, 8, the largest cost outside the budget")
    p.add_argument("--batch-size", type=int, default=None, help="diffusion batch (128, mnist_demo's)")
    p.add_argument("--warmup", type=int, default=None, help="learning-rate warm-up steps (50)")
    p.add_argument("--seed", type=int, default=1, help="sampling seed (the same for every f and point)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS)")
    args = p.parse_args(argv)
    q = args.quick
    args.budget = args.budget if args.budget is not None else (0.4 if q else 60.0)
    args.per_class = args.per_class or (1 if q else 6)
    args.ae_steps = args.ae_steps or (2 if q else 150)
    args.ae_batch = 8 if q else args.ae_batch
    args.batch_size = args.batch_size or (8 if q else 128)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 50)
    if args.budget <= 0 or args.per_class < 1 or args.ae_steps < 1:
        raise ValueError("--budget, --per-class and --ae-steps must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo_judge = Path("runs/demo/judge.safetensors")
    if args.judge:
        judge_path = Path(args.judge)
    else:  # the demo's judge when it exists (a quick run stays inside --out)
        judge_path = demo_judge if demo_judge.exists() and not q else out / "judge.safetensors"
    plot_path = Path(args.plot) if args.plot else out / "latent_vs_pixel.png" if q else Path("docs/latent_vs_pixel.png")
    log = functools.partial(print, flush=True)  # progress shows when stdout is a file too
    w_start = time.perf_counter()

    train_x, train_y = mnist_tensor("train")
    test_x, _ = mnist_tensor("test")
    n_train = 64 if q else args.n_train or len(train_x)
    train_x, train_y = train_x[:n_train], train_y[:n_train]
    if q:
        test_x = test_x[:100]
    if q and not args.judge:  # the smoke test checks the plumbing: a seeded, untrained judge will do
        judge_model = seeded_init(0, DigitClassifier).eval()
    else:
        judge_model = load_or_train_judge(judge_path, train_x, train_y, steps=600, progress=False)
    judge = Judge(judge_model, test_x)
    n = 10 * args.per_class
    with torch.no_grad():  # the floor: real train images of the same count, against the same test set
        floor = frechet_distance(*feature_statistics(judge_model.features(train_x[-n:])), *judge.real)
    data = {"train_x": train_x, "train_y": train_y, "test_x": test_x}
    log(f"# Latent vs pixel on MNIST: {args.budget:g} CPU s of diffusion training per f, "
        f"{torch.get_num_threads()} threads\n")
    if torch.get_num_threads() > 1:
        log("warning: with more than one thread, spinning OpenMP threads count as CPU time when other processes "
            "share the cores: on a busy machine use --threads 1 (see the module docstring)\n")
    results = {f: run_factor(f, args, data, judge, log) for f in args.factors}

    print(f"\n{table(results)}\n")
    sc = load_config("mnist_demo").sampling if not q else ldm_config(1, identity_config(), args).sampling
    print(f"FD of {n} samples (DDIM {sc.steps}, eta {sc.eta:g}, guidance {sc.guidance:g}) to {len(test_x)} MNIST test "
          f"images in judge features; "
          f"{n} real train images give {floor:.1f} (the floor at this sample count). Budget: process CPU time of "
          f"the training steps ({torch.get_num_threads()} threads); AE pretraining is counted apart.")
    summary: dict[str, Any] = {"results": results, "floor_fd": floor, "budget": args.budget}
    if 1 in results and 4 in results:
        g = goal(results)
        summary["goal"] = g
        for key, name in (("fd", "FD"), ("accuracy", "accuracy")):
            r = g[key]
            when = ("never within its budget" if r["share"] is None else
                    f"by its point at {r['f4_cpu_s']:.1f} CPU s = {r['share']:.3f} of the pixel model's "
                    f"{g['pixel_cpu_s']:.1f} (interpolated: {r['share_interpolated']:.3f})")
            print(f"- f=4 reaches the pixel model's final {name} ({r['pixel_final']:g}) {when}")
        verdict = ("goal holds" if g["holds"] else
                   "goal holds by interpolation between measured points" if g["holds_interpolated"] else
                   "goal does not hold")
        print(f"\ngoal (f=4 matches the pixel model's final quality at <= 1/4 of its training time): {verdict}")
    title = f"Latent vs pixel space on MNIST: {args.budget:g} CPU s of training per f, {n} samples per point"
    print(f"plot: {plot(results, plot_path, title)}")
    summary["wall_s"] = round(time.perf_counter() - w_start, 1)
    summary["cpu_s"] = round(time.process_time(), 1)
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"total: {summary['wall_s']:.0f} s wall, {summary['cpu_s']:.0f} s process CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
