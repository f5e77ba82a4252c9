"""DDIM and PLMS against diffusers' DDIMScheduler and PNDMScheduler (PRK steps skipped) on a tiny eps model."""

import importlib.util

import pytest
import torch

from ldmkit.diffusion import DiscreteDenoiser, NoiseSchedule, sample_ddim
from ldmkit.diffusion.samplers.plms import sample_plms

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
from test_k_samplers import NET, SD_CONFIG  # noqa: E402  (same tiny eps net and SD config)

SD = NoiseSchedule.make("linear", 1000, 0.00085, 0.012)


def _x_T():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(11))


def _diffusers_loop(scheduler, steps, x, **step_kw):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(NET(x, t), t, x, **step_kw).prev_sample
    return x, scheduler.timesteps.clone()


@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_matches_diffusers(steps):
    import diffusers

    # LDM's DDIM: "leading" + steps_offset 1, and the last step lands on alpha_bar_0 (set_alpha_to_one False)
    sched = diffusers.DDIMScheduler(**SD_CONFIG, set_alpha_to_one=False, clip_sample=False)
    ref, ts = _diffusers_loop(sched, steps, _x_T(), eta=0.0)
    seen = []
    ours = sample_ddim(DiscreteDenoiser(NET, SD, "eps"), _x_T(), SD, steps=steps,
                       callback=lambda d: seen.append(d["t"]))
    assert seen == ts.tolist()
    err = (ours - ref).abs().max().item()
    print(f"max error {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("steps", [10, 25])
def test_plms_matches_diffusers_pndm(steps):
    import diffusers

    sched = diffusers.PNDMScheduler(**SD_CONFIG, skip_prk_steps=True, set_alpha_to_one=False)
    ref, _ = _diffusers_loop(sched, steps, _x_T())
    ours = sample_plms(DiscreteDenoiser(NET, SD, "eps"), _x_T(), SD, steps=steps)
    err = (ours - ref).abs().max().item()
    print(f"max error {err:.2e}")
    assert err <= 1e-4
