"""Frechet distance between Gaussians fitted to feature sets (the quantity behind FID).

For N(mu1, S1) and N(mu2, S2) (Heusel et al. 2017, eq. 6; Dowson & Landau 1982):

    d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))

``S1 S2`` is not symmetric, and the usual ``scipy.linalg.sqrtm`` route can return complex values
or fail for the rank-deficient covariances that come from few samples or dead ReLU features.
We use instead that ``S1 S2`` is similar to the symmetric PSD matrix ``M = S1^(1/2) S2 S1^(1/2)``
(conjugate by ``S1^(1/2)``), so ``Tr((S1 S2)^(1/2)) = Tr(M^(1/2)) = sum(sqrt(eig(M)))``.  Both
square roots come from ``torch.linalg.eigh`` in float64 with tiny negative eigenvalues (round-off)
clamped to 0, which is exact for singular covariances as well.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["feature_statistics", "frechet_distance", "frechet_distance_from_features"]

ArrayLike = Tensor | np.ndarray


def _as_float64(x: ArrayLike, name: str) -> Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return t


def _psd_sqrt(s: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix via eigendecomposition (negative round-off clamped)."""
    s = 0.5 * (s + s.T)  # remove asymmetry from round-off so eigh sees an exactly symmetric matrix
    eigvals, eigvecs = torch.linalg.eigh(s)
    root = eigvals.clamp_min(0.0).sqrt()
    return (eigvecs * root) @ eigvecs.T  # V diag(sqrt(l)) V^T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Squared Frechet (2-Wasserstein) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    This is the number reported as "FID" (which, despite the name, is the *squared* distance).
    Means are ``[D]``, covariances ``[D, D]`` and symmetric positive semi-definite; singular
    covariances are fine.  Computed in float64; the result is clamped at 0 against round-off.
    """
    m1, m2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    s1, s2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    if m1.ndim != 1 or m1.shape != m2.shape:
        raise ValueError(f"means must be 1-D of equal length, got {tuple(m1.shape)} and {tuple(m2.shape)}")
    d = m1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be [{d}, {d}], got {tuple(s1.shape)} and {tuple(s2.shape)}")

    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1  # S1^(1/2) S2 S1^(1/2): symmetric PSD, same eigenvalues as S1 S2
    middle = 0.5 * (middle + middle.T)
    tr_covmean = torch.linalg.eigvalsh(middle).clamp_min(0.0).sqrt().sum()

    diff = m1 - m2
    value = diff.dot(diff) + torch.trace(s1) + torch.trace(s2) - 2.0 * tr_covmean
    return max(0.0, float(value))


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``features [N, D]``.

    The covariance divides by ``N - 1`` like ``numpy.cov``, the convention of the reference FID code.
    """
    f = _as_float64(features, "features")
    if f.ndim != 2:
        raise ValueError(f"features must be [N, D], got {tuple(f.shape)}")
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {n}")
    mu = f.mean(dim=0)  # [D]
    centred = f - mu  # [N, D]
    sigma = centred.T @ centred / (n - 1)  # [D, D]
    return mu, sigma


def frechet_distance_from_features(features1: Tensor, features2: Tensor) -> float:
    """``frechet_distance`` of the Gaussians fitted to two feature sets ``[N1, D]`` and ``[N2, D]``."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
