"""Schedules and q-sampling: closed forms and the CompVis `register_schedule` / DDIM fixtures."""

import math

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.diffusion import NoiseSchedule, ddim_timesteps, make_beta_schedule
from ldmkit.diffusion.samplers.ddim import ddim_coefficients

pytestmark = pytest.mark.reference  # reads tests/fixtures/reference (conftest.reference_dir)

PREFIXES = {
    "sd": (0.00085, 0.012),
    "ldm_0.0015_0.0155": (0.0015, 0.0155),
    "ldm_0.0015_0.0195": (0.0015, 0.0195),
    "ldm_0.0015_0.0205": (0.0015, 0.0205),
    "ddpm_default_1e-4_2e-2": (1e-4, 2e-2),
}


@pytest.fixture(scope="module")
def fx(reference_dir):
    return load_file(reference_dir / "parity" / "schedules.safetensors")


def test_linear_schedule_closed_form():
    b = make_beta_schedule("linear", 1000, 0.00085, 0.012)
    assert b.dtype == torch.float64
    assert b[0].item() == pytest.approx(0.00085, abs=1e-15)
    assert b[-1].item() == pytest.approx(0.012, abs=1e-15)
    # linear in sqrt(beta): constant first difference of sqrt(beta)
    d = b.sqrt().diff()
    assert torch.allclose(d, d[0].expand_as(d), atol=1e-15)
    # alpha_bar_t = prod (1 - beta_s), strictly decreasing
    s = NoiseSchedule(b)
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085)
    assert torch.all(s.alphas_cumprod.diff() < 0)


def test_other_schedules_closed_form():
    lin = make_beta_schedule("sqrt_linear", 10, 0.1, 0.2)
    assert torch.allclose(lin, torch.linspace(0.1, 0.2, 10, dtype=torch.float64))
    assert torch.allclose(make_beta_schedule("sqrt", 10, 0.1, 0.2), lin.sqrt())
    cos = NoiseSchedule(make_beta_schedule("cosine", 1000))
    # Nichol & Dhariwal: alpha_bar(t) = f(t)/f(0) with f(t) = cos^2((t/T + s)/(1 + s) pi/2)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cos.alphas_cumprod[499].item() == pytest.approx(f(500) / f(0), rel=1e-9)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_beta_schedule("nope", 10)


@pytest.mark.parametrize("prefix", list(PREFIXES))
def test_betas_and_alphas_cumprod_match_reference(fx, prefix):
    s = NoiseSchedule.make("linear", 1000, *PREFIXES[prefix])
    assert torch.equal(s.betas, fx[f"{prefix}.betas_float64"])
    assert torch.allclose(s.alphas_cumprod, fx[f"{prefix}.alphas_cumprod_float64"], rtol=0, atol=1e-15)
    assert torch.equal(s.alphas_cumprod_f32, fx[f"{prefix}.alphas_cumprod_float32"])


@pytest.mark.parametrize("prefix", ["sd", "ldm_0.0015_0.0155"])
def test_ddpm_buffers_match_reference(fx, prefix):
    s = NoiseSchedule.make("linear", 1000, *PREFIXES[prefix])
    buf = s.buffers()
    assert len(buf) == 12
    assert torch.equal(buf["alphas_cumprod"], fx[f"{prefix}.alphas_cumprod_float32"])
    for name, value in buf.items():
        if name == "alphas_cumprod":
            continue
        ref = fx[f"{prefix}.buffer.{name}"]
        assert value.dtype == torch.float32
        assert torch.allclose(value, ref, rtol=1e-6, atol=0), name
    assert torch.allclose(s.lvlb_weights(), fx[f"{prefix}.lvlb_weights"], rtol=1e-5, atol=0)


def test_ddim_timesteps_match_reference(fx):
    assert torch.equal(ddim_timesteps(20), fx["ddim_timesteps.uniform_20"])
    assert torch.equal(ddim_timesteps(50), fx["ddim_timesteps.uniform_50"])
    assert torch.equal(ddim_timesteps(20, spacing="quad"), fx["ddim_timesteps.quad_20"])
    assert ddim_timesteps(50)[:3].tolist() == [1, 21, 41]
    assert ddim_timesteps(3).tolist() == [1, 334, 667]  # the reference's 1000 would be out of range
    assert len(ddim_timesteps(30)) == 31  # as the reference: range(0, 1000, 33) has 31 entries
    with pytest.raises(ValueError, match="steps must be between"):
        ddim_timesteps(0)


