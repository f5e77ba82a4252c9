"""Sample-quality metrics on feature vectors: KID, Inception Score, improved precision and recall.

All take features (or class probabilities) as tensors, so any feature network can be used; which one was
used must be stated with every figure (`ldmkit eval` writes it into its report). The Frechet distance is in
`evaluation.frechet`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check(features: Tensor, name: str) -> Tensor:
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"{name}: expected features [N >= 2, D], got {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return features.double()


def polynomial_kernel(x: Tensor, y: Tensor, degree: int = 3, coef0: float = 1.0) -> Tensor:
    """k(x, y) = (x . y / d + coef0)^degree, the KID kernel (Binkowski et al. 2018, sec. 3)."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """The unbiased estimate of MMD^2 between the sets x [m, D] and y [n, D] (Binkowski et al. 2018, eq. 2):
    the mean of k over distinct pairs within x and within y, minus twice the mean of k across x and y."""
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def kernel_inception_distance(real: Tensor, fake: Tensor, *, subsets: int = 100, subset_size: int = 1000,
                              generator: torch.Generator | None = None) -> tuple[float, float]:
    """KID: mean and standard deviation of the unbiased MMD^2 over `subsets` random subsets of each set
    (each drawn without replacement, of min(subset_size, set size) elements), as torch-fidelity and
    torchmetrics report it."""
    real, fake = _check(real, "real features"), _check(fake, "fake features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")
    size = min(subset_size, real.shape[0], fake.shape[0])
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    values = torch.tensor([mmd2_unbiased(real[torch.randperm(real.shape[0], generator=g)[:size]],
                                         fake[torch.randperm(fake.shape[0], generator=g)[:size]])
                           for _ in range(subsets)], dtype=torch.float64)
    return float(values.mean()), float(values.std(unbiased=False)) if subsets > 1 else 0.0


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split of the samples, mean and std over splits (Salimans et al.
    2016, sec. 4). `logits` [N, K]: the classifier's unnormalised log-probabilities (for Inception, the
    1008-way logits without the fc bias, as the original TF code)."""
    if logits.ndim != 2 or logits.shape[0] < splits:
        raise ValueError(f"expected logits [N >= splits ({splits}), K], got {tuple(logits.shape)}")
    logp = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for part in logp.chunk(splits):
        log_py = torch.logsumexp(part, dim=0) - math.log(part.shape[0])  # log of the split's marginal p(y)
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(kl.exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))


def _pairwise_distances(a: Tensor, b: Tensor, batch: int = 2048) -> Tensor:
    return torch.cat([torch.cdist(part, b) for part in a.split(batch)])


def _knn_radii(x: Tensor, k: int) -> Tensor:
    """Distance of each point to its k-th nearest other point of the same set."""
    d = _pairwise_distances(x, x)
    return d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself (0)


def _coverage(points: Tensor, centres: Tensor, radii: Tensor, batch: int = 2048) -> float:
    """Share of `points` inside at least one ball (centre, radius)."""
    inside = [(torch.cdist(part, centres) <= radii[None]).any(1) for part in points.split(batch)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eq. 1-2): a set's manifold is the union of
    balls around its points reaching each point's k-th nearest neighbour; precision is the share of fake
    samples on the real manifold, recall the share of real samples on the fake manifold."""
    real, fake = _check(real, "real features"), _check(fake, "fake features")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set")
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall
