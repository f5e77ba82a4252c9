"""Attention layers of the latent-diffusion UNet.

* ``CrossAttention``, ``FeedForward`` (GEGLU), ``BasicTransformerBlock`` and ``SpatialTransformer``: the
  text/class-conditioning path of LDM (Rombach et al. 2022, Sec. 3.3), CompVis ``ldm/modules/attention.py``.
* ``AttentionBlock`` with ``QKVAttentionLegacy`` / ``QKVAttention``: the plain self-attention of ADM
  (Dhariwal & Nichol 2021) used by UNets built without ``use_spatial_transformer``.

Attribute names follow the reference so ``state_dict`` keys match released checkpoints. All attention
products go through ``torch.nn.functional.scaled_dot_product_attention`` (softmax(q k^T / sqrt(d)) v), via
``sliced_attention``.

Two opt-in inference switches, off by default, set for a whole UNet by ``UNetModel.set_attention_slice`` and
``UNetModel.fuse_qkv_projections``:

* ``slice_size`` (every attention layer): SDPA over ``slice_size`` (batch, head) attention maps at a time, so a
  backend that materialises the N x M score matrix (SDPA's math fallback) holds only that many at once.
  Results equal the unsliced ones. The CPU SDPA kernel (flash attention, float32 too) never holds that
  matrix, nor do the GPU flash / memory-efficient kernels: on this CPU slicing kept the same peak memory and
  cost 3-4 % time (``benchmarks/unet_options.py``).
* ``fuse_qkv`` (``CrossAttention`` used as self-attention): q, k and v in one matmul with the concatenated
  weight. The parameters stay ``to_q``/``to_k``/``to_v`` (checkpoint keys unchanged); the concatenation is
  cached only for no-grad use and rebuilt whenever a weight is replaced, moved, cast or written in place.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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
    "check_slice_size",
    "sliced_attention",
]

ContextArg = Tensor | Sequence[Tensor | None] | None


# ----------------------------------------------------------------------------------------------------------
# Attention slicing.


def check_slice_size(slice_size: int | None) -> int | None:
    """Validate an attention ``slice_size``: None (off) or a positive int."""
    if slice_size is not None and (isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1):
        raise ValueError(f"slice_size must be None (no slicing) or a positive int, got {slice_size!r}")
    return slice_size


def _slices(lead: Sequence[int], slice_size: int) -> Iterator[tuple[slice, ...]]:
    """Index tuples covering the leading dims ([BH] or [B, H]) with at most ``slice_size`` maps each.

    Slicing a [B, H] lead as views (whole batch elements, or heads of one element) avoids the copy that
    flattening non-contiguous [B, H, N, D] heads to [B*H, N, D] would make.
    """
    if len(lead) == 1:
        for i in range(0, lead[0], slice_size):
            yield (slice(i, i + slice_size),)
        return
    batch, heads = lead
    if slice_size >= heads:
        per = slice_size // heads  # whole batch elements per slice
        for i in range(0, batch, per):
            yield (slice(i, i + per),)
        return
    for i in range(batch):
        for j in range(0, heads, slice_size):
            yield slice(i, i + 1), slice(j, j + slice_size)


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """``F.scaled_dot_product_attention`` with 3-D inputs [L, N, D] run as 4-D [1, L, N, D] with unit feature
    stride: torch's CPU flash kernel takes only such inputs, and others fall back to the math path, which builds
    the whole N x M attention matrix (at 16,384 tokens 2.3 GiB against 0.04 GiB, the same outputs to float
    rounding)."""
    if q.ndim != 3:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    # the kernel also wants each row's features contiguous (transposed channel-first heads are not)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    mask = None if attn_mask is None else attn_mask[None] if attn_mask.ndim == 3 else attn_mask
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]  # [1, L, N, D] -> [L, N, D]


def sliced_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, slice_size: int | None = None
) -> Tensor:
    """``scaled_dot_product_attention`` of q [*lead, N, D] over k, v [*lead, M, D] (lead = [BH] or [B, H]),
    computed ``slice_size`` (batch, head) maps at a time; None computes all at once.

    ``attn_mask`` broadcasts against [*lead, N, M]. Each slice is written into one preallocated output, so
    that the slices' results never coexist with a concatenated copy.
    """
    lead = q.shape[:-2]
    if q.ndim not in (3, 4) or k.shape[:-2] != lead or v.shape[:-2] != lead:
        raise ValueError(f"sliced_attention needs 3-D or 4-D q, k, v with equal leading dims, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if slice_size is None or slice_size >= lead.numel():
        return sdpa(q, k, v, attn_mask)
    if attn_mask is not None:
        attn_mask = attn_mask.expand(*lead, *attn_mask.shape[-2:])  # [*lead, N or 1, M], a view
    out = q.new_empty(*lead, q.shape[-2], v.shape[-1])  # [*lead, N, Dv]
    for idx in _slices(lead, slice_size):
        mask = None if attn_mask is None else attn_mask[idx]
        out[idx] = sdpa(q[idx], k[idx], v[idx], mask)
    return out


# ----------------------------------------------------------------------------------------------------------
# Transformer path (SpatialTransformer and its parts).


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` [B, N, query_dim] over ``context`` [B, M, context_dim] (self-attention
    when ``context`` is None). Keys: ``to_q``/``to_k``/``to_v`` (no bias), ``to_out.0`` Linear, ``to_out.1``
    Dropout.

    ``slice_size`` and ``fuse_qkv`` are the opt-in switches of the module docstring (off by default).
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
        self.slice_size: int | None = None
        self.fuse_qkv = False
        # (weights, their (data_ptr, version, dtype, device), concatenated weight): a plain attribute, so it is
        # neither in state_dict nor moved by .to(); _qkv_weight rebuilds it when the key no longer matches.
        self._qkv_cache: tuple[tuple[Tensor, ...], tuple, Tensor] | None = None

    def _qkv_weight(self) -> Tensor:
        """[3*H*D, query_dim]: the to_q, to_k and to_v weights stacked, for one fused projection."""
        ws = (self.to_q.weight, self.to_k.weight, self.to_v.weight)
        if torch.compiler.is_compiling():
            return torch.cat(ws)  # traced into the graph; no Python-side cache to guard
        if torch.is_grad_enabled() and any(w.requires_grad for w in ws) or any(w.is_inference() for w in ws):
            # Training: differentiable and always current. Inference tensors (weights created under
            # inference_mode) have no version counter to detect in-place writes, so nothing is cached.
            self._qkv_cache = None
            return torch.cat(ws)
        # A replaced Parameter (load_state_dict(assign=True)), moved or cast weight (.to: new data_ptr /
        # dtype / device) or in-place write (load_state_dict, optimizer step: version bump) changes the key.
        # Writes through ``.data`` bypass the version counter: call fuse_qkv_projections() again after those.
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in ws)
        cache = self._qkv_cache
        if cache is None or cache[1] != key or any(a is not b for a, b in zip(cache[0], ws, strict=True)):
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable outside inference mode
                cache = (ws, key, torch.cat(ws))
            self._qkv_cache = cache
        return cache[2]

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
        if self.fuse_qkv and context is x:
            qkv = F.linear(x, self._qkv_weight())  # [B, N, 3*H*D]
            qkv = qkv.view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
            q, k, v = qkv.unbind(0)  # [B, H, N, D] each
        else:
            q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)  # [B, H, N, D]
            k = self.to_k(context).view(b, m, self.heads, self.dim_head).transpose(1, 2)  # [B, H, M, D]
            v = self.to_v(context).view(b, m, self.heads, self.dim_head).transpose(1, 2)  # [B, H, M, D]
        attn_mask = None
        if mask is not None:
            if mask.dtype != torch.bool:
                raise ValueError(f"attention mask must be a bool tensor, got {mask.dtype}")
            attn_mask = mask.reshape(b, 1, 1, -1)  # [B, 1, 1, M]
        out = sliced_attention(q, k, v, attn_mask, self.slice_size)  # [B, H, N, D]
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
        # [B, inner or C, H, W]; the reshape is already a channels_last view, so a channels_last input (the
        # memory-format option) keeps its layout instead of a copy to NCHW and back at proj_out.
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous(memory_format=_memory_format(x_in))
        if not self.use_linear:
            x = self.proj_out(x)  # [B, C, H, W]
        return x + x_in


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last when a 4-D ``x`` is laid out so (and not also plain contiguous), else contiguous_format."""
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# ----------------------------------------------------------------------------------------------------------
# ADM self-attention (non-transformer UNets).


