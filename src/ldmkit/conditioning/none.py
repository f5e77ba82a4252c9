"""Unconditional: the UNet sees no condition (LDM's LSUN, FFHQ, CelebA-HQ models)."""

from __future__ import annotations

from .base import ConditionKind


class Unconditional(ConditionKind):
    name = "none"
    description = "it is unconditional"

    def training_source(self, cfg, data, codec, encoder=None):  # type: ignore[no-untyped-def]  # noqa: ANN001
        return None


KIND = Unconditional()
