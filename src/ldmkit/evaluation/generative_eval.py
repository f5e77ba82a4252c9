"""Sample-set evaluation against a reference set in a named feature space: FD, KID, IS, precision/recall.

Feature networks, by name (the report always says which one was used):
  inception  the FID Inception-v3 (models.inception) from the user's local pt_inception-2015-12-05 file:
             the only space in which the figures are called FID / IS, as papers report them
  digits     the MNIST judge CNN's penultimate features (evaluation.classifier), trained here and cached;
             figures are named FD_digits, KID_digits, ... ("classifier score" for its IS)
  photos     the photo feature net trained on the bundled photos (evaluation.photo_features): FD_photos, ...
  emoji      the image encoder of the emoji image-text contrastive model (evaluation.retrieval): FD_emoji, ...
Reference features are cached per (reference set, feature network, count) in the cache folder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .distribution_metrics import inception_score, kernel_inception_distance, precision_recall
from .frechet import feature_statistics, frechet_distance

FEATURE_NETS = ("inception", "digits", "photos", "emoji")


@dataclass
class FeatureNet:
    name: str
    suffix: str  # "" for Inception (FID, KID, IS), "_digits" etc. for in-domain spaces
    describe: str
    fn: Callable[[Tensor], tuple[Tensor, Tensor | None]]  # images [B, C, H, W] in [-1, 1] -> (features, logits)
    fingerprint: str  # identifies the weights, for the reference cache


def _fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def feature_net(name: str, cache_dir: str | Path, inception_weights: str | Path | None = None,
                progress: bool = False, train_steps: int | None = None) -> FeatureNet:
    """The named network; in-domain ones are trained on first use and cached in `cache_dir` (`train_steps`
    overrides the recipe's step count, for quick checks)."""
    cache_dir = Path(cache_dir)
    if name == "inception":
        if inception_weights is None:
            raise ValueError("features 'inception' need the FID Inception weights: pass --inception-weights "
                             "PATH (pt_inception-2015-12-05-6726825d.pth, a local file; nothing is downloaded)")
        from ..models.inception import FIDInceptionV3

        net = FIDInceptionV3.from_file(inception_weights)
        return FeatureNet("inception", "", f"FID Inception-v3 ({Path(inception_weights).name}), TF1 bilinear "
                          "resize to 299", lambda x: net(x), _fingerprint(net))
    if name == "digits":
        from ..data.mnist import mnist_tensor
        from .classifier import load_or_train_judge

        images, labels = mnist_tensor("train")
        steps = {} if train_steps is None else {"steps": train_steps}
        judge = load_or_train_judge(cache_dir / f"judge{train_steps or ''}.safetensors", images, labels,
                                    progress=progress, **steps)
        return FeatureNet("digits", "_digits", "MNIST judge CNN penultimate features (trained on MNIST train, "
                          "seed 0)", lambda x: (judge.features(x), judge(x)), _fingerprint(judge))
    if name == "photos":
        from .photo_features import load_or_train_photo_features

        photo_net = load_or_train_photo_features(cache_dir, progress=progress)
        return FeatureNet("photos", "_photos", "photo feature net trained on the bundled photos",
                          lambda x: (photo_net.features(x), None), _fingerprint(photo_net))
    if name == "emoji":
        from ..data.emoji import emoji_dataset
        from .retrieval import load_or_train_retrieval

        real = emoji_dataset(32, split="all")
        steps = {} if train_steps is None else {"steps": train_steps}
        model = load_or_train_retrieval(real.images, list(real.captions), cache_dir / "retrieval", progress=progress,
                                        **steps).eval()
        return FeatureNet("emoji", "_emoji", "image encoder of the emoji image-text contrastive model (trained "
                          "on all 1,899 emoji at 32 px)", lambda x: (model.encode_images(x), None),
                          _fingerprint(model))
    raise ValueError(f"unknown feature network {name!r}; choose one of {FEATURE_NETS}")


@torch.no_grad()
def extract(net: FeatureNet, images: Tensor, batch: int = 200) -> tuple[Tensor, Tensor | None]:
    feats, logits = [], []
    for x in images.split(batch):
        f, lg = net.fn(x)
        feats.append(f.float().cpu())
        if lg is not None:
            logits.append(lg.float().cpu())
    return torch.cat(feats), (torch.cat(logits) if logits else None)


def reference_features(net: FeatureNet, key: str, images: Callable[[], Tensor],
                       cache_dir: str | Path) -> tuple[Tensor, Tensor | None]:
    """Features of a reference set, computed once per (set, network weights) and cached as safetensors."""
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir) / f"ref_{key}_{net.name}_{net.fingerprint}.safetensors"
    if path.exists():
        t = load_file(str(path))
        return t["features"], t.get("logits")
    feats, logits = extract(net, images())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": feats, **({"logits": logits} if logits is not None else {})}, str(path))
    return feats, logits


def compare(net: FeatureNet, fake: tuple[Tensor, Tensor | None], real: tuple[Tensor, Tensor | None], *,
            kid_subsets: int = 100, kid_subset_size: int = 1000, k: int = 3, seed: int = 0) -> dict[str, float]:
    """Every metric of one sample set against one reference set, named for the feature space."""
    s = net.suffix
    (ff, fl), (rf, _) = fake, real
    out = {f"FID{s}" if not s else f"FD{s}": frechet_distance(*feature_statistics(ff), *feature_statistics(rf))}
    # subsets of at most half the smaller set: equal to the whole set, every subset would be the same (std 0)
    size = min(kid_subset_size, min(len(ff), len(rf)) // 2)
    kid, kid_std = kernel_inception_distance(rf, ff, subsets=kid_subsets, subset_size=size,
                                             generator=torch.Generator().manual_seed(seed))
    out[f"KID{s}"], out[f"KID{s}_std"] = kid, kid_std
    precision, recall = precision_recall(rf, ff, k=k)
    out[f"precision{s}"], out[f"recall{s}"] = precision, recall
    if fl is not None and len(fl) >= 10:
        is_mean, is_std = inception_score(fl, splits=10)
        name = "IS" if not s else f"classifier_score{s}"
        out[name], out[f"{name}_std"] = is_mean, is_std
    return out


def markdown_report(report: dict[str, Any]) -> str:
    """The report as a Markdown table with its protocol underneath."""
    rows = report["results"]
    names = list(dict.fromkeys(k for r in rows.values() for k in r))
    lines = ["| set | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(r.get(n)) for n in names) + " |")
    lines += ["", "Protocol:", ""] + [f"- {k}: {v}" for k, v in report["protocol"].items()]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
