"""A config's dataset, whole in memory: the images and whatever conditions they carry.

`load_task_data` is what training and evaluation read: images plus class labels (mnist, folders), captions
(emoji, caption files), layouts and class maps (digit canvases). `load_dataset` is its images-and-labels view
for the first stage and the judges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import FirstStageConfig, LDMConfig
from .mnist import mnist_tensor


@dataclass
class TaskData:
    """A training set with whatever conditions it carries (absent ones are None)."""

    images: Tensor  # [N, C, H, W] in [-1, 1]
    labels: Tensor | None = None  # class labels [N]
    captions: list[str] | None = None
    layouts: list[list[tuple[int, float, float, float, float]]] | None = None
    segmaps: Tensor | None = None  # [N, H, W] long class maps (0 = background)
    skipped: dict[str, Any] | None = None  # own data: files skipped while reading, by reason (data.records)


def load_dataset(cfg: LDMConfig | FirstStageConfig, split: str = "train") -> tuple[Tensor, Tensor]:
    """The whole training set in memory: images [N, C, R, R] in [-1, 1] and labels [N]."""
    d = cfg.data
    if d.limit is not None and d.limit < 1:
        raise ValueError(f"data.limit must be >= 1, got {d.limit}")
    if d.name != "photos" and (d.include_gray or d.channel_shuffle):
        raise ValueError(f"data.include_gray and data.channel_shuffle apply to the photos dataset, not {d.name!r}")
    if d.name in ("emoji", "canvases", "folder", "captions", "shards"):
        data = load_task_data(cfg, split)
        labels = data.labels if data.labels is not None else torch.zeros(len(data.images), dtype=torch.long)
        return data.images, labels
    if d.name == "mnist":
        if d.resolution != 32 or d.channels != 1:
            raise ValueError("the mnist dataset is 1 x 32 x 32: set data.resolution 32 and data.channels 1")
        images, labels = mnist_tensor(split, d.root)
    elif d.name == "photos":
        from .photos import PhotoCrops, photo_sources

        if d.channels != 3:
            raise ValueError("the photos dataset is RGB: set data.channels 3")
        # train crops come from the training photos only; "test" crops from photos never trained on, as they
        # are: the grey photos and shuffled channels are training augmentations
        train = split == "train"
        crops = PhotoCrops("train" if train else "held_out", d.resolution, d.limit or 4096,
                           seed=0 if train else 1, channel_shuffle=d.channel_shuffle and train,
                           sources=photo_sources(include_gray=d.include_gray and train))
        return crops.images, crops.photo_index
    else:
        raise ValueError(f"unknown dataset {d.name!r}; choose 'mnist', 'photos', 'folder', 'captions', 'shards', "
                         f"'emoji' or 'canvases'")
    return images[: d.limit], labels[: d.limit]


def load_task_data(cfg: LDMConfig | FirstStageConfig, split: str = "train") -> TaskData:
    """The training set with the conditions it carries: captions (emoji), layouts and class maps (canvases),
    class labels (mnist, folder)."""
    d = cfg.data
    if d.name == "emoji":
        from .emoji import emoji_dataset

        if d.channels != 3:
            raise ValueError("the emoji dataset is RGB: set data.channels 3")
        em = emoji_dataset(d.resolution, split="train" if split == "train" else "held_out")
        n = len(em.captions) if d.limit is None else min(d.limit, len(em.captions))
        return TaskData(em.images[:n], captions=list(em.captions[:n]))
    if d.name == "canvases":
        from .canvases import mnist_canvases

        if d.channels != 1:
            raise ValueError("the canvases dataset is grey: set data.channels 1")
        lo, hi = d.digits
        cv = mnist_canvases(d.limit or 10000, size=d.resolution, min_digits=lo, max_digits=hi,
                            split="train" if split == "train" else "test", seed=0 if split == "train" else 1,
                            root=d.root)
        return TaskData(cv.images, layouts=cv.layouts, segmaps=cv.segmaps)
    if d.name in ("folder", "captions", "shards"):  # the user's own data, bad files skipped and counted
        from .records import read_captioned, read_folder, read_shards

        if d.root is None:
            raise ValueError(f"data.name {d.name!r} needs data.root (a folder, a caption file or a shard pattern)")
        if d.limit is not None and d.limit < 1:
            raise ValueError(f"data.limit must be >= 1, got {d.limit}")
        reader = {"folder": read_folder, "captions": read_captioned, "shards": read_shards}[d.name]
        own = reader(d.root, d.resolution, d.channels, limit=d.limit, min_size=d.min_size)
        return TaskData(own.images, labels=own.labels, captions=own.captions, skipped=own.report.as_dict())
    images, labels = load_dataset(cfg, split)
    return TaskData(images, labels=labels)
