"""Convolutional building blocks of the diffusion UNet (ADM / CompVis ``openaimodel.py`` layout).

Module and attribute names follow the reference so that ``state_dict`` keys match released checkpoints:
``ResBlock`` has ``in_layers``, ``emb_layers``, ``out_layers`` and ``skip_connection``; ``Downsample`` keeps
its conv (or average pool) in ``op``; ``Upsample`` keeps its conv in ``conv``. Only 2-D signals are supported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "ContextBlock",
    "Downsample",
    "GroupNorm32",
    "ResBlock",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "Upsample",
    "maybe_checkpoint",
    "normalization",
    "zero_module",
]

M = TypeVar("M", bound=nn.Module)


# ----------------------------------------------------------------------------------------------------------
# Small helpers shared by the UNet blocks and the attention layers.


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always normalises in float32 and returns the input dtype (ADM's ``GroupNorm32``)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """The UNet's standard norm layer: 32 groups, affine, computed in float32."""
    return GroupNorm32(32, channels, eps=eps)


def zero_module(module: M) -> M:
    """Zero every parameter of ``module`` (output projections, so residual blocks start as identities)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def maybe_checkpoint(module: nn.Module, fn: Callable[..., Tensor], *args: Any, enabled: bool) -> Tensor:
    """Run ``fn(*args)``, with activation checkpointing when enabled, training and grad is on."""
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ----------------------------------------------------------------------------------------------------------
# Dispatch: which children of a TimestepEmbedSequential get the timestep embedding or the context.


class TimestepBlock(nn.Module):
    """Marker base: ``forward(x, emb)`` takes the timestep embedding as a second argument."""


class ContextBlock(nn.Module):
    """Marker base: ``forward(x, context)`` takes the cross-attention context as a second argument."""


class TimestepEmbedSequential(nn.Sequential):
    """``nn.Sequential`` that hands ``emb`` to TimestepBlocks and ``context`` to ContextBlocks."""

    def forward(self, x: Tensor, emb: Tensor, context: Any = None) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, ContextBlock):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------------------
# Resampling (ADM ``Upsample`` / ``Downsample``).


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv (``conv``)."""

    def __init__(
        self, channels: int, use_conv: bool, out_channels: int | None = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=padding)
        elif self.out_channels != channels:
            raise ValueError("Upsample without a conv cannot change the channel count")

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Upsample expected {self.channels} channels, got {x.shape[1]}")
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # [B, C, 2H, 2W]
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 conv, or 2x2 average pooling, stored as ``op``."""

    def __init__(
        self, channels: int, use_conv: bool, out_channels: int | None = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.op: nn.Module
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=padding)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without a conv cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Downsample expected {self.channels} channels, got {x.shape[1]}")
        return self.op(x)  # [B, C_out, H/2, W/2]


# ----------------------------------------------------------------------------------------------------------
# Residual block conditioned on the timestep embedding (ADM ``ResBlock``; FiLM when use_scale_shift_norm).


class ResBlock(TimestepBlock):
    """GN-SiLU-conv, add the projected embedding, GN-SiLU-dropout-conv, plus a skip connection.

    With ``use_scale_shift_norm`` the embedding gives a (scale, shift) pair applied after the second norm,
    ``h = norm(h) * (1 + scale) + shift``. ``up`` / ``down`` resample both paths in the middle of
    ``in_layers`` (used when ``resblock_updown``). ``use_conv`` picks a 3x3 instead of a 1x1 conv for a
    channel-changing skip.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("ResBlock cannot both upsample and downsample")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        self.h_upd: nn.Module
        self.x_upd: nn.Module
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )

        self.skip_connection: nn.Module
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``x`` [B, C, H, W], ``emb`` [B, emb_channels] -> [B, C_out, H', W']."""
        return maybe_checkpoint(self, self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            # Resample between the activation and the conv, on both the residual and the skip path.
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)  # [B, C, H', W']
            x = self.x_upd(x)  # [B, C, H', W']
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)  # [B, C_out, H, W]
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # [B, C_out or 2*C_out, 1, 1]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)  # [B, C_out, 1, 1] each
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h
