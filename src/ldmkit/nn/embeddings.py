"""Sinusoidal timestep embeddings.

The UNet convention (ADM / CompVis ``UNetModel``): for ``half = dim // 2`` frequencies
``f_i = max_period ** (-i / half)``, the embedding of ``t`` is ``[cos(t f), sin(t f)]`` -- cosine first --
with one zero column appended when ``dim`` is odd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["timestep_embedding"]


def timestep_embedding(
    t: Tensor,
    dim: int,
    max_period: float = 10000.0,
    repeat_only: bool = False,
) -> Tensor:
    """Embed a 1-D batch of (possibly fractional) timesteps ``t`` [N] into [N, dim].

    ``repeat_only=True`` skips the sinusoids and repeats each timestep ``dim`` times, keeping its dtype.
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects a 1-D tensor of timesteps, got shape {tuple(t.shape)}")
    if dim < 1:
        raise ValueError(f"embedding dim must be positive, got {dim}")
    if repeat_only:
        return t[:, None].expand(-1, dim).clone()  # [N, dim]

    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=t.device)  # [half]
    freqs = torch.exp(-math.log(max_period) * steps / half)  # [half], from 1 down towards 1/max_period
    args = t.float()[:, None] * freqs[None, :]  # [N, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [N, 2*half], cosine first
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)  # [N, dim]
    return emb
