"""Attention layers of the latent-diffusion UNet.

* ``CrossAttention``, ``FeedForward`` (GEGLU), ``BasicTransformerBlock`` and ``SpatialTransformer``: the
  text/class-conditioning path of LDM (Rombach et al. 2022, Sec. 3.3), CompVis ``ldm/modules/attention.py``.
* ``AttentionBlock`` with ``QKVAttentionLegacy`` / ``QKVAttention``: the plain self-attention of ADM
  (Dhariwal & Nichol 2021) used by UNets built without ``use_spatial_transformer``.

Attribute names follow the reference so ``state_dict`` keys match released checkpoints. All attention
products go through ``torch.nn.functional.scaled_dot_product_attention`` (softmax(q k^T / sqrt(d)) v).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import ContextBlock, GroupNorm32, maybe_checkpoint, normalization, zero_module

__all__ = [
    "AttentionBlock",
    "BasicTransformerBlock",
    "CrossAttention",
    "FeedForward",
    "GEGLU",
    "QKVAttention",
    "QKVAttentionLegacy",
    "SpatialTransformer",
]

ContextArg = Tensor | Sequence[Tensor | None] | None


# ----------------------------------------------------------------------------------------------------------
# Transformer path (SpatialTransformer and its parts).


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` [B, N, query_dim] over ``context`` [B, M, context_dim] (self-attention
    when ``context`` is None). Keys: ``to_q``/``to_k``/``to_v`` (no bias), ``to_out.0`` Linear, ``to_out.1``
    Dropout.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """``mask`` (optional, bool [B, M] or [B, ...] flattening to M): True marks keys to attend to."""
        context = x if context is None else context
        if context.shape[-1] != self.to_k.in_features:
            raise ValueError(
                f"attention context has feature size {context.shape[-1]}, but this layer expects "
                f"{self.to_k.in_features} (a cross-attention layer needs a context of size context_dim)"
            )
        b, n, _ = x.shape
        m = context.shape[1]
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)  # [B, H, N, D]
        k = self.to_k(context).view(b, m, self.heads, self.dim_head).transpose(1, 2)  # [B, H, M, D]
        v = self.to_v(context).view(b, m, self.heads, self.dim_head).transpose(1, 2)  # [B, H, M, D]
        attn_mask = None
        if mask is not None:
            if mask.dtype != torch.bool:
                raise ValueError(f"attention mask must be a bool tensor, got {mask.dtype}")
            attn_mask = mask.reshape(b, 1, 1, -1)  # [B, 1, 1, M]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, N, D]
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)  # [B, N, H*D]
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): ``a * gelu(g)`` with ``[a, g] = proj(x)``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)  # [..., dim_out] each
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP: ``net.0`` GEGLU (or Linear+GELU, ``net.0.0``), ``net.1`` Dropout, ``net.2`` Linear."""

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        mult: int = 4,
        glu: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention ``attn1``, cross-attention ``attn2``, GEGLU ``ff``, each residual.

    With ``disable_self_attn`` the first attention also attends to the context instead of to ``x``.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        use_checkpoint: bool = False,
        disable_self_attn: bool = False,
    ) -> None:
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.use_checkpoint = use_checkpoint
        # Registration order (attn1, ff, attn2, norms) matches the reference state_dict order.
        self.attn1 = CrossAttention(
            dim, context_dim if disable_self_attn else None, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``x`` [B, N, dim], ``context`` [B, M, context_dim] or None -> [B, N, dim]."""
        return maybe_checkpoint(self, self._forward, x, context, enabled=self.use_checkpoint)

    def _forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(ContextBlock):
    """Transformer over the pixels of a feature map, with a residual around it (LDM cross-attention layer).

    ``norm`` (GroupNorm, eps 1e-6) -> ``proj_in`` -> ``depth`` x BasicTransformerBlock -> ``proj_out`` -> + x.
    ``proj_in``/``proj_out`` are 1x1 convs (SD v1) or, with ``use_linear``, Linears on tokens (SD 2.x).
    ``context_dim`` may be one size for every block or a list with one size per block.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | Sequence[int] | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if context_dim is None or isinstance(context_dim, int):
            context_dims: list[int | None] = [context_dim] * depth
        else:
            context_dims = list(context_dim)
            if len(context_dims) != depth:
                raise ValueError(f"context_dim list has {len(context_dims)} entries but depth is {depth}")
        self.in_channels = in_channels
        self.use_linear = use_linear
        inner_dim = n_heads * d_head
        self.norm = GroupNorm32(32, in_channels, eps=1e-6)
        self.proj_in: nn.Module
        self.proj_out: nn.Module
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                n_heads,
                d_head,
                dropout=dropout,
                context_dim=context_dims[d],
                disable_self_attn=disable_self_attn,
                use_checkpoint=use_checkpoint,
            )
            for d in range(depth)
        )
        # The reference builds the linear proj_out as Linear(in_channels, inner_dim); that only runs when
        # inner_dim == in_channels, where its weight shape equals the correct Linear(inner_dim, in_channels).
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x: Tensor, context: ContextArg = None) -> Tensor:
        """``x`` [B, C, H, W]; ``context`` [B, M, context_dim], a list with one per block, or None."""
        depth = len(self.transformer_blocks)
        contexts = list(context) if isinstance(context, list | tuple) else [context] * depth
        if len(contexts) != depth:
            raise ValueError(f"got {len(contexts)} contexts for {depth} transformer blocks")
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)  # [B, inner, H, W]
        x = x.flatten(2).transpose(1, 2).contiguous()  # [B, H*W, inner or C]
        if self.use_linear:
            x = self.proj_in(x)  # [B, H*W, inner]
        for block, ctx in zip(self.transformer_blocks, contexts, strict=True):
            x = block(x, context=ctx)  # [B, H*W, inner]
        if self.use_linear:
            x = self.proj_out(x)  # [B, H*W, C]
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()  # [B, inner or C, H, W]
        if not self.use_linear:
            x = self.proj_out(x)  # [B, C, H, W]
        return x + x_in


