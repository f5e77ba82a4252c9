"""`ldmkit eval` on class-conditional MNIST models: a report with in-domain FD, KID, classifier score,
precision/recall and conditional accuracy, in which a less-trained model scores worse; resumable sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ldmkit.cli.main import main
from ldmkit.config import load_config
from ldmkit.jobs.train import train_ldm


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval_cache")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """mnist_tiny trained long enough to draw digits (about 40 % of them of the asked class), and the same
    model stopped after 30 steps, on the same first stage."""
    root = tmp_path_factory.mktemp("eval_models")
    over = {"train_autoencoder.steps": 200, "train_autoencoder.batch_size": 32, "train_diffusion.steps": 500,
            "data.limit": 4000}
    good = train_ldm(load_config("mnist_tiny", over), root / "good", progress=False, log=lambda s: None)
    weak = train_ldm(load_config("mnist_tiny", dict(over, **{"first_stage": str(good), "train_diffusion.steps": 30})),
                     root / "weak", progress=False, log=lambda s: None)
    return good, weak


def _eval(run: Path, out: Path, cache: Path, *extra: str) -> dict:
    assert main(["eval", str(run), "--out", str(out), "--n", "200", "--features", "digits", "--steps", "10",
                 "--cache", str(cache), "--quiet", *extra]) == 0
    return json.loads((out / "report.json").read_text())


def test_eval_reports_and_a_weaker_model_scores_worse(models: tuple[Path, Path], tmp_path: Path, cache: Path,
                                                      capsys) -> None:
    good = _eval(models[0], tmp_path / "eval_good", cache)
    bad = _eval(models[1], tmp_path / "eval_weak", cache)
    g, b = good["results"]["samples"], bad["results"]["samples"]
    for key in ("FD_digits", "KID_digits", "KID_digits_std", "precision_digits", "recall_digits",
                "classifier_score_digits", "conditional_accuracy"):
        assert key in g, key
    assert "FID" not in g  # in-domain figures are never called FID
    floor = good["results"]["real train images"]
    assert floor["FD_digits"] < g["FD_digits"] < b["FD_digits"]
    assert g["KID_digits"] < b["KID_digits"]
    assert g["conditional_accuracy"] > b["conditional_accuracy"]
    assert g["conditional_accuracy"] > 0.25  # well above chance (0.1); measured 0.41
    assert g["precision_digits"] > b["precision_digits"] and g["recall_digits"] > b["recall_digits"]
    assert good["protocol"]["n_samples"] == 200 and "judge" in good["protocol"]["features"]
    md = (tmp_path / "eval_good" / "report.md").read_text()
    assert "| samples |" in md and "Protocol:" in md
    npz = np.load(tmp_path / "eval_good" / "samples" / "samples.npz")
    assert npz["arr_0"].shape == (200, 32, 32, 1) and npz["arr_0"].dtype == np.uint8
    assert list(npz["labels"][:12]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_eval_resumes_sampling_and_rejects_bad_requests(models: tuple[Path, Path], tmp_path: Path, cache: Path,
                                                         capsys) -> None:
    tiny_run = models[1]
    out = tmp_path / "e"
    _eval(tiny_run, out, cache, "--batch", "50")
    first = np.load(out / "samples" / "samples.npz")["arr_0"]
    for i in range(60, 120):  # an evaluation interrupted in its second and third batches
        (out / "samples" / f"{i:06d}.png").unlink()
    _eval(tiny_run, out, cache, "--batch", "50")
    assert np.array_equal(np.load(out / "samples" / "samples.npz")["arr_0"], first)
    capsys.readouterr()
    assert main(["eval", str(tiny_run), "--out", str(out), "--n", "5", "--cache", str(cache)]) != 0
    assert "at least 20" in capsys.readouterr().err
    assert main(["eval", str(tiny_run), "--out", str(out), "--features", "inception", "--cache", str(cache)]) != 0
    assert "--inception-weights" in capsys.readouterr().err
