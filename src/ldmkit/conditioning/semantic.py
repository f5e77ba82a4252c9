"""Semantic maps: per-pixel class indices, one-hot, resized to the latent and mapped by a 1x1 conv, then
concatenated to it (LDM's semantic synthesis on landscapes, `SpatialRescaler`). Samples at any size a map has."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ..config import LDMConfig
from ..data.canvases import one_hot_segmap
from ..latent import LatentCodec
from ..models.conditioners import SpatialRescaler
from .base import UNGUIDED, ConditionKind, SampleConditions, need, side
from .sources import ConditionSource, SpatialCondition


class SemanticMap(ConditionKind):
    name = "rescaler"
    takes = frozenset({"segmap"})
    description = "it is a semantic-synthesis model"

    def module(self, cfg: LDMConfig, *, pretrained: bool = True) -> nn.Module:
        c = cfg.conditioning
        return SpatialRescaler(n_stages=c.n_stages, in_channels=c.in_channels, out_channels=c.out_channels)

    def training_source(self, cfg: LDMConfig, data: Any, codec: LatentCodec,
                        encoder: nn.Module | None = None) -> ConditionSource:
        return SpatialCondition(one_hot_segmap(need(data.segmaps, "segmaps", cfg), cfg.conditioning.in_channels))

    def tasks(self, cfg: LDMConfig) -> list[str]:
        return ["segmap"]

    def sample(self, cfg: LDMConfig, codec: LatentCodec, inputs: Any, count: int,
               encode_prompts: Callable[[Sequence[str]], Tensor]) -> SampleConditions:
        c, f = cfg.conditioning, codec.downsample_factor
        if inputs.segmap is None:
            raise ValueError("this is a semantic-synthesis model: give a segmap ([B, H, W] class indices)")
        seg = inputs.segmap
        if seg.ndim == 2:
            seg = seg[None]
        if seg.ndim != 3 or seg.dtype.is_floating_point:
            raise ValueError(f"segmap must be an integer tensor [B, H, W], got {tuple(seg.shape)} {seg.dtype}")
        if int(seg.min()) < 0 or int(seg.max()) >= c.in_channels:
            raise ValueError(f"segmap class {int(seg.max()) if int(seg.max()) >= c.in_channels else int(seg.min())} "
                             f"is out of range: this model knows classes 0..{c.in_channels - 1}")
        hw = (side(seg.shape[1], f, "segmap"), side(seg.shape[2], f, "segmap"))
        if seg.shape[1] * 0.5 ** c.n_stages != hw[0] or seg.shape[2] * 0.5 ** c.n_stages != hw[1]:
            raise ValueError(f"segmap {tuple(seg.shape[1:])} does not rescale to the latent {hw}")
        return SampleConditions({"labels": one_hot_segmap(seg.long(), c.in_channels)}, None, hw,
                                UNGUIDED.format(kind=c.kind))


KIND = SemanticMap()
