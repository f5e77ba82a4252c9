"""DiagonalGaussianDistribution against reference values, plus AutoencoderKL input checks and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.models.autoencoder_kl import AutoencoderConfig, AutoencoderKL
from ldmkit.models.distributions import DiagonalGaussianDistribution

pytestmark = pytest.mark.reference  # reads tests/fixtures/reference (conftest.reference_dir)

ATOL = 1e-5


@pytest.fixture(scope="module")
def misc(reference_dir):
    tensors = load_file(str(reference_dir / "parity" / "misc.safetensors"))
    return {k: v.clone() for k, v in tensors.items() if k.startswith(("kl.", "kl_clamp."))}


def _close(actual, expected, rtol=1e-6):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=rtol)


def test_kl_to_standard_normal(misc):
    d = DiagonalGaussianDistribution(misc["kl.parameters"])
    _close(d.kl(), misc["kl.kl"])
    # Closed form written out independently of the class.
    mean, logvar = misc["kl.parameters"].double().chunk(2, dim=1)
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(d.kl().double(), expected, atol=1e-4, rtol=1e-6)


def test_kl_to_other(misc):
    d1 = DiagonalGaussianDistribution(misc["kl.parameters"])
    d2 = DiagonalGaussianDistribution(misc["kl.other_parameters"])
    _close(d1.kl(d2), misc["kl.kl_other"])
    # KL(p || p) = 0
    torch.testing.assert_close(d1.kl(d1), torch.zeros(2), atol=1e-5, rtol=0)


def test_nll_mode_std(misc):
    d = DiagonalGaussianDistribution(misc["kl.parameters"])
    _close(d.nll(misc["kl.nll_sample"]), misc["kl.nll"])
    _close(d.mode(), misc["kl.mode"])
    _close(d.std, misc["kl.std"])
    torch.testing.assert_close(d.var, d.std**2, atol=1e-6, rtol=1e-5)
    # nll over a single dim keeps the others
    assert d.nll(misc["kl.nll_sample"], dims=(1,)).shape == (2, 4, 4)


def test_nll_matches_torch_normal(misc):
    d = DiagonalGaussianDistribution(misc["kl.parameters"])
    x = misc["kl.nll_sample"]
    normal = torch.distributions.Normal(d.mean.double(), d.std.double())
    expected = -normal.log_prob(x.double()).sum(dim=(1, 2, 3))
    torch.testing.assert_close(d.nll(x).double(), expected, atol=1e-3, rtol=1e-5)
    assert math.isfinite(d.nll(x).sum().item())


def test_logvar_clamp(misc):
    params = misc["kl_clamp.parameters"]
    raw_logvar = params.chunk(2, dim=1)[1]
    assert raw_logvar.min() < -30 and raw_logvar.max() > 20  # the fixture does exercise the clamp
    d = DiagonalGaussianDistribution(params)
    _close(d.logvar, misc["kl_clamp.logvar"])
    assert d.logvar.min().item() == -30.0 and d.logvar.max().item() == 20.0
    assert torch.isfinite(d.std).all() and torch.isfinite(d.var).all()
    torch.testing.assert_close(d.kl(), misc["kl_clamp.kl"], atol=1e-5, rtol=1e-6)


def test_sample_rng_and_deterministic(misc):
    params = misc["kl.parameters"]
    d = DiagonalGaussianDistribution(params)
    torch.manual_seed(11)
    eps = torch.randn(d.mean.shape)
    torch.manual_seed(11)
    torch.testing.assert_close(d.sample(), d.mean + d.std * eps, atol=0, rtol=0)
    s1 = d.sample(torch.Generator().manual_seed(5))
    s2 = d.sample(torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2)

    point = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(point.sample(), point.mean)
    assert torch.equal(point.kl(), torch.zeros(2))
    assert torch.equal(point.nll(misc["kl.nll_sample"]), torch.zeros(2))


def test_odd_channel_parameters_rejected():
    with pytest.raises(ValueError, match="even channel count"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))


def _tiny_config(**overrides):
    cfg = dict(
        z_channels=3,
        resolution=16,
        in_channels=1,
        out_ch=1,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        embed_dim=3,
    )
    cfg.update(overrides)
    return AutoencoderConfig(**cfg)


def test_autoencoder_shapes_and_bad_inputs():
    torch.manual_seed(0)
    model = AutoencoderKL(_tiny_config(ch_mult=(1, 2, 2))).eval()
    assert model.downsample_factor == 4
    assert model.latent_channels == 3
    x = torch.randn(2, 1, 16, 12)
    with torch.no_grad():
        posterior = model.encode(x)
        assert posterior.mean.shape == (2, 3, 4, 3)
        recon, _ = model(x)
    assert recon.shape == x.shape

    with pytest.raises(ValueError, match="1 input channels, got 3"):
        model.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="divisible by the downsampling factor 4"):
        model.encode(torch.zeros(1, 1, 18, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model.encode(torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="latent"):
        model.decode(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="double_z"):
        _tiny_config(double_z=False)
    with pytest.raises(ValueError, match="attn_type"):
        _tiny_config(attn_type="linear")


def test_attn_type_none_has_no_attention_keys():
    model = AutoencoderKL(_tiny_config(attn_type="none"))
    assert not any(".attn" in k for k in model.state_dict())


def test_reconstruction_loss_reaches_encoder_and_decoder():
    torch.manual_seed(0)
    model = AutoencoderKL(_tiny_config(ch=32, attn_resolutions=()))
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    recon, posterior = model(x, generator=torch.Generator().manual_seed(1))
    loss = (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()
    loss.backward()
    prefixes = ("encoder.conv_in", "encoder.mid.attn_1.q", "quant_conv", "post_quant_conv")
    prefixes += ("decoder.conv_out", "decoder.up.0.block.0.conv1")
    for prefix in prefixes:
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), prefix
        assert any(g.abs().sum() > 0 for g in grads), prefix
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
