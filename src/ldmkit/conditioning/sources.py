"""How a training batch provides its condition: a `ConditionSource` turns the indices of a batch into the
keyword tensors of `ConditionedUNet.forward(x, t, labels, context=, concat=)`.

Sources of cross-attention conditions replace a share `drop_prob` of conditions by the null condition (the null
class, the empty caption, the empty layout), so that one network also learns the unconditional model that
classifier-free guidance needs (Ho & Salimans 2022); spatial conditions are never dropped, as in LD. The
spatial inputs are built by the functions that build them at sampling time (`conditioning.concat`), so that a
trained model is sampled with exactly what it learnt from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..latent import LatentCodec
from .concat import inpaint_concat, lowres_concat


class ConditionSource(Protocol):
    def batch(self, idx: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Keyword tensors for ConditionedUNet.forward for the examples `idx` of a training batch."""
        ...


def _drop(batch: int, p: float, generator: torch.Generator) -> Tensor:
    """[B] bool: which conditions become the null condition (one uniform draw per example)."""
    return torch.rand((batch,), generator=generator) < p


@dataclass
class TokenCondition:
    """Integer conditions read by the trainable conditioner: class labels [N] or token ids [N, L]."""

    tokens: Tensor
    null: Tensor  # the null condition: a scalar label or one token row [L]
    drop_prob: float = 0.1

    def batch(self, idx: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        y = self.tokens[idx]
        if self.drop_prob > 0:
            drop = _drop(len(idx), self.drop_prob, generator).view(-1, *([1] * (y.ndim - 1)))  # [B, 1...]
            y = torch.where(drop, self.null.to(y.dtype).expand_as(y), y)
        return {"labels": y}


@dataclass
class ContextCondition:
    """A frozen encoder's cross-attention context, computed once: [N, L, D], the null context [L, D]."""

    context: Tensor
    null: Tensor
    drop_prob: float = 0.1

    def batch(self, idx: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        c = self.context[idx]
        if self.drop_prob > 0:
            drop = _drop(len(idx), self.drop_prob, generator)[:, None, None]  # [B, 1, 1]
            c = torch.where(drop, self.null.expand_as(c), c)
        return {"context": c}


@dataclass
class SpatialCondition:
    """Maps [N, C, H, W] (e.g. one-hot semantic maps) read by the conditioner (SpatialRescaler) -> concat."""

    maps: Tensor

    def batch(self, idx: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        return {"labels": self.maps[idx]}


@dataclass
class SuperResCondition:
    """Low-resolution inputs made from the training images each step: bicubic or the BSR chain (LD's bsr_sr)."""

    images: Tensor
    factor: int
    degradation: str
    latent_hw: tuple[int, int]

    def batch(self, idx: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        from ..data.degradations import bicubic_downsample, bsr_degrade

        x = self.images[idx]
        lowres = (bsr_degrade(x, self.factor, generator=generator) if self.degradation == "bsr"
                  else bicubic_downsample(x, self.factor))
        return {"concat": lowres_concat(lowres, self.latent_hw)}


@dataclass
class InpaintCondition:
    """Random holes (box / LaMa-style strokes) in the training images each step -> masked-image latent + mask."""

    images: Tensor
    codec: LatentCodec
    mask_kind: str = "mixed"
    mask_first: bool = False

    def batch(self, idx: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        from ..data.masks import random_mask

        x = self.images[idx]
        mask = random_mask(self.mask_kind, x.shape[0], x.shape[2], x.shape[3], generator=generator)
        return {"concat": inpaint_concat(self.codec, x, mask, mask_first=self.mask_first)}


@dataclass
class CombinedCondition:
    """Several sources at once (hybrid: text by cross-attention plus an inpainting concat)."""

    sources: Sequence[Any]

    def batch(self, idx: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for s in self.sources:
            out.update(s.batch(idx, generator))
        return out


@torch.no_grad()
def frozen_context(encoder: torch.nn.Module, tokens: Tensor, batch_size: int = 256) -> Tensor:
    """A frozen text encoder's context for every token row, computed once ([N, L] -> [N, L, D])."""
    device = next(encoder.parameters()).device
    return torch.cat([encoder(t.to(device)) for t in tokens.split(batch_size)])
