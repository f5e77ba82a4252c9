"""DDIM trajectories against the CompVis / Stability DDIMSampler fixtures, and determinism."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.diffusion import DiscreteDenoiser, NoiseSchedule, guided_denoiser, sample_ddim
from ldmkit.models.unet import UNetConfig, UNetModel

pytestmark = pytest.mark.reference  # reads tests/fixtures/reference (conftest.reference_dir)


def _unet(reference_dir, name):
    kwargs = json.loads((reference_dir / "parity" / f"{name}.json").read_text())["constructor_kwargs"]
    model = UNetModel(UNetConfig(**kwargs)).eval()
    model.load_state_dict(load_file(reference_dir / "parity" / f"{name}.weights.safetensors"), strict=True)
    return model


def _run(reference_dir, fixture, unet_name, parameterization, run, scale):
    fx = {k: v.clone() for k, v in load_file(reference_dir / "parity" / f"{fixture}.safetensors").items()}
    model = _unet(reference_dir, unet_name)
    schedule = NoiseSchedule.make("linear", 1000, 0.00085, 0.012)
    denoiser = DiscreteDenoiser(model, schedule, parameterization)
    fn = guided_denoiser(denoiser, {"context": fx["input.context"]}, {"context": fx["input.uncond_context"]}, scale)
    xs, x0s = [fx["input.x_T"]], [fx["input.x_T"]]

    def record(info):
        xs.append(info["x"])
        x0s.append(info["denoised"])

    out = sample_ddim(fn, fx["input.x_T"], schedule, steps=20, eta=0.0, callback=record)
    assert len(xs) == 21
    return fx, out, torch.stack(xs), torch.stack(x0s)


@pytest.mark.parametrize(
    "fixture,unet_name,param,run,scale",
    [
        ("samplers_eps", "unet_sd1_conv", "eps", "ddim20_eta0", 1.0),
        ("samplers_eps", "unet_sd1_conv", "eps", "ddim20_eta0_cfg7.5", 7.5),
        ("samplers_v", "unet_sd2_linear", "v", "ddim20_eta0_v", 1.0),
        ("samplers_v", "unet_sd2_linear", "v", "ddim20_eta0_v_cfg7.5", 7.5),
    ],
)
def test_ddim_matches_reference_trajectory(reference_dir, fixture, unet_name, param, run, scale):
    fx, out, xs, x0s = _run(reference_dir, fixture, unet_name, param, run, scale)
    assert (out - fx[f"{run}.samples"]).abs().max().item() <= 1e-3
    assert (xs - fx[f"{run}.x_inter"]).abs().max().item() <= 1e-3
    assert (x0s - fx[f"{run}.pred_x0"]).abs().max().item() <= 1e-3


def _toy_denoiser(x, t):
    # a smooth, t-dependent x0 estimate: enough to exercise the sampler without a network
    return torch.tanh(x) * (1 - t.view(-1, 1, 1, 1) / 2000)


def test_ddim_eta0_is_deterministic_and_eta1_follows_generator():
    s = NoiseSchedule.make("linear", 1000, 0.00085, 0.012)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    a = sample_ddim(_toy_denoiser, x, s, steps=10)
    b = sample_ddim(_toy_denoiser, x, s, steps=10)
    assert torch.equal(a, b)
    c1 = sample_ddim(_toy_denoiser, x, s, steps=10, eta=1.0, generator=torch.Generator().manual_seed(5))
    c2 = sample_ddim(_toy_denoiser, x, s, steps=10, eta=1.0, generator=torch.Generator().manual_seed(5))
    c3 = sample_ddim(_toy_denoiser, x, s, steps=10, eta=1.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(c1, c2)
    assert not torch.allclose(c1, c3)
    assert not torch.allclose(a, c1)


def test_ddim_recovers_a_point_mass():
    # data = a single point c: the exact denoiser returns c, and DDIM must land on (almost) c
    s = NoiseSchedule.make("linear", 1000, 0.00085, 0.012)
    c = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    x = torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    out = sample_ddim(lambda x, t: c.expand_as(x), x, s, steps=25)
    # the last step stops at alpha_bar_0 = 0.99915 (reference behaviour), leaving sqrt(1 - a) of noise
    assert (out - c).abs().max().item() < 0.05 * x.abs().max().item() + 1e-6


def test_ddim_inpainting_keeps_known_region():
    s = NoiseSchedule.make("linear", 1000, 0.00085, 0.012)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 1, 4, 4, generator=g)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1
    out = sample_ddim(lambda x, t: x0 * mask, torch.randn(1, 1, 4, 4, generator=g), s,
                      steps=20, mask=mask, x0=x0, generator=g)
    # a denoiser that knows only the masked half: that half ends at x0 (re-noised to step 1, then one
    # DDIM step), the rest at the denoiser's 0
    assert (out - x0)[..., :2].abs().max() < 0.2
    assert out[..., 2:].abs().max() < 0.2
    with pytest.raises(ValueError, match="both mask and x0"):
        sample_ddim(_toy_denoiser, x0, s, steps=5, mask=mask)


def test_ddim_img2img_strength():
    s = NoiseSchedule.make("linear", 1000, 0.00085, 0.012)
    g = torch.Generator().manual_seed(0)
    init = torch.randn(2, 3, 4, 4, generator=g)
    noise = torch.randn(2, 3, 4, 4, generator=g)
    seen = []
    out = sample_ddim(lambda x, t: torch.zeros_like(x), noise, s, steps=20, init=init, strength=0.25,
                      callback=lambda d: seen.append(d["t"]))
    assert seen == [201, 151, 101, 51, 1]  # the last quarter (5 of 20) of the grid, from its top
    # a denoiser that returns the init image keeps it (strength only decides how far we re-noise)
    back = sample_ddim(lambda x, t: init, noise, s, steps=20, init=init, strength=0.5)
    assert (back - init).abs().max() < 0.05 * noise.abs().max()
    # strength 1 from a pure-noise start is ordinary sampling (up to alpha_bar of the top step)
    full = sample_ddim(_toy_denoiser, noise, s, steps=10, init=init, strength=1.0)
    assert full.shape == init.shape and torch.isfinite(full).all()
    with pytest.raises(ValueError, match="strength must be in"):
        sample_ddim(_toy_denoiser, noise, s, steps=10, init=init, strength=0.0)
    assert out.shape == init.shape


def test_dynamic_thresholding():
    from ldmkit.diffusion.thresholding import dynamic_threshold, thresholded

    x0 = torch.tensor([[0.5, -0.2, 0.1, 0.3], [4.0, -2.0, 1.0, 0.0]]).view(2, 1, 2, 2)
    out = dynamic_threshold(x0, percentile=1.0)
    assert torch.equal(out[0], x0[0])  # inside [-1, 1]: s = max(quantile, 1) = 1, unchanged
    assert torch.allclose(out[1].flatten(), torch.tensor([1.0, -0.5, 0.25, 0.0]))  # divided by s = 4
    wrapped = thresholded(lambda x, t: x * 10, percentile=0.9)
    assert wrapped(torch.randn(3, 1, 8, 8), torch.zeros(3, dtype=torch.long)).abs().max() <= 1.0 + 1e-6
