"""Class labels: a learned embedding per class, read by cross-attention (LDM's ImageNet model, `ClassEmbedder`).

With `null_class`, one extra row (index n_classes) stands for "no label": training replaces a share of labels
by it, and guidance uses it as the unconditional branch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..config import LDMConfig
from ..latent import LatentCodec
from ..models.conditioners import ClassEmbedder
from .base import ConditionKind, SampleConditions, need, null_labels
from .sources import ConditionSource, TokenCondition


class ClassLabel(ConditionKind):
    name = "class"
    takes = frozenset({"classes"})
    description = "it is class-conditional"

    def module(self, cfg: LDMConfig, *, pretrained: bool = True) -> nn.Module:
        c = cfg.conditioning
        if c.resolved_key() in ("crossattn", "hybrid") and cfg.unet.context_dim != c.embed_dim:
            raise ValueError(
                f"conditioning.embed_dim ({c.embed_dim}) must equal unet.context_dim ({cfg.unet.context_dim})"
            )
        return ClassEmbedder(c.n_classes + int(c.null_class), c.embed_dim)

    def training_source(self, cfg: LDMConfig, data: Any, codec: LatentCodec,
                        encoder: nn.Module | None = None) -> ConditionSource:
        c = cfg.conditioning
        labels = need(data.labels, "class labels", cfg)
        if int(labels.max()) >= c.n_classes:
            raise ValueError(f"the data has label {int(labels.max())} but conditioning.n_classes is {c.n_classes}")
        p = cfg.train_diffusion.cond_drop_prob if c.null_class else 0.0
        return TokenCondition(labels.long(), torch.tensor(c.n_classes), p)

    def sample(self, cfg: LDMConfig, codec: LatentCodec, inputs: Any, count: int,
               encode_prompts: Callable[[Sequence[str]], Tensor]) -> SampleConditions:
        c = cfg.conditioning
        if inputs.classes is not None:
            bad = [k for k in inputs.classes if not 0 <= int(k) < c.n_classes]
            if bad:
                raise ValueError(f"class {bad[0]} is out of range: this model knows classes 0..{c.n_classes - 1}")
            y = torch.tensor([int(k) for k in inputs.classes], dtype=torch.long)
        elif c.null_class:
            y = null_labels(count, c.n_classes)
        else:
            raise ValueError("this class-conditional model has no null class: give class labels")
        if c.null_class and inputs.classes is not None:
            return SampleConditions({"labels": y}, {"labels": torch.full_like(y, c.n_classes)})
        # e.g. LD's cin-ldm-vq-f8, trained without a "no label" class
        no_guidance = None if c.null_class else ("this class-conditional model has no null class, so "
                                                 "classifier-free guidance is not available: use guidance 1")
        return SampleConditions({"labels": y}, None, no_guidance=no_guidance)


KIND = ClassLabel()