# ----------------------------------------------------------------------------------------------------------
# ADM self-attention (non-transformer UNets).


def _attend_channels_first(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention on channel-first heads: q, k, v [BH, D, T] -> [BH, D, T]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [BH, T, D] each
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # [BH, D, T]


class QKVAttentionLegacy(nn.Module):
    """QKV attention on [B, H*3*D, T] input, laid out head-first (each head holds its own q, k, v)."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: Tensor) -> Tensor:
        bs, width, length = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(f"qkv width {width} is not divisible by 3 * {self.n_heads} heads")
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, 3 * ch, length).split(ch, dim=1)  # [B*H, D, T] each
        return _attend_channels_first(q, k, v).reshape(bs, -1, length)  # [B, H*D, T]


class QKVAttention(nn.Module):
    """QKV attention on [B, 3*H*D, T] input, laid out qkv-first (``use_new_attention_order``)."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: Tensor) -> Tensor:
        bs, width, length = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(f"qkv width {width} is not divisible by 3 * {self.n_heads} heads")
        ch = width // (3 * self.n_heads)
        q, k, v = (t.reshape(bs * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))  # [B*H, D, T] each
        return _attend_channels_first(q, k, v).reshape(bs, -1, length)  # [B, H*D, T]


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual: ``norm`` -> ``qkv`` (1x1 Conv1d) -> attention -> ``proj_out``.

    Heads: ``num_heads`` if ``num_head_channels == -1``, else ``channels // num_head_channels``.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if num_head_channels <= 0 or channels % num_head_channels:
                raise ValueError(f"{channels} channels not divisible by {num_head_channels=}")
            self.num_heads = channels // num_head_channels
        if self.num_heads <= 0 or channels % self.num_heads:
            raise ValueError(f"{channels} channels cannot be split into {self.num_heads} attention heads")
        self.channels = channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.attention = (
            QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(self.num_heads)
        )
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [B, C, *spatial] -> same shape."""
        return maybe_checkpoint(self, self._forward, x, enabled=self.use_checkpoint)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)  # [B, C, T]
        h = self.attention(self.qkv(self.norm(x)))  # [B, C, T]
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)
