"""Stage 1 at every factor on this CPU: a small-scale counterpart of the LDM paper's Table 8.

KL f=4/8/16 and VQ f=4/8 (the `first_stage/*-photos` presets: ch 32, one ResBlock per level) train on the
same 4,096 random 32 px crops of the public-domain training photos bundled with scikit-image, each for the
same wall-clock budget. The objective is the package's stage-1 loss: L1 + KL or codebook loss. There is no
LPIPS term, because its weights cannot be downloaded here.

The patch-GAN is off by default (`--gan-after 1`). Switched on for the second half of a few-hundred-step CPU
budget (`--gan-after 0.5`), its adaptively weighted term shifted colours and stamped dot artefacts into the
reconstructions. The reference starts it only after 50k steps for exactly that reason.

Each model is measured on 512 crops of the two held-out photos, which are never trained on:
- PSNR;
- SSIM;
- reconstruction Frechet distance in the photo feature net's space (`evaluation/photo_features.py`);
- latent size.
A picture of held-out reconstructions is written next to the table.

    .venv/bin/python benchmarks/autoencoders.py [--seconds 150] [--size 32] [--gan-after 1] [--out PNG]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import torch  # noqa: E402

from ldmkit.config import load_first_stage_run  # noqa: E402
from ldmkit.data.images import save_grid  # noqa: E402
from ldmkit.data.photos import PhotoCrops  # noqa: E402
from ldmkit.evaluation.autoencoder_eval import evaluate_autoencoder, in_domain_features, reconstruct  # noqa: E402
from ldmkit.ldm.build import build_autoencoder  # noqa: E402
from ldmkit.training.autoencoder import build_first_stage_loss, first_stage_step  # noqa: E402
from ldmkit.training.loop import draw_batch, lr_at, seeded_init, set_lr  # noqa: E402

PRESETS = ["kl-f4-photos", "kl-f8-photos", "kl-f16-photos", "vq-f4-photos", "vq-f8-photos"]


def train_for(preset: str, images: torch.Tensor, seconds: float, gan_after: float,
              betas: tuple[float, float] | None = None) -> tuple[torch.nn.Module, int]:
    """Train one preset for `seconds` of wall clock; the GAN term starts once `gan_after` of it has passed."""
    cfg = load_first_stage_run(preset)
    tc = cfg.train_autoencoder
    ae = seeded_init(tc.seed, lambda: build_autoencoder(cfg)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no LPIPS weights": known, stated in the docstring
        loss_mod = build_first_stage_loss(cfg, None).train()
    loss_mod.discriminator_iter_start = 10**9  # switched on at `gan_after` of the budget below
    betas = betas or tc.betas
    opt_ae = torch.optim.Adam(ae.parameters(), lr=tc.lr, betas=betas)
    opt_d = torch.optim.Adam(loss_mod.discriminator_parameters(), lr=tc.lr, betas=betas)
    gen = torch.Generator().manual_seed(tc.seed)
    t0, step, gan = time.perf_counter(), 0, False
    # the learning rate follows the preset's warm-up + cosine schedule over the step count the budget allows,
    # estimated from the first 20 steps
    total = tc.steps
    while (elapsed := time.perf_counter() - t0) < seconds:
        if step == 20:
            total = max(int(seconds / (elapsed / 20)), 21)
        if not gan and elapsed > seconds * gan_after:
            loss_mod.discriminator_iter_start, gan = step, True
        lr = lr_at(step, total, tc.lr, min(tc.warmup_steps, total // 10), tc.lr_min_ratio)
        set_lr(opt_ae, lr)
        set_lr(opt_d, lr)
        x = images[draw_batch(len(images), tc.batch_size, gen)]
        loss, _, rec = first_stage_step(ae, loss_mod, x, step, 0, gen)
        opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        opt_ae.step()
        if gan:
            d_args = (torch.zeros(()), x, rec.detach(), 1, step) if cfg.autoencoder.kind == "vq" else (
                x, rec.detach(), None, 1, step)
            d_loss, _ = loss_mod(*d_args)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        step += 1
    return ae.eval(), step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=150.0, help="training wall-clock budget per model")
    p.add_argument("--n-train", type=int, default=4096, help="training crops")
    p.add_argument("--size", type=int, default=32, help="crop size in pixels")
    p.add_argument("--out", default="docs/ae_reconstructions.png", help="picture of held-out reconstructions")
    p.add_argument("--cache", default="runs/.cache", help="where the photo feature net is cached")
    p.add_argument("--presets", nargs="*", default=PRESETS)
    p.add_argument("--gan-after", type=float, default=1.0,
                   help="share of the budget after which the patch-GAN term starts (1 = never)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t_start = time.perf_counter()
    train = PhotoCrops("train", args.size, args.n_train, seed=0).images
    held = PhotoCrops("held_out", args.size, 512, seed=1).images
    features = in_domain_features("photos", args.cache)
    print(f"# Stage-1 autoencoders on photo crops, {args.seconds:.0f} s of training each "
          f"({torch.get_num_threads()} threads)\n")
    print(f"train: {len(train)} random {args.size} px crops of the training photos; held out: 512 crops of photos "
          "never trained on; rFD in the photo feature net's space (512 vs 512 images)\n")
    print("| model | latent (C x h x w) | pixels per latent value | steps | PSNR (dB) | SSIM | rFD | codebook use |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [held[:8]]
    for preset in args.presets:
        ae, steps = train_for(preset, train, args.seconds, args.gan_after)
        m = evaluate_autoencoder(ae, held, features)
        c, h, w = m["latent_shape"]
        ratio = 3 * args.size**2 / (c * h * w)
        usage = f"{m['codebook_usage']:.0%} of {m['codebook_size']}" if m["kind"] == "vq" else "—"
        print(f"| {preset.removesuffix('-photos')} | {c} x {h} x {w} | {ratio:.1f} | {steps} | {m['psnr_db']:.2f} | "
              f"{m['ssim']:.3f} | {m['rfd']:.2f} | {usage} |", flush=True)
        with torch.no_grad():
            rows.append(reconstruct(ae, held[:8]).clamp(-1, 1))
    grid = torch.cat(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_grid(grid, args.out, nrow=8, scale=2)
    names = ", ".join(x.removesuffix("-photos") for x in args.presets)
    print(f"\nrows of {args.out}: held-out originals, then {names}")
    print(f"total time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
