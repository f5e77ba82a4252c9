"""`ldmkit demo` end to end, shortened: the mnist_tiny preset, a briefly trained judge, few samples per class.

The demo trains the judge and both stages, writes the sample grid and metrics.json; rerunning the same command
finds every stage's result in the run directory and trains nothing again.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from ldmkit.cli.main import main

ARGS = ["--config", "mnist_tiny", "--quiet", "--judge-steps", "50", "--samples-per-class", "10", "--eval-images",
        "1000", "--set", "train_diffusion.steps=100"]
# written by the stages a rerun must skip: the judge, both stages' weights, training states, logs and checkpoints
STAGE_FILES = ("judge.safetensors", "autoencoder.safetensors", "autoencoder_train.safetensors",
               "autoencoder_log.jsonl", "ldm.safetensors", "ldm_train.safetensors", "ldm_log.jsonl")
TIMED = {"stage_seconds", "total_seconds_this_run", "sampling_seconds_per_image"}  # wall-clock fields


def _files(run: Path) -> dict[str, tuple[int, bytes]]:
    """(mtime in ns, contents) of every file the training stages wrote."""
    paths = [run / n for n in STAGE_FILES] + sorted((run / "checkpoints").iterdir())
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}


def test_demo_writes_grid_and_metrics_and_a_rerun_skips_finished_stages(tmp_path, capsys, one_thread):
    run = tmp_path / "demo"
    assert main(["demo", "--out", str(run), *ARGS]) == 0
    assert "demo finished" in capsys.readouterr().out

    grid = Image.open(run / "samples.png")  # 10 classes x 8 samples of 32 px, drawn at scale 2
    assert grid.width >= 8 * 64 and grid.height >= 10 * 64, grid.size
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["preset"] == "mnist_tiny" and metrics["n_generated_for_metrics"] == 100
    assert metrics["n_test_images_for_metrics"] == 1000
    rows = [json.loads(line) for line in (run / "ldm_log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 100  # the --set override reached the run
    # measured: PSNR 12.9 dB (untrained autoencoders of the stage-1 MNIST presets: 5.3-7.3 dB), the 50-step judge
    # 96.1 % on all 10000 test images; 100 diffusion steps do not yet draw the asked class (conditional accuracy 0.07)
    assert metrics["autoencoder_psnr_db"] > 10.0, metrics
    assert metrics["judge_test_accuracy"] > 0.85, metrics
    assert 0.0 <= metrics["conditional_accuracy"] <= 1.0
    assert 0 < metrics["frechet_distance_real_train_vs_test"] < metrics["frechet_distance_judge_features"]
    assert metrics["scale_factor"] > 0

    before = _files(run)
    grid_bytes = (run / "samples.png").read_bytes()
    assert main(["demo", "--out", str(run), *ARGS]) == 0
    assert _files(run) == before  # nothing retrained, rewritten or appended to
    assert (run / "samples.png").read_bytes() == grid_bytes  # the same models and seeds: the same grid
    again = json.loads((run / "metrics.json").read_text())
    assert {k: v for k, v in again.items() if k not in TIMED} == {k: v for k, v in metrics.items() if k not in TIMED}
