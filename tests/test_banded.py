"""Row-banded inference of the autoencoder's large maps (`nn/banded.py`): same numbers, no full-size temporaries."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ldmkit.nn.banded as banded
from ldmkit.models.ae_modules import Decoder, Encoder

DDCONFIG = dict(ch=32, out_ch=3, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), in_channels=3,
                resolution=64, z_channels=4)


def _nets() -> tuple[Encoder, Decoder]:
    torch.manual_seed(0)
    enc, dec = Encoder(**DDCONFIG).eval(), Decoder(**DDCONFIG).eval()
    g = torch.Generator().manual_seed(1)
    for m in [*enc.modules(), *dec.modules()]:  # GroupNorm affines away from (1, 0), so a dropped one shows
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.data = 1 + 0.3 * torch.randn(m.weight.shape, generator=g)
            m.bias.data = 0.3 * torch.randn(m.bias.shape, generator=g)
    return enc, dec


@torch.no_grad()
@pytest.mark.parametrize("channels_last", [False, True])
def test_banded_encoder_and_decoder_equal_the_plain_forward(monkeypatch, channels_last) -> None:
    enc, dec = _nets()
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 23, 17, generator=g)  # 92 x 68 px: no band count divides the rows evenly
    x = torch.randn(2, 3, 92, 68, generator=g)
    monkeypatch.setattr(banded, "MIN_PIXELS", 10**12)
    plain_dec, plain_enc = dec(z), enc(x)
    monkeypatch.setattr(banded, "MIN_PIXELS", 16)  # every map of these nets is now banded
    if channels_last:
        enc, dec = enc.to(memory_format=torch.channels_last), dec.to(memory_format=torch.channels_last)
        z, x = z.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(dec(z), plain_dec, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(enc(x), plain_enc, atol=2e-5, rtol=1e-5)
    assert plain_dec.abs().max() > 0.5  # a real signal, not a near-zero output any code would match


class _Largest(TorchDispatchMode):
    """Records the largest output (elements) of each op kind."""

    def __init__(self) -> None:
        super().__init__()
        self.largest: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        outs = out if isinstance(out, tuple | list) else [out]
        n = max((t.numel() for t in outs if isinstance(t, torch.Tensor)), default=0)
        self.largest[name] = max(self.largest.get(name, 0), n)
        return out


@torch.no_grad()
def test_banded_decode_makes_no_full_size_norm_or_upsample_map(monkeypatch) -> None:
    _, dec = _nets()
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))  # 128 x 128 px out
    full = 32 * 128 * 128  # one full-resolution map of the finest level (32 channels)
    monkeypatch.setattr(banded, "MIN_PIXELS", 64 * 64)  # the two finest levels are banded
    with _Largest() as seen:
        out = dec(z)
    assert out.shape == (1, 3, 128, 128)
    assert "native_group_norm" not in seen.largest or seen.largest["native_group_norm"] < full // 4  # coarse only
    # the upsampled 64-channel copy exists one band (16 rows + halo) at a time, never whole (2 * full)
    assert seen.largest["upsample_nearest2d"] <= 2 * full * 20 // 128
    monkeypatch.setattr(banded, "MIN_PIXELS", 10**12)
    with _Largest() as plain:
        dec(z)
    assert plain.largest["native_group_norm"] == 2 * full and plain.largest["upsample_nearest2d"] == 2 * full


def test_training_keeps_the_plain_autograd_path() -> None:
    _, dec = _nets()
    z = torch.randn(1, 4, 64, 64, requires_grad=True)  # 256 x 256 px: banded if there were no autograd
    assert not banded.use_bands(torch.zeros(1, 1, 256, 256))
    dec(z).square().mean().backward()  # the banded path writes into preallocated maps: it would break this
    assert z.grad is not None and z.grad.abs().sum() > 0
    with torch.no_grad():
        assert banded.use_bands(torch.zeros(1, 1, 256, 256))
        assert not banded.use_bands(torch.zeros(1, 1, 64, 64))
        assert banded.use_bands(torch.zeros(1, 1, 128, 128), upsample=2)


@torch.no_grad()
def test_attention_never_builds_the_hw_by_hw_matrix() -> None:
    """The autoencoder's mid-block attention and the ADM-style 3-D attention run torch's CPU flash kernel (4-D
    inputs): with 3-D inputs torch fell back to materialising softmax(q k^T), 34 GiB at a 2048 px decode."""
    from ldmkit.models.ae_modules import AttnBlock
    from ldmkit.nn.attention import sliced_attention

    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(1, 32, 48, 48)  # 2,304 positions: the full matrix would be 5.3M elements
    with _Largest() as rec:
        out = block(x)
    assert max(rec.largest.values()) < 48 * 48 * 48 * 48 // 8, rec.largest
    # the same numbers as softmax(q k^T / sqrt(C)) v written out
    hn = block.norm(x)
    q, k, v = (conv(hn).flatten(2) for conv in (block.q, block.k, block.v))  # [1, C, HW]
    w = torch.softmax(q.transpose(1, 2) @ k / 32**0.5, dim=-1)  # [1, HW, HW]
    want = x + block.proj_out((v @ w.transpose(1, 2)).reshape(1, 32, 48, 48))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)

    q, k, v = torch.randn(3, 4, 2048, 16).unbind(0)  # [BH, N, D], the legacy QKVAttention layout
    with _Largest() as rec:
        got = sliced_attention(q, k, v)
    assert max(rec.largest.values()) < 4 * 2048 * 2048 // 8, rec.largest
    torch.testing.assert_close(got, torch.softmax(q @ k.transpose(1, 2) / 4, -1) @ v, rtol=1e-5, atol=1e-5)
