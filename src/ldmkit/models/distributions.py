"""Diagonal Gaussian posterior q(z | x) of the KL autoencoder (Rombach et al. 2022, Sec. 3.1).

The encoder emits ``2 * C`` channels: the first ``C`` are the mean, the last ``C`` the log-variance.
Numerics follow the CompVis ``DiagonalGaussianDistribution`` so that checkpoints and fixtures agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..diffusion.noise import Generators, randn

# Log-variance is clamped to this range before exponentiating (same bounds as the reference),
# so that exp(logvar) can neither underflow to 0 nor overflow to inf in float32.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0

_LOG_TWO_PI = math.log(2.0 * math.pi)


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) parameterised by a ``(B, 2C, H, W)`` tensor split on dim 1.

    With ``deterministic=True`` the distribution collapses to a point mass at the mean:
    std and var are zero, ``sample()`` returns the mean and ``kl``/``nll`` return zeros.
    """

    def __init__(self, parameters: Tensor, deterministic: bool = False) -> None:
        if parameters.dim() < 2 or parameters.shape[1] % 2 != 0:
            raise ValueError(
                "DiagonalGaussianDistribution expects parameters with an even channel count on dim 1 "
                f"(mean and logvar halves), got shape {tuple(parameters.shape)}"
            )
        self.parameters = parameters  # (B, 2C, H, W)
        self.deterministic = deterministic
        mean, logvar = torch.chunk(parameters, 2, dim=1)  # 2 x (B, C, H, W)
        self.mean = mean
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)  # sigma = exp(logvar / 2)
            self.var = torch.exp(self.logvar)  # sigma^2 = exp(logvar)

    def sample(self, generator: Generators = None) -> Tensor:
        """Reparameterised draw z = mean + std * eps, eps ~ N(0, I).

        With ``generator=None`` eps comes from torch's global RNG (so ``torch.manual_seed`` reproduces
        it); otherwise eps is drawn on the generator's device and moved to the mean's device (a list of
        generators draws one item each).
        """
        eps = randn(self.mean.shape, generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The mode of a Gaussian is its mean."""
        return self.mean

    def _zeros_per_item(self) -> Tensor:
        return torch.zeros(self.mean.shape[0], dtype=self.mean.dtype, device=self.mean.device)

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Tensor:
        """KL(self || other) per batch item, summed over dims 1, 2, 3; ``(B,)``.

        other=None means the standard normal prior:
            KL(N(mu, s^2) || N(0, 1)) = 1/2 * sum(mu^2 + s^2 - 1 - log s^2)
        otherwise, for two diagonal Gaussians:
            KL(N(mu1, s1^2) || N(mu2, s2^2)) = 1/2 * sum((mu1 - mu2)^2 / s2^2 + s1^2 / s2^2 - 1
                                                         - log s1^2 + log s2^2)
        """
        if self.deterministic:
            return self._zeros_per_item()
        dims = [1, 2, 3]
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=dims,
        )

    def nll(self, sample: Tensor, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        """Negative log-likelihood of ``sample`` under this Gaussian, summed over ``dims``.

        -log N(x; mu, s^2) = 1/2 * sum(log(2 pi) + log s^2 + (x - mu)^2 / s^2)
        """
        if self.deterministic:
            return self._zeros_per_item()
        return 0.5 * torch.sum(
            _LOG_TWO_PI + self.logvar + (sample - self.mean).pow(2) / self.var,
            dim=list(dims),
        )
