"""Noise schedules of discrete-time diffusion models, as plain tensors.

Notation (Ho et al. 2020, "DDPM"): beta_t is the variance added at step t, alpha_t = 1 - beta_t and
alpha_bar_t = prod_{s<=t} alpha_s, so that q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).
Index t runs over 0..T-1 as in the CompVis code (its t = 0 is the paper's t = 1).

The schedule itself is kept in float64. The reference code stores float32 copies of every derived quantity
as module buffers and samples with those; `NoiseSchedule.buffers()` reproduces them bit for bit, and the
samplers use the float32 `alphas_cumprod` so that trajectories match the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "sqrt_linear", "true_linear", "sqrt", "cosine")


def make_beta_schedule(
    kind: str,
    num_timesteps: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> Tensor:
    """beta_1..beta_T in float64.

    "linear" is LDM's (and Stable Diffusion's) schedule: linear in sqrt(beta), then squared
    (diffusers calls it "scaled_linear"). "sqrt_linear" is LDM's name for a schedule linear in beta itself
    ("true_linear" is our alias); "sqrt" is the square root of that; "cosine" is Nichol & Dhariwal (2021),
    eq. 17, with betas clipped to 0.999.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if kind in ("linear", "scaled_linear"):
        return torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if kind in ("sqrt_linear", "true_linear"):
        return torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64)
    if kind == "sqrt":
        return torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64) ** 0.5
    if kind == "cosine":
        # alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), normalised so alpha_bar(0) = 1  (eq. 17)
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps + cosine_s
        alpha_bar = torch.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0, 0.999)
    raise ValueError(f"unknown beta schedule {kind!r}; choose one of {', '.join(BETA_SCHEDULES)}")


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete variance-preserving schedule: betas (float64, [T]) and everything derived from them."""

    betas: Tensor

    @classmethod
    def make(
        cls,
        kind: str = "linear",
        num_timesteps: int = 1000,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        cosine_s: float = 8e-3,
    ) -> NoiseSchedule:
        return cls(make_beta_schedule(kind, num_timesteps, linear_start, linear_end, cosine_s))

    def __post_init__(self) -> None:
        b = self.betas
        # beta_T = 1 is allowed: that is a zero-terminal-SNR schedule (see `rescale_zero_terminal_snr`)
        if b.ndim != 1 or not torch.all((b > 0) & (b <= 1)):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        object.__setattr__(self, "betas", b.to(torch.float64))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas_cumprod(self) -> Tensor:
        """alpha_bar_t in float64."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def alphas_cumprod_f32(self) -> Tensor:
        """alpha_bar_t as the float32 buffer the reference samplers read."""
        return self.alphas_cumprod.float()

    def buffers(self) -> dict[str, Tensor]:
        """The twelve float32 buffers of CompVis `DDPM.register_schedule` (eps parameterisation, v_posterior 0).

        They are also the root keys of an original LDM checkpoint.
        """
        betas = self.betas.numpy()
        alphas = 1.0 - betas
        ac = np.cumprod(alphas, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        # posterior q(x_{t-1} | x_t, x_0): variance beta~_t and mean coefficients (DDPM eq. 6-7)
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        out = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
            "posterior_variance": post_var,
            # log of the variance clipped away from 0: beta~_0 is exactly 0
            "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        }
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}

    def lvlb_weights(self) -> Tensor:
        """VLB weights of the eps-parameterised L_simple terms, beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t))."""
        buf = self.buffers()
        alphas = torch.tensor(1.0 - self.betas.numpy(), dtype=torch.float32)
        w = buf["betas"] ** 2 / (2 * buf["posterior_variance"] * alphas * (1 - buf["alphas_cumprod"]))
        w[0] = w[1]  # the t = 0 term divides by a zero posterior variance
        return w

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample q(x_t | x_0) = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (DDPM eq. 4)."""
        a = _gather(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at integer steps t, float64."""
        a = self.alphas_cumprod[t.long().cpu()]
        return a / (1 - a)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0 exactly (Lin et al. 2024, Algorithm 1).

    sqrt(alpha_bar_1) is kept, sqrt(alpha_bar_T) becomes 0, everything in between moves linearly. The
    model then sees pure noise at the last step, which only a v- or x0-predicting model can denoise.
    """
    ab_sqrt = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
    ab_sqrt = (ab_sqrt - last) * first / (first - last)
    ab = ab_sqrt**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] shaped [B, 1, 1, ...] to broadcast against `like`, in like's dtype and device."""
    out = values[t.long().cpu()].to(device=like.device, dtype=like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))  # [B] -> [B, 1, 1, 1]


SPACINGS = ("uniform", "quad", "leading", "trailing", "linspace")


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "uniform") -> Tensor:
    """A sub-sequence of training steps to sample on, ascending.

    LDM's `make_ddim_timesteps`:
      "uniform": range(0, T, T // S) + 1, so 50 steps give 1, 21, ..., 981 (when S does not divide T the
      sequence can be one longer than S, exactly as in the reference; where the +1 shift would step past
      T - 1, e.g. S = 3 gives 1000, an IndexError there, that entry is dropped);
      "quad": quadratic spacing up to 0.8 T, + 1 (repeated steps dropped).
    The diffusers spacings (Lin et al. 2024, Table 2): "leading" = arange(S) * (T // S) (SD's DDIM with
    steps_offset 1 is "uniform"), "trailing" = round(arange(T, 0, -T / S)) - 1 (always ends on T - 1),
    "linspace" = round(linspace(0, T - 1, S)).
    """
    T = num_train_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"steps must be between 1 and {T}, got {num_steps}")
    if spacing == "uniform":
        steps = np.arange(0, T, T // num_steps) + 1  # +1: the last step lands on alpha_bar_1, not alpha_bar_0
        steps = steps[steps < T]
    elif spacing == "quad":
        # the reference repeats early steps when S is large (37 steps give 1, 1, ...); a repeat is a wasted
        # model call that moves nothing, so it is dropped
        steps = np.unique(((np.linspace(0, np.sqrt(T * 0.8), num_steps)) ** 2).astype(int) + 1)
    elif spacing == "leading":
        steps = np.arange(num_steps) * (T // num_steps)
    elif spacing == "trailing":
        steps = (np.round(np.arange(T, 0, -T / num_steps)) - 1).astype(np.int64)[::-1]
    elif spacing == "linspace":
        steps = np.linspace(0, T - 1, num_steps).round().astype(np.int64)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return torch.from_numpy(np.ascontiguousarray(steps)).long()
