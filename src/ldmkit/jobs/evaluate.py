"""`ldmkit eval`: sample a run, then score the samples against a reference set (FD/FID, KID, IS, P/R).

The protocol, written into every report:
  samples     n images, in batches of `batch`; batch b uses seed `seed + b` (so an interrupted evaluation
              resumes where it stopped and ends with the same images); class-conditional models get the
              classes 0, 1, ..., K-1 in turn (balanced); saved as PNGs and as one `samples.npz` (uint8
              [N, H, W, C] plus the class labels), as the reference's sample_diffusion.py writes them
  sampler     as given (default: the run's sampling config), with its steps, eta and guidance
  reference   "test" (the held-out split of the run's dataset), "train", or a folder of images; min(n, size)
              images; their features are cached per feature network
  features    see evaluation.generative_eval: Inception figures are FID/KID/IS; in-domain ones carry the
              network's name (FD_digits, ...)
  metrics     FD / FID on all samples; KID: mean and std of the unbiased MMD^2 over 100 subsets of
              min(1000, n / 2); precision / recall with k = 3; conditional accuracy by the MNIST judge for
              class-conditional MNIST models
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..data.images import to_uint8
from ..evaluation.generative_eval import compare, extract, feature_net, markdown_report, reference_features
from ..pipeline import LatentDiffusionPipeline


def default_cache_dir() -> Path:
    return Path(os.environ.get("LDMKIT_CACHE", Path.home() / ".cache" / "ldmkit")) / "eval"


def sample_to_folder(pipe: LatentDiffusionPipeline, out_dir: Path, n: int, *, batch: int = 100, seed: int = 0,
                     options: dict[str, Any] | None = None, log: Any = print) -> tuple[Tensor, Tensor | None]:
    """n samples as out_dir/000000.png ... and out_dir/samples.npz; batches already on disk are kept (resume)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    k = pipe.n_classes
    labels = torch.arange(n) % k if k else None
    for b, start in enumerate(range(0, n, batch)):
        stop = min(n, start + batch)
        if all((out_dir / f"{i:06d}.png").exists() for i in range(start, stop)):
            continue  # written by an earlier, interrupted evaluation
        classes = labels[start:stop].tolist() if labels is not None else None
        x = pipe.sample(class_label=classes, n=1 if classes else stop - start, batch_size=batch, seed=seed + b,
                        **(options or {}))
        for i, arr in zip(range(start, stop), to_uint8(x), strict=True):
            tmp = out_dir / f"{i:06d}.png.tmp"
            Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(tmp, format="PNG")
            tmp.replace(out_dir / f"{i:06d}.png")  # a half-written PNG never counts as done
        log(f"samples: {stop}/{n}")
    arrays = np.stack([np.asarray(Image.open(out_dir / f"{i:06d}.png")) for i in range(n)])
    if arrays.ndim == 3:
        arrays = arrays[..., None]  # [N, H, W] -> [N, H, W, 1]
    if labels is not None:
        np.savez(out_dir / "samples.npz", arr_0=arrays, labels=labels.numpy())
    else:
        np.savez(out_dir / "samples.npz", arr_0=arrays)
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1  # what the PNGs hold
    return images, labels


def reference_images(pipe: LatentDiffusionPipeline, reference: str, n: int) -> Tensor:
    """`reference` images at the run's resolution: "test" / "train" split of its dataset, or a folder."""
    from dataclasses import replace

    from ..data.datasets import load_dataset

    cfg = pipe.cfg
    if reference in ("test", "train"):
        images, _ = load_dataset(cfg, reference)
    else:
        data = replace(cfg.data, name="folder", root=reference, limit=None)
        images, _ = load_dataset(replace(cfg, data=data), "train")
    return images[:n]


def evaluate_run(run: str | Path, out_dir: str | Path, *, n: int = 1000, features: str = "digits",
                 reference: str = "test", inception_weights: str | None = None, batch: int = 100, seed: int = 0,
                 sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
                 eta: float | None = None, cache_dir: str | Path | None = None, compare_to_train: bool = True,
                 log: Any = print) -> dict[str, Any]:
    """Sample `n` images from `run`, score them; writes report.json and report.md into `out_dir`."""
    out_dir, cache = Path(out_dir), Path(cache_dir) if cache_dir else default_cache_dir()
    if n < 20:
        raise ValueError(f"n must be at least 20 (KID subsets and precision/recall need samples), got {n}")
    pipe = LatentDiffusionPipeline.load(run)
    if pipe.conditioning not in ("none", "class"):
        raise ValueError(f"ldmkit eval samples unconditional and class-conditional models; this run is "
                         f"conditioned on {pipe.conditioning!r} (its task figures: benchmarks/tasks.py)")
    sc = pipe.cfg.sampling
    options = {"sampler": sampler or sc.sampler, "steps": steps or sc.steps,
               "guidance": sc.guidance if guidance is None else guidance, "eta": sc.eta if eta is None else eta}
    net = feature_net(features, cache, inception_weights)
    fake_images, labels = sample_to_folder(pipe, out_dir / "samples", n, batch=batch, seed=seed, options=options,
                                           log=log)
    fake = extract(net, fake_images)
    ref_key = f"{pipe.cfg.data.name}-{reference}-{pipe.resolution}-{n}" if reference in ("test", "train") \
        else f"folder-{hashlib.sha256(str(Path(reference).resolve()).encode()).hexdigest()[:12]}-{pipe.resolution}-{n}"
    real = reference_features(net, ref_key, lambda: reference_images(pipe, reference, n), cache)
    results = {"samples": compare(net, fake, real, seed=seed)}
    if compare_to_train and reference == "test":  # real train images, same count: the floor sampling noise sets
        train = reference_features(net, f"{pipe.cfg.data.name}-train-{pipe.resolution}-{n}",
                                   lambda: reference_images(pipe, "train", n), cache)
        results["real train images"] = compare(net, train, real, seed=seed)
    if labels is not None and pipe.cfg.data.name == "mnist" and net.name == "digits" and fake[1] is not None:
        results["samples"]["conditional_accuracy"] = float((fake[1].argmax(1) == labels).double().mean())
    report = {
        "results": results,
        "protocol": {
            "run": str(run), "n_samples": n, "reference": f"{reference} ({len(real[0])} images of "
                                                          f"{pipe.cfg.data.name})" if reference in ("test", "train")
            else f"folder {reference} ({len(real[0])} images)",
            "features": net.describe, "sampler": options["sampler"], "steps": options["steps"],
            "eta": options["eta"], "guidance": options["guidance"], "seeds": f"{seed} + batch index, batch {batch}",
            "classes": f"0..{pipe.n_classes - 1} in turn" if pipe.n_classes else "unconditional",
            "kid": "unbiased MMD^2, cubic polynomial kernel, 100 subsets of min(1000, n / 2)",
            "precision_recall": "Kynkaanniemi et al. 2019, k = 3",
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(markdown_report(report))
    return report
