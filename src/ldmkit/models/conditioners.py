"""Conditioning encoders that turn labels into cross-attention context.

``ClassEmbedder`` is LDM's class-conditional "cond stage" (CompVis ``ldm/modules/encoders/modules.py``,
used by the ImageNet ``cin*`` configs): a learned embedding per class, fed to the UNet as a one-token context.
Its only parameter is ``embedding.weight``, so checkpoints load under ``cond_stage_model.embedding.weight``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ClassEmbedder"]


class ClassEmbedder(nn.Module):
    """Map integer labels [B] to a one-token context [B, 1, embed_dim]."""

    def __init__(self, n_classes: int, embed_dim: int) -> None:
        super().__init__()
        if n_classes <= 0 or embed_dim <= 0:
            raise ValueError(f"n_classes and embed_dim must be positive, got {n_classes} and {embed_dim}")
        self.n_classes = n_classes
        self.embed_dim = embed_dim
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, y: Tensor) -> Tensor:
        """``y``: integer labels [B] in [0, n_classes) -> [B, 1, embed_dim]."""
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ValueError(f"class labels must be an integer tensor, got dtype {y.dtype}")
        if y.ndim != 1:
            raise ValueError(f"class labels must have shape [B], got {tuple(y.shape)}")
        bad = (y < 0) | (y >= self.n_classes)
        if bool(bad.any()):
            raise ValueError(
                f"class label {int(y[bad][0])} is out of range [0, {self.n_classes}) "
                f"(all bad labels: {y[bad].tolist()})"
            )
        return self.embedding(y.long())[:, None, :]  # [B, 1, embed_dim]