def _attend_channels_first(q: Tensor, k: Tensor, v: Tensor, slice_size: int | None) -> Tensor:
    """Attention on channel-first heads: q, k, v [BH, D, T] -> [BH, D, T]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [BH, T, D] each
    return sliced_attention(q, k, v, slice_size=slice_size).transpose(1, 2)  # [BH, D, T]


class QKVAttentionLegacy(nn.Module):
    """QKV attention on [B, H*3*D, T] input, laid out head-first (each head holds its own q, k, v)."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.slice_size: int | None = None  # see sliced_attention

    def forward(self, qkv: Tensor) -> Tensor:
        bs, width, length = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(f"qkv width {width} is not divisible by 3 * {self.n_heads} heads")
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, 3 * ch, length).split(ch, dim=1)  # [B*H, D, T] each
        return _attend_channels_first(q, k, v, self.slice_size).reshape(bs, -1, length)  # [B, H*D, T]


class QKVAttention(nn.Module):
    """QKV attention on [B, 3*H*D, T] input, laid out qkv-first (``use_new_attention_order``)."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.slice_size: int | None = None  # see sliced_attention

    def forward(self, qkv: Tensor) -> Tensor:
        bs, width, length = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(f"qkv width {width} is not divisible by 3 * {self.n_heads} heads")
        ch = width // (3 * self.n_heads)
        q, k, v = (t.reshape(bs * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))  # [B*H, D, T] each
        return _attend_channels_first(q, k, v, self.slice_size).reshape(bs, -1, length)  # [B, H*D, T]


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
