"""Unconditional: the UNet sees no condition (LDM's LSUN, FFHQ, CelebA-HQ models)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import LDMConfig
from ..latent import LatentCodec
from .base import ConditionKind


class Unconditional(ConditionKind):
    name = "none"
    description = "it is unconditional"

    def training_source(self, cfg: LDMConfig, data: Any, codec: LatentCodec,
                        encoder: nn.Module | None = None) -> None:
        return None


KIND = Unconditional()
