"""Every conditioning task of the paper trained on this CPU, each with its measured fidelity figure.

Each task trains its small preset end to end (stage 1, then stage 2, as `ldmkit train --config PRESET` does),
then samples and measures:

  text-bert / text-minilm  caption retrieval accuracy (top-1 among 100 captions) of images generated for
                           emoji captions, scored by an image-text contrastive model trained on the real emoji
                           (`evaluation/retrieval.py`); next to it the same model on the real images (ceiling)
                           and chance (1 %)
  layout                   digit-classifier accuracy on the crops at the requested boxes of held-out layouts;
                           the same judge on the real canvases (ceiling)
  semantic                 IoU between the requested digit pixels and the samples' ink, at the training size
                           and at 2x (convolutional sampling); shuffled maps as the floor
  sr / sr-bsr / sr-photos  PSNR / SSIM of x4 samples against the originals, next to bicubic upsampling
  inpaint / inpaint-photos error inside the hole and seam error, next to a flat mean-colour fill
  img2img                  SDEdit of test digits towards the next class at strength 0.1 ... 1.0: distance
                           to the input, and how often the judge sees the input's class or the asked one

Run dirs stay under --runs, so a rerun only re-measures (delete one to retrain). A picture per task goes next
to them (`<task>.png`). The command:

    .venv/bin/python benchmarks/tasks.py [--task layout ...] [--runs runs/tasks] [--scale 1.0] [--n 200]

--scale multiplies every preset's training steps (0.1 for a quick smoke run: figures then mean little).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import torch  # noqa: E402

from ldmkit.config import load_config  # noqa: E402
from ldmkit.data.datasets import load_task_data
from ldmkit.data.images import save_grid  # noqa: E402
from ldmkit.jobs.train import train_ldm  # noqa: E402
from ldmkit.pipeline import LatentDiffusionPipeline  # noqa: E402

# tasks on the same data and autoencoder train stage 1 once: the later one adopts the earlier one's (`first_stage`)
SHARED_FIRST_STAGE = {"text-minilm": "text-bert", "sr-bsr": "sr", "inpaint": "sr",
                      "inpaint-photos": "sr-photos"}

TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "text-bert": ("emoji_text_bert", {}),
    "text-minilm": ("emoji_text_minilm", {}),
    "layout": ("mnist_layout", {}),
    "semantic": ("mnist_semantic", {}),
    "sr": ("mnist_sr", {}),
    "sr-bsr": ("mnist_sr", {"conditioning.degradation": "bsr"}),
    "sr-photos": ("photos_sr", {}),
    "inpaint": ("mnist_inpaint", {}),
    "inpaint-photos": ("photos_inpaint", {}),
    "img2img": ("mnist_demo", {}),  # the demo-size model: `make demo`'s run can be copied in as runs/tasks/img2img
}


def trained(task: str, runs: Path, scale: float) -> tuple[LatentDiffusionPipeline, Any, float]:
    preset, extra = TASKS[task]
    cfg = load_config(preset, extra)
    overrides = dict(extra)
    if scale != 1.0:
        overrides["train_autoencoder.steps"] = max(10, int(cfg.train_autoencoder.steps * scale))
        overrides["train_diffusion.steps"] = max(10, int(cfg.train_diffusion.steps * scale))
    run = runs / task
    donor = runs / SHARED_FIRST_STAGE.get(task, task) / "autoencoder.safetensors"
    if task in SHARED_FIRST_STAGE and donor.exists():
        overrides["first_stage"] = str(donor)
    t0 = time.perf_counter()
    train_ldm(preset, run, overrides=overrides, progress=False, log=lambda *a: None)
    seconds = max(time.perf_counter() - t0, logged_seconds(run))
    pipe = LatentDiffusionPipeline.from_pretrained(run)
    pipe.cfg.sampling = load_config(preset, overrides).sampling  # sample as the preset says now
    return pipe, load_task_data(load_config(preset, overrides), "test"), seconds


def logged_seconds(run: Path) -> float:
    """Training time of a finished run from its logs (a rerun that only re-measures still reports it)."""
    total = 0.0
    for name in ("autoencoder_log.jsonl", "ldm_log.jsonl"):
        if (run / name).exists():
            lines = (run / name).read_text().splitlines()
            total += json.loads(lines[-1])["seconds"] if lines else 0.0
    return total


def sample(pipe: LatentDiffusionPipeline, batch: int = 100, **kw: Any) -> torch.Tensor:
    return pipe.sample(batch_size=batch, seed=0, **kw)


def measure_text(pipe: LatentDiffusionPipeline, n: int, runs: Path) -> tuple[dict[str, float], torch.Tensor]:
    from ldmkit.data.emoji import emoji_dataset
    from ldmkit.evaluation.retrieval import caption_retrieval_accuracy, load_or_train_retrieval

    real = emoji_dataset(pipe.resolution, split="all")
    judge = load_or_train_retrieval(real.images, list(real.captions), runs / "retrieval")
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(real.captions), generator=g)[:n]
    captions = [real.captions[i] for i in idx]
    images = sample(pipe, prompt=captions)
    acc = caption_retrieval_accuracy(judge, images, captions, candidates=list(real.captions),
                                     generator=torch.Generator().manual_seed(1))
    ceiling = caption_retrieval_accuracy(judge, real.images[idx], captions, candidates=list(real.captions),
                                         generator=torch.Generator().manual_seed(1))
    return {"retrieval_top1": acc, "real_emoji_top1": ceiling, "chance": 0.01}, images


def _judge(runs: Path) -> torch.nn.Module:
    from ldmkit.data.mnist import mnist_tensor
    from ldmkit.evaluation.classifier import load_or_train_judge

    x, y = mnist_tensor("train")
    return load_or_train_judge(runs / "judge.safetensors", x, y, progress=False)


def measure_layout(pipe: LatentDiffusionPipeline, data: Any, n: int, runs: Path) -> tuple[dict[str, float], Any]:
    from ldmkit.evaluation.layout_eval import box_digit_accuracy

    judge = _judge(runs)
    lays = data.layouts[:n]
    images = sample(pipe, layout=lays)
    return {"box_accuracy": box_digit_accuracy(images, lays, judge),
            "real_canvas_accuracy": box_digit_accuracy(data.images[:n], lays, judge), "chance": 0.1}, images


def measure_semantic(pipe: LatentDiffusionPipeline, data: Any, n: int) -> tuple[dict[str, float], Any]:
    from ldmkit.evaluation.layout_eval import segmap_iou

    seg = data.segmaps[:n]
    images = sample(pipe, segmap=seg)
    s = seg.shape[-1]
    big = torch.zeros(n // 4, 2 * s, 2 * s, dtype=torch.long)  # four maps side by side: a 2x canvas
    for i in range(n // 4):
        big[i, :s, :s], big[i, :s, s:], big[i, s:, :s], big[i, s:, s:] = seg[4 * i: 4 * i + 4]
    images2x = sample(pipe, segmap=big)
    return {"iou": segmap_iou(images, seg), "iou_2x": segmap_iou(images2x, big),
            "iou_shuffled_maps": segmap_iou(images, seg.roll(1, 0))}, images


def measure_sr(pipe: LatentDiffusionPipeline, data: Any, n: int, degradation: str) -> tuple[dict[str, float], Any]:
    from ldmkit.data.degradations import bicubic_downsample, bsr_degrade
    from ldmkit.evaluation.restoration import bicubic_baseline, sr_scores

    hr = data.images[:n]
    f = pipe.cfg.conditioning.sr_factor
    g = torch.Generator().manual_seed(0)
    low = bsr_degrade(hr, f, generator=g) if degradation == "bsr" else bicubic_downsample(hr, f)
    images = sample(pipe, lowres=low)
    ours, bic = sr_scores(images, hr), bicubic_baseline(low, hr, f)
    # a sample is one plausible image, not the MMSE estimate PSNR rewards: the mean of 4 samples approaches it;
    # the autoencoder's own reconstruction bounds what any latent sample can reach
    mean4 = torch.stack([images] + [pipe.sample(lowres=low, batch_size=100, seed=s) for s in (1, 2, 3)]).mean(0)
    with torch.no_grad():
        recon = pipe.codec.decode(pipe.codec.encode(hr)).clamp(-1, 1)
    m4, ae = sr_scores(mean4, hr), sr_scores(recon, hr)
    return {"psnr": ours["psnr"], "ssim": ours["ssim"], "psnr_mean_of_4": m4["psnr"], "ssim_mean_of_4": m4["ssim"],
            "bicubic_psnr": bic["psnr"], "bicubic_ssim": bic["ssim"], "autoencoder_psnr": ae["psnr"]}, \
        torch.cat([images[:8], mean4[:8], hr[:8]])


def measure_inpaint(pipe: LatentDiffusionPipeline, data: Any, n: int, runs: Path) -> tuple[dict[str, float], Any]:
    from ldmkit.data.masks import random_mask
    from ldmkit.evaluation.restoration import hole_error, seam_error

    x = data.images[:n]
    mask = random_mask("mixed", n, x.shape[2], x.shape[3], generator=torch.Generator().manual_seed(0))
    images = sample(pipe, image=x, mask=mask)
    flat = x * (1 - mask) + mask * x.mean(dim=(2, 3), keepdim=True)
    out = {"hole_l1": hole_error(images, x, mask), "seam": seam_error(images, mask, target=x),
           "flat_fill_hole_l1": hole_error(flat, x, mask), "flat_fill_seam": seam_error(flat, mask, target=x)}
    if data.labels is not None and x.shape[1] == 1 and x.shape[-1] == 32:  # MNIST: is the digit completed?
        judge = _judge(runs)
        with torch.no_grad():
            for name, imgs in (("judge_acc_inpainted", images), ("judge_acc_flat_fill", flat),
                               ("judge_acc_original", x)):
                out[name] = float((judge(imgs).argmax(1) == data.labels[:n]).float().mean())
    return out, torch.cat([(x * (1 - mask))[:8], images[:8], x[:8]])


def measure_img2img(pipe: LatentDiffusionPipeline, n: int, runs: Path) -> tuple[dict[str, float], Any]:
    """SDEdit's trade-off: test digits of class y re-drawn as class y + 1 (mod 10) at strength 0.1 ... 1.0.
    Low strength keeps the input (small distance, judged y); full strength draws the asked class from noise."""
    from ldmkit.data.mnist import mnist_tensor

    judge = _judge(runs)
    x, y = mnist_tensor("test")
    x, y = x[:n], y[:n]
    target = (y + 1) % 10
    out, shown = {}, [x[:8]]
    for s in (0.1, 0.2, 0.3, 0.6, 1.0):
        images = sample(pipe, class_label=target.tolist(), image=x, strength=s, guidance=3.0)
        with torch.no_grad():
            pred = judge(images).argmax(1)
        out[f"l1_to_input_strength_{s}"] = float((images - x).abs().mean())
        out[f"judged_input_class_strength_{s}"] = float((pred == y).float().mean())
        out[f"judged_asked_class_strength_{s}"] = float((pred == target).float().mean())
        shown.append(images[:8])
    return out, torch.cat(shown)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", action="append", choices=sorted(TASKS), help="default: all")
    p.add_argument("--runs", type=Path, default=Path("runs/tasks"))
    p.add_argument("--scale", type=float, default=1.0, help="multiply the presets' training steps")
    p.add_argument("--n", type=int, default=200, help="samples measured per task")
    args = p.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    results = {}
    for task in args.task or list(TASKS):
        pipe, data, seconds = trained(task, args.runs, args.scale)
        t0 = time.perf_counter()
        if task.startswith("text"):
            figures, shown = measure_text(pipe, min(args.n, 100), args.runs)
        elif task == "layout":
            figures, shown = measure_layout(pipe, data, args.n, args.runs)
        elif task == "semantic":
            figures, shown = measure_semantic(pipe, data, args.n)
        elif task.startswith("sr"):
            figures, shown = measure_sr(pipe, data, args.n, pipe.cfg.conditioning.degradation)
        elif task.startswith("inpaint"):
            figures, shown = measure_inpaint(pipe, data, args.n, args.runs)
        else:
            figures, shown = measure_img2img(pipe, args.n, args.runs)
        save_grid(shown[:64], args.runs / f"{task}.png", nrow=8, scale=2)
        results[task] = {"preset": TASKS[task][0], "train_s": round(seconds),
                         "measure_s": round(time.perf_counter() - t0), **{k: round(v, 4) for k, v in figures.items()}}
        print(json.dumps({task: results[task]}), flush=True)
    path = args.runs / "results.json"  # earlier tasks' figures stay: a run may measure one task
    merged = {**(json.loads(path.read_text()) if path.exists() else {}), **results}
    path.write_text(json.dumps(merged, indent=2))
    print("\n| task | preset | train (s) | figures |\n|---|---|---|---|")
    for task, r in results.items():
        figs = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("preset", "train_s", "measure_s"))
        print(f"| {task} | {r['preset']} | {r['train_s']} | {figs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
