"""Convolutional encoder/decoder shared by the KL and VQ first-stage autoencoders.

Architecture of Rombach et al. 2022 (App. G), inherited from VQGAN (Esser et al. 2021): a ResNet
trunk with GroupNorm + Swish, optional single-head spatial self-attention, stride-2 conv downsampling
and nearest-neighbour + conv upsampling. Parameter names match the CompVis ``model.py`` state dict
(``conv_in``, ``down.{i}.block.{j}``, ``down.{i}.attn.{j}``, ``down.{i}.downsample.conv``, ``mid.*``,
``up.{i}.*``, ``norm_out``, ``conv_out``) so reference checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.nn.banded import add_conv1x1, norm_act_conv, upsample_conv, use_bands

ATTN_TYPES = ("vanilla", "none")


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with 32 groups and eps 1e-6, as used throughout the autoencoder."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


def nonlinearity(x: Tensor) -> Tensor:
    """Swish / SiLU: x * sigmoid(x)."""
    return F.silu(x)


def _fresh_silu(h: Tensor) -> Tensor:
    """SiLU of a tensor nobody else holds (a GroupNorm output): in place when no gradient is recorded, which
    spares one full-resolution temporary per block (the decoder's peak memory at high resolution)."""
    return F.silu(h, inplace=not torch.is_grad_enabled())


def _norm_out_conv(norm: nn.GroupNorm, conv: nn.Conv2d, h: Tensor) -> Tensor:
    """conv_out(SiLU(norm_out(h))), the last layers of the encoder and decoder; by row bands on large maps."""
    return norm_act_conv(norm, conv, h) if use_bands(h) else conv(_fresh_silu(norm(h)))


class ResnetBlock(nn.Module):
    """Pre-activation residual block: x + conv2(drop(act(norm2(conv1(act(norm1(x))) + temb)))).

    When the channel count changes, the skip path is a 1x1 ``nin_shortcut`` or, with
    ``conv_shortcut=True``, a 3x3 ``conv_shortcut``. ``temb_proj`` exists only if ``temb_channels > 0``
    (the autoencoders pass 0).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        temb_channels: int = 512,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        if temb is None and use_bands(x) and not (self.training and self.dropout.p > 0):
            return self._forward_banded(x)
        h = self.conv1(_fresh_silu(self.norm1(x)))  # (B, C_out, H, W)
        if temb is not None and hasattr(self, "temb_proj"):
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]  # (B, C_out, 1, 1) broadcast
        h = self.conv2(self.dropout(_fresh_silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return h.add_(x) if not torch.is_grad_enabled() else x + h  # h is this block's own conv output

    def _forward_banded(self, x: Tensor) -> Tensor:
        """The same block on a large map without autograd: no full-size GroupNorm output is ever made
        (`nn/banded.py`), which lowers the decoder's peak memory at >= 512 px."""
        h = norm_act_conv(self.norm1, self.conv1, x)  # (B, C_out, H, W)
        h = norm_act_conv(self.norm2, self.conv2, h)  # (B, C_out, H, W)
        if self.in_channels == self.out_channels:
            return h.add_(x)
        if self.use_conv_shortcut:
            return h.add_(self.conv_shortcut(x))
        return add_conv1x1(h, self.nin_shortcut, x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1-conv q/k/v/proj_out and a residual."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = self.q(hn), self.k(hn), self.v(hn)  # 3 x (B, C, H, W)
        q = q.reshape(b, 1, c, h * w).transpose(2, 3).contiguous()  # (B, 1, HW, C)
        k = k.reshape(b, 1, c, h * w).transpose(2, 3).contiguous()  # (B, 1, HW, C)
        v = v.reshape(b, 1, c, h * w).transpose(2, 3).contiguous()  # (B, 1, HW, C)
        # softmax(q k^T / sqrt(C)) v, the reference's scaling (one head of width C). 4-D and contiguous, so that
        # torch's CPU flash kernel runs: otherwise torch builds the HW x HW matrix, 34 GiB at a 2048 px decode.
        # Not nn.attention.sdpa: its (1, B, HW, C) layout rounds differently at 1 thread, enough to move the tiny
        # VQ model of tests/test_vq.py past its bar (0.115 against 0.112; 0.050 in this layout)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        out = out.transpose(2, 3).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj_out(out)


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    """AttnBlock for ``"vanilla"``; parameter-free identity for ``"none"`` (no state-dict keys)."""
    if attn_type == "vanilla":
        return AttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}")


class Downsample(nn.Module):
    """Halve H and W: 3x3 stride-2 conv after a (0, 1, 0, 1) zero pad, or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            # Padding is applied by hand in forward: torch convs only pad symmetrically.
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        if self.with_conv:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (B, C, H+1, W+1): pad right, bottom
            return self.conv(x)  # (B, C, H/2, W/2)
        return F.avg_pool2d(x, kernel_size=2, stride=2)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W with nearest-neighbour interpolation, optionally followed by a 3x3 conv."""

    def __init__(self, in_channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.with_conv and use_bands(x, upsample=2):
            return upsample_conv(self.conv, x)  # (B, C, 2H, 2W), the 4x larger upsampled copy never made
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        if self.with_conv:
            x = self.conv(x)
        return x


def _check_attn_options(attn_type: str, extra_kwargs: dict[str, object]) -> None:
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}")
    # The reference also has linear attention (use_linear_attn / attn_type "linear"); we do not,
    # and silently building vanilla attention instead would load weights into the wrong maths.
    if extra_kwargs.get("use_linear_attn"):
        raise ValueError("use_linear_attn=True (linear attention) is not supported")


class _Mid(Protocol):
    """The attributes set on the plain ``nn.Module`` stored as ``mid`` (plain, as in CompVis, for its keys)."""

    block_1: ResnetBlock
    attn_1: nn.Module
    block_2: ResnetBlock


class _Level(Protocol):
    """The attributes set on a plain ``nn.Module`` of ``down`` / ``up``: ResnetBlocks and their AttnBlocks
    (empty where the level has no attention)."""

    block: nn.ModuleList
    attn: nn.ModuleList


class _DownLevel(_Level, Protocol):
    downsample: Downsample  # absent on the last level, which forward never downsamples


class _UpLevel(_Level, Protocol):
    upsample: Upsample  # absent on level 0, which forward never upsamples


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent statistics (B, 2*z_channels or z_channels, H/f, W/f).

    f = 2 ** (len(ch_mult) - 1). Level ``i`` has ``num_res_blocks`` ResnetBlocks of width
    ``ch * ch_mult[i]`` (each followed by an AttnBlock when the level's resolution is in
    ``attn_resolutions``) and, except for the last level, a Downsample.
    """

    def __init__(
        self,
        *,
        ch: int,  # base channel width
        out_ch: int,  # unused here; accepted so Encoder and Decoder share one config dict
        ch_mult: Sequence[int] = (1, 2, 4, 8),  # width multiplier per resolution level
        num_res_blocks: int,  # ResnetBlocks per level
        attn_resolutions: Sequence[int],  # feature-map sizes (pixels) that get an AttnBlock
        dropout: float = 0.0,
        resamp_with_conv: bool = True,  # conv (True) or average-pool (False) downsampling
        in_channels: int,  # image channels
        resolution: int,  # nominal input size, used only to place attention
        z_channels: int,  # latent channels
        double_z: bool = True,  # emit mean and logvar (2 * z_channels)
        attn_type: str = "vanilla",  # "vanilla" or "none"
        **ignore_kwargs: object,  # other ddconfig keys (e.g. tanh_out) are accepted and ignored
    ) -> None:
        super().__init__()
        _check_attn_options(attn_type, ignore_kwargs)
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        curr_res = resolution
        in_ch_mult = (1, *tuple(ch_mult))
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(
                    ResnetBlock(
                        in_channels=block_in,
                        out_channels=block_out,
                        temb_channels=self.temb_ch,
                        dropout=dropout,
                    )
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(
            in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout
        )
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(
            in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout
        )

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1
        )

    def forward(self, x: Tensor) -> Tensor:
        temb = None
        h = self.conv_in(x)  # (B, ch, H, W)
        # The levels and mid are plain nn.Modules with attributes set in __init__, which mypy cannot see.
        mid = cast(_Mid, self.mid)
        for i_level in range(self.num_resolutions):
            level = cast(_DownLevel, self.down[i_level])
            for i_block in range(self.num_res_blocks):
                h = level.block[i_block](h, temb)  # (B, ch*ch_mult[i], H_i, W_i)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)  # (B, C, H_i/2, W_i/2)
        h = mid.block_1(h, temb)
        h = mid.attn_1(h)
        h = mid.block_2(h, temb)
        return _norm_out_conv(self.norm_out, self.conv_out, h)  # (B, 2*z_channels or z_channels, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f); mirror of :class:`Encoder`.

    Each level has ``num_res_blocks + 1`` ResnetBlocks. ``up`` is indexed by level in ascending order
    (``up.0`` is full resolution), although forward visits the levels from coarsest to finest.
    """

    def __init__(
        self,
        *,
        ch: int,  # base channel width
        out_ch: int,  # image channels produced
        ch_mult: Sequence[int] = (1, 2, 4, 8),  # width multiplier per resolution level
        num_res_blocks: int,  # the decoder uses num_res_blocks + 1 per level
        attn_resolutions: Sequence[int],  # feature-map sizes (pixels) that get an AttnBlock
        dropout: float = 0.0,
        resamp_with_conv: bool = True,  # conv after nearest upsampling
        in_channels: int,  # unused here; accepted so Encoder and Decoder share one config dict
        resolution: int,  # nominal output size, used only to place attention
        z_channels: int,  # latent channels
        give_pre_end: bool = False,  # return features before norm_out/conv_out
        tanh_out: bool = False,  # squash the output with tanh
        attn_type: str = "vanilla",  # "vanilla" or "none"
        **ignore_kwargs: object,  # other ddconfig keys (e.g. double_z) are accepted and ignored
    ) -> None:
        super().__init__()
        _check_attn_options(attn_type, ignore_kwargs)
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[self.num_resolutions - 1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(
            in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout
        )
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(
            in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout
        )

        # Built coarsest-first (that is where channel counts are known), stored finest-first.
        levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(
                    ResnetBlock(
                        in_channels=block_in,
                        out_channels=block_out,
                        temb_channels=self.temb_ch,
                        dropout=dropout,
                    )
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        temb = None
        h = self.conv_in(z)  # (B, ch*ch_mult[-1], h, w)
        # The levels and mid are plain nn.Modules with attributes set in __init__, which mypy cannot see.
        mid = cast(_Mid, self.mid)
        h = mid.block_1(h, temb)
        h = mid.attn_1(h)
        h = mid.block_2(h, temb)
        for i_level in reversed(range(self.num_resolutions)):
            level = cast(_UpLevel, self.up[i_level])
            for i_block in range(self.num_res_blocks + 1):
                h = level.block[i_block](h, temb)  # (B, ch*ch_mult[i], H_i, W_i)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)  # (B, C, 2*H_i, 2*W_i)
        if self.give_pre_end:
            return h
        h = _norm_out_conv(self.norm_out, self.conv_out, h)  # (B, out_ch, H, W)
        if self.tanh_out:
            h = torch.tanh(h)
        return h