@pytest.mark.parametrize("steps", [20, 50])
def test_ddim_parameters_match_reference(fx, steps):
    s = NoiseSchedule.make("linear", 1000, 0.00085, 0.012)
    grid = ddim_timesteps(steps)
    for eta in (0, 1):
        a, a_prev, sigma = ddim_coefficients(s, grid, float(eta))
        p = f"ddim_params.sd.S{steps}.eta{eta}."
        # the reference mixes float32 and float64 here; sigma enters the step as float32 anyway
        assert torch.allclose(sigma, fx[p + "ddim_sigmas"], rtol=1e-6, atol=0)
        if eta == 0:
            assert torch.equal(a, fx[p + "ddim_alphas"])
            assert torch.equal(a_prev, fx[p + "ddim_alphas_prev"])
            assert torch.allclose((1 - a).sqrt(), fx[p + "ddim_sqrt_one_minus_alphas"], rtol=1e-6, atol=0)
    assert a_prev[0].item() == pytest.approx(0.99915, abs=1e-7)  # not 1.0: the reference's last step


def test_q_sample_closed_form():
    s = NoiseSchedule.make("linear", 1000, 0.00085, 0.012)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    eps = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    xt = s.q_sample(x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        a = s.alphas_cumprod[ti].item()
        assert torch.allclose(xt[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i], atol=1e-6)


def test_q_sample_marginal_statistics():
    # x0 = c everywhere: q(x_t | x0) has mean sqrt(a) c and variance 1 - a
    s = NoiseSchedule.make("linear", 1000, 0.00085, 0.012)
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((200_000,), 2.0)
    t = torch.full((200_000,), 300)
    xt = s.q_sample(x0.view(-1, 1), t, torch.randn(200_000, 1, generator=g))
    a = s.alphas_cumprod[300].item()
    assert xt.mean().item() == pytest.approx(2 * math.sqrt(a), abs=0.01)
    assert xt.var().item() == pytest.approx(1 - a, abs=0.01)


def test_diffusers_timestep_spacings():
    # values as diffusers' DDIM builds them for 10 steps over 1000 (Lin et al. 2024, Table 2)
    assert ddim_timesteps(10, spacing="leading").tolist() == list(range(0, 1000, 100))
    assert ddim_timesteps(10, spacing="trailing").tolist() == list(range(99, 1000, 100))
    assert ddim_timesteps(10, spacing="linspace").tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    # SD's DDIM ("leading" with steps_offset 1) is LDM's "uniform"
    assert torch.equal(ddim_timesteps(50, spacing="leading") + 1, ddim_timesteps(50, spacing="uniform"))
    for spacing in ("uniform", "quad", "leading", "trailing", "linspace"):
        grid = ddim_timesteps(37, spacing=spacing)
        assert torch.all(grid.diff() > 0) and grid.min() >= 0 and grid.max() <= 999, spacing
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        ddim_timesteps(10, spacing="wrong")


def test_zero_terminal_snr_rescaling():
    from ldmkit.diffusion.schedules import rescale_zero_terminal_snr

    base = make_beta_schedule("linear", 1000, 0.00085, 0.012)
    s = NoiseSchedule(rescale_zero_terminal_snr(base))
    ab = s.alphas_cumprod
    assert ab[-1].item() == 0.0 and s.betas[-1].item() == pytest.approx(1.0)
    assert ab[0].item() == pytest.approx(NoiseSchedule(base).alphas_cumprod[0].item(), rel=1e-12)
    assert torch.all(ab.diff() <= 0)
    # sqrt(alpha_bar) is an affine map of the original one (Lin et al. 2024, Algorithm 1)
    old = NoiseSchedule(base).alphas_cumprod.sqrt()
    new = ab.sqrt()
    ratio = (new[1:-1] - new[-1]) / (old[1:-1] - old[-1])
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-9)
