"""Conditioning encoders that turn labels into cross-attention context.

``ClassEmbedder`` is LDM's class-conditional "cond stage" (CompVis ``ldm/modules/encoders/modules.py``,
used by the ImageNet ``cin*`` configs): a learned embedding per class, fed to the UNet as a one-token context.
Its only parameter is ``embedding.weight``, so checkpoints load under ``cond_stage_model.embedding.weight``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ClassEmbedder", "SpatialRescaler"]


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


class SpatialRescaler(nn.Module):
    """LDM's semantic-synthesis cond stage: resize a (one-hot) map n_stages times by `multiplier`, then map its
    channels with a bias-free 1x1 conv, so that it can be concatenated to the latent (`conditioning_key` concat).

    The only parameter is ``channel_mapper.weight`` [out_channels, in_channels, 1, 1], the reference key.
    """

    def __init__(self, n_stages: int = 1, in_channels: int = 3, out_channels: int | None = None,
                 multiplier: float = 0.5, method: str = "bilinear", bias: bool = False) -> None:
        super().__init__()
        if n_stages < 0:
            raise ValueError(f"n_stages must be >= 0, got {n_stages}")
        if method not in ("nearest", "linear", "bilinear", "bicubic", "trilinear", "area"):
            raise ValueError(f"unknown interpolation method {method!r}")
        self.n_stages, self.multiplier, self.method = n_stages, multiplier, method
        self.in_channels = in_channels
        self.channel_mapper = None if out_channels is None else nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_channels, H, W] -> [B, out_channels, H * m^n, W * m^n]."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SpatialRescaler expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        for _ in range(self.n_stages):
            x = nn.functional.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        return x if self.channel_mapper is None else self.channel_mapper(x)
