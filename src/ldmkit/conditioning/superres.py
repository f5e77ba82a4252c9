"""Super-resolution: the low-resolution image itself, resized to the latent and concatenated to it (LDM's
BSR-degraded 4x upscaler). Training makes the low-res inputs from each batch, bicubic or with the BSR chain."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ..config import LDMConfig
from ..latent import LatentCodec
from .base import UNGUIDED, ConditionKind, SampleConditions, side
from .concat import image_batch, lowres_concat
from .sources import ConditionSource, SuperResCondition


class SuperResolution(ConditionKind):
    name = "image"
    takes = frozenset({"lowres"})
    description = "it is a super-resolution model"

    def training_source(self, cfg: LDMConfig, data: Any, codec: LatentCodec,
                        encoder: nn.Module | None = None) -> ConditionSource:
        c = cfg.conditioning
        if c.degradation not in ("bicubic", "bsr"):
            raise ValueError(f"unknown degradation {c.degradation!r}; choose 'bicubic' or 'bsr'")
        _, h, w = codec.latent_shape(cfg.data.resolution)
        return SuperResCondition(data.images, c.sr_factor, c.degradation, (h, w))

    def tasks(self, cfg: LDMConfig) -> list[str]:
        return ["upscale"]

    def sample(self, cfg: LDMConfig, codec: LatentCodec, inputs: Any, count: int,
               encode_prompts: Callable[[Sequence[str]], Tensor]) -> SampleConditions:
        c, f = cfg.conditioning, codec.downsample_factor
        if inputs.lowres is None:
            raise ValueError("this is a super-resolution model: give a low-resolution image (lowres)")
        low = image_batch(inputs.lowres, "lowres", cfg.autoencoder.in_channels)
        hw = (side(low.shape[2] * c.sr_factor, f, "output"), side(low.shape[3] * c.sr_factor, f, "output"))
        return SampleConditions({"concat": lowres_concat(low, hw)}, None, hw, UNGUIDED.format(kind=c.kind))


KIND = SuperResolution()
