"""An in-domain feature network for photo crops, the embedding behind the photo rFD.

FID needs Inception weights, which do not exist offline.  The stand-in is a small CNN trained for
about a minute on one CPU thread to tell *which photo, and which part of it* a crop comes from: the
classes are (photo, cell of a 2x2 grid over the photo) for the bundled photos of
``ldmkit.data.photos`` (24 classes for the default 6).  ``PhotoFeatureNet.features`` is its
penultimate layer (``[B, 128]``, post-ReLU), like ``DigitClassifier.features`` for MNIST.

Why the features are meaningful for reconstructions: to separate regions of the same photo (the
fur, eye and whiskers of the cat; the suit, patch and face of the astronaut; stars vs. galaxies)
the net must encode colour, local texture and edge structure at the 64-pixel scale, which are what a
lossy autoencoder blurs, smears or recolours.  Training uses no blur, noise or colour augmentation,
so the features are not taught to ignore those degradations (and tests check that the rFD grows
with blur and noise).  The crops for training come from all photos, including the held-out ones:
the feature net is the instrument, trained once; it is the autoencoder that must never see the
held-out photos.

Limits: six photos is a tiny, specific domain (no people besides one portrait, no text, no
vehicles), so the embedding is far less general than Inception's and its values are not
comparable to FID numbers in papers, nor across feature nets trained with other settings.  It is
biased for small N like any Frechet distance; compare autoencoders with the same net (the cache
file name encodes the training settings) on the same crops.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.photos import PhotoCrops, PhotoSource, photo_sources
from ..ldm.build import load_strict
from ..ldm.checkpoint import load_checkpoint, save_checkpoint
from ..training.loop import lr_at, seeded_init

__all__ = [
    "PhotoFeatureConfig",
    "PhotoFeatureNet",
    "load_or_train_photo_features",
    "photo_feature_accuracy",
    "train_photo_features",
]

_VERSION = 1  # bump when the architecture or training recipe changes, so old cache files are not reused


@dataclass(frozen=True)
class PhotoFeatureConfig:
    """Everything that determines the trained weights (and the cache file name)."""

    size: int = 64  # crop size the net is trained on
    n_crops: int = 4096  # fixed pool of training crops
    grid: int = 2  # classes = photos x grid^2 regions
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    seed: int = 0
    widths: tuple[int, int, int] = (16, 32, 64)
    feature_dim: int = 128


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class PhotoFeatureNet(nn.Module):
    """CNN for ``[B, 3, H, W]`` crops in [-1, 1] (H, W >= 16; trained at 64) -> ``num_classes`` logits.

    64 -> 32 (strided first conv, which still sees every pixel) -> 16 -> 8 -> adaptive 4x4 average
    -> ``feature_dim`` fully connected features.  The 4x4 pooling keeps coarse layout, which the
    region classes need.
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = (16, 32, 64), feature_dim: int = 128) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            *_conv_bn_relu(3, w1, stride=2),  # 64 -> 32
            *_conv_bn_relu(w1, w2),
            nn.MaxPool2d(2),  # 32 -> 16
            *_conv_bn_relu(w2, w2),
            *_conv_bn_relu(w2, w3),
            nn.MaxPool2d(2),  # 16 -> 8
            *_conv_bn_relu(w3, w3),
            nn.AdaptiveAvgPool2d(4),  # 8 -> 4
        )
        self.fc = nn.Linear(w3 * 16, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``[B, feature_dim]``, the embedding for the reconstruction Frechet distance."""
        if x.ndim != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < 16:
            raise ValueError(f"PhotoFeatureNet expects [B, 3, H, W] images with H, W >= 16, got {tuple(x.shape)}")
        h = self.body(x.to(self.fc.weight.dtype))  # [B, w3, 4, 4]
        return F.relu(self.fc(h.flatten(1)))  # [B, feature_dim]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # [B, num_classes]


def train_photo_features(
    config: PhotoFeatureConfig = PhotoFeatureConfig(),
    sources: Sequence[PhotoSource] | None = None,
    *,
    progress: bool = False,
) -> PhotoFeatureNet:
    """Train a ``PhotoFeatureNet`` on ``config.n_crops`` crops of ``sources`` (default: all free colour photos).

    AdamW with warm-up and cosine decay, batches drawn as shuffled epochs; all randomness (crops,
    initial weights, batch order) derives from ``config.seed``, so the same config on the same
    machine and thread count gives the same weights.  Returns the model in eval mode.  The default
    300 steps take about a minute on one CPU thread.
    """
    sources = photo_sources() if sources is None else list(sources)
    g = torch.Generator().manual_seed(config.seed)
    crops = PhotoCrops("all", config.size, config.n_crops, generator=g, sources=sources, held_out=())
    images, labels = crops.images, crops.region_labels(config.grid)  # [N, 3, S, S], [N]
    num_classes = len(sources) * config.grid**2
    model = seeded_init(config.seed, lambda: PhotoFeatureNet(num_classes, config.widths, config.feature_dim))
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # no decay on BatchNorm and biases
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    warmup = max(1, min(30, config.steps // 10))
    n = images.shape[0]
    order, cursor = torch.randperm(n, generator=g), 0
    model.train()
    for step in tqdm(range(config.steps), desc="photo features", disable=not progress, leave=False):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config.steps, config.lr, warmup, 0.0)
        if cursor + config.batch_size > n:  # new epoch
            order, cursor = torch.randperm(n, generator=g), 0
        idx = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def photo_feature_accuracy(model: PhotoFeatureNet, crops: PhotoCrops, grid: int = 2) -> tuple[float, float]:
    """(photo accuracy, photo-and-region accuracy) of ``model`` on ``crops`` drawn from the photos it was trained on."""
    model.eval()
    logits = torch.cat([model(x) for x in crops.images.split(256)])  # [N, classes]
    pred = logits.argmax(1)
    region = crops.region_labels(grid)
    photo_acc = float((pred // grid**2 == crops.photo_index).double().mean())
    return photo_acc, float((pred == region).double().mean())


def _cache_key(config: PhotoFeatureConfig, names: Sequence[str]) -> str:
    doc = json.dumps({"version": _VERSION, "config": asdict(config), "photos": list(names)}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:12]


def load_or_train_photo_features(
    cache_dir: str | Path,
    config: PhotoFeatureConfig = PhotoFeatureConfig(),
    sources: Sequence[PhotoSource] | None = None,
    *,
    progress: bool = False,
) -> PhotoFeatureNet:
    """Load the feature net for ``config`` and ``sources`` from ``cache_dir``, training and saving it if absent.

    The file is ``photo_features_<hash>.safetensors``, the hash covering the config, the photo names
    and a recipe version, so changed settings never reuse stale weights.
    """
    sources = photo_sources() if sources is None else list(sources)
    names = [s.name for s in sources]
    path = Path(cache_dir) / f"photo_features_{_cache_key(config, names)}.safetensors"
    num_classes = len(names) * config.grid**2
    if path.exists():
        tensors, meta = load_checkpoint(path)
        if meta.get("kind") != "photo_features" or meta.get("photos") != names:
            raise ValueError(f"{path} is not a photo feature net for photos {names}")
        model = PhotoFeatureNet(num_classes, config.widths, config.feature_dim)
        load_strict(model, tensors, "photo features")
        return model.eval()
    model = train_photo_features(config, sources, progress=progress)
    save_checkpoint(path, model.state_dict(),
                    {"kind": "photo_features", "version": _VERSION, "config": asdict(config), "photos": names})
    return model
