"""FID-style metrics: the Frechet distance and KID against independent computations, the Inception Score and
precision/recall on cases with known answers, and the FID Inception against an independent implementation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from inception_weights import fixture_images, random_inception_state
from ldmkit.evaluation.distribution_metrics import (
    inception_score,
    kernel_inception_distance,
    mmd2_unbiased,
    precision_recall,
)
from ldmkit.evaluation.frechet import frechet_distance
from ldmkit.models.inception import FIDInceptionV3, resize_bilinear_tf1
from ldmkit.models.weights_file import WeightsFileError

FIXTURES = Path(__file__).parent / "fixtures"


def test_frechet_distance_agrees_with_scipy_sqrtm() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)  # non-commuting covariances
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-6)


def test_mmd2_unbiased_agrees_with_a_direct_double_sum() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.5, 1.0, size=(9, 5))

    def k(u: np.ndarray, v: np.ndarray) -> float:
        return (u @ v / 5 + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    expected = xx + yy - 2 * xy
    assert mmd2_unbiased(torch.tensor(x), torch.tensor(y)) == pytest.approx(expected, rel=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(600, 16, generator=g)
    same = torch.randn(600, 16, generator=g)
    shifted = torch.randn(600, 16, generator=g) + 0.5
    mean_same, std_same = kernel_inception_distance(real, same, subsets=20, subset_size=300)
    mean_shift, _ = kernel_inception_distance(real, shifted, subsets=20, subset_size=300)
    assert abs(mean_same) < 3 * std_same + 1e-3  # unbiased: centred on 0, either sign
    assert mean_shift > 10 * max(abs(mean_same), std_same)


def test_inception_score_known_answers() -> None:
    k = 10
    confident = torch.full((1000, k), -30.0)
    confident[torch.arange(1000), torch.arange(1000) % k] = 30.0  # sure of one class, classes balanced
    assert inception_score(confident)[0] == pytest.approx(k, rel=1e-6)
    assert inception_score(torch.zeros(1000, k))[0] == pytest.approx(1.0, abs=1e-9)  # no information
    collapsed = torch.full((1000, k), -30.0)
    collapsed[:, 3] = 30.0  # sure, but always the same class: no diversity
    assert inception_score(collapsed)[0] == pytest.approx(1.0, abs=1e-6)


def test_precision_recall_on_toy_manifolds() -> None:
    g = torch.Generator().manual_seed(0)

    def circle(n: int, lo: float = 0.0, hi: float = 2 * math.pi) -> torch.Tensor:
        a = lo + (hi - lo) * torch.rand(n, generator=g)
        return torch.stack([a.cos(), a.sin()], 1)

    real = circle(2000)
    p, r = precision_recall(real, circle(2000))
    assert p > 0.97 and r > 0.97  # the same manifold
    p, r = precision_recall(real, circle(2000, 0, math.pi))  # mode dropping: half the circle
    assert p > 0.97 and 0.45 < r < 0.55
    p, r = precision_recall(real, circle(2000) * 0.5)  # off the manifold altogether
    assert p < 0.01 and r < 0.01


def test_fid_inception_matches_an_independent_implementation() -> None:
    """Key names and shapes are those of the standard checkpoint, and with the same (random) weights the
    features and unbiased logits equal torch-fidelity's, resize included (fixture: make_inception_fixture)."""
    shapes = json.loads((FIXTURES / "inception_keys.json").read_text())
    model = FIDInceptionV3(input_range=(0, 255))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == shapes
    model.load_state_dict(random_inception_state(shapes))
    ref = np.load(FIXTURES / "inception_parity.npz")
    with torch.no_grad():
        features, logits = model.eval()(fixture_images().float())
    assert np.abs(features.numpy() - ref["features"]).max() < 1e-5
    assert np.abs(logits.numpy() - ref["logits_unbiased"]).max() < 1e-5


def test_fid_inception_loads_files_by_name_and_names_what_is_wrong(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    shapes = json.loads((FIXTURES / "inception_keys.json").read_text())
    state = random_inception_state(shapes)
    save_file({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
              str(tmp_path / "w.safetensors"))
    model = FIDInceptionV3.from_file(tmp_path / "w.safetensors")
    assert torch.equal(model.fc.weight, state["fc.weight"]) and not model.training
    grey = model(torch.zeros(2, 1, 28, 28))[0]
    assert grey.shape == (2, 2048)
    torch.save({k: v for k, v in state.items() if not k.startswith("Mixed_7c")}, tmp_path / "cut.pth")
    with pytest.raises(WeightsFileError, match="missing.*Mixed_7c"):
        FIDInceptionV3.from_file(tmp_path / "cut.pth")
    with pytest.raises(FileNotFoundError, match="FID Inception weights"):
        FIDInceptionV3.from_file(tmp_path / "none.pth")


def test_tf1_resize_rule() -> None:
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    up = resize_bilinear_tf1(x, 8)[0, 0, 0]  # source position i * 4 / 8 = i / 2, last pixels held
    assert torch.allclose(up, torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3]))


def test_in_domain_emoji_features_are_selectable_by_name(tmp_path: Path) -> None:
    pytest.importorskip("emoji")
    from ldmkit.data.emoji import emoji_dataset
    from ldmkit.evaluation.generative_eval import compare, extract, feature_net

    net = feature_net("emoji", tmp_path, train_steps=30)
    real = emoji_dataset(32, split="all").images
    a, b = extract(net, real[:300]), extract(net, real[300:600])
    noise = extract(net, torch.rand(300, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert a[0].shape == (300, 128) and a[1] is None
    same, other = compare(net, b, a, kid_subsets=5), compare(net, noise, a, kid_subsets=5)
    assert "FD_emoji" in same and "FID" not in same
    assert same["FD_emoji"] < other["FD_emoji"] and same["KID_emoji"] < other["KID_emoji"]
    with pytest.raises(ValueError, match="unknown feature network"):
        feature_net("clip", tmp_path)
