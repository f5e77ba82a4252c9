"""Inpainting: the masked image's latent and the mask, concatenated to the latent (LDM's inpainting model;
Stable Diffusion's inpainting models add it to text, conditioning_key "hybrid"). Training cuts random holes
(boxes, LaMa-style strokes) into each batch. The image and mask of a request are read by the pipeline, which
serves every model's inpainting; this kind says that they are required."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import LDMConfig
from ..latent import LatentCodec
from .base import ConditionKind, ConditionRoles
from .sources import ConditionSource, InpaintCondition


class Inpainting(ConditionKind):
    name = "first_stage"
    description = "it is an inpainting model"

    def roles(self, cfg: LDMConfig) -> ConditionRoles:
        return ConditionRoles(text=False, layout=False, concat_inpaint=True)

    def training_source(self, cfg: LDMConfig, data: Any, codec: LatentCodec,
                        encoder: nn.Module | None = None) -> ConditionSource:
        return InpaintCondition(data.images, codec, cfg.conditioning.mask_kind)


KIND = Inpainting()
