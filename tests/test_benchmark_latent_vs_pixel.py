"""benchmarks/latent_vs_pixel.py: the UNet layout per factor, the goal arithmetic, and a --quick smoke run that
trains all four factors (pixel space included) and writes its results and plot into a temporary folder."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

BENCH_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "latent_vs_pixel.py"


@pytest.fixture(scope="module")
def lvp():
    spec = importlib.util.spec_from_file_location("ldmkit_benchmark_latent_vs_pixel", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_unet_levels_halve_down_to_4x4(lvp):
    assert lvp.unet_layout(32) == ([1, 1, 1, 2], [8])  # f=1: 32, 16, 8, 4; attention at 4x4 (ds 8)
    assert lvp.unet_layout(16) == ([1, 1, 2], [4])
    assert lvp.unet_layout(8) == ([1, 2], [2])  # f=4: mnist_demo's UNet
    assert lvp.unet_layout(4) == ([1, 2], [1])  # f=8 keeps two levels


def _run(points: list[tuple[float, float, float]]) -> dict:
    return {"points": [{"cpu_s": t, "fd": fd, "accuracy": acc} for t, fd, acc in points]}


def test_goal_is_the_first_point_that_matches_the_pixel_model(lvp):
    pixel = _run([(10, 300, 0.2), (20, 200, 0.4), (40, 120, 0.6), (80, 60, 0.8)])
    fast = _run([(10, 150, 0.5), (20, 55, 0.85), (40, 30, 0.95), (80, 20, 0.99)])
    g = lvp.goal({1: pixel, 4: fast})
    assert g["fd"]["f4_cpu_s"] == 20 and g["fd"]["share"] == pytest.approx(0.25) and g["fd"]["holds"]
    assert g["accuracy"]["f4_cpu_s"] == 20 and g["holds"]
    # between the points at 10 s (FD 150) and 20 s (FD 55) the log-FD line crosses 60 at 19.13 s
    assert g["fd"]["share_interpolated"] == pytest.approx(19.13 / 80, abs=1e-3)
    assert g["accuracy"]["share_interpolated"] == pytest.approx((10 + 10 * 0.3 / 0.35) / 80)
    # reached at a point a step past the budget's quarter: the upper bound misses, the crossing does not
    late = _run([(10.1, 150, 0.5), (20.1, 55, 0.85), (40, 30, 0.95), (80, 20, 0.99)])
    g = lvp.goal({1: pixel, 4: late})
    assert not g["holds"] and g["holds_interpolated"]
    slow = _run([(10, 400, 0.1), (20, 300, 0.3), (40, 100, 0.7), (80, 70, 0.9)])
    g = lvp.goal({1: pixel, 4: slow})
    assert g["fd"]["share"] is None and not g["fd"]["holds"]  # never reaches FD 60
    assert g["accuracy"]["share"] == pytest.approx(1.0) and not g["holds"]


def test_quick_run_writes_results_and_plot(lvp, tmp_path, capsys):
    plot = tmp_path / "plot.png"
    assert lvp.main(["--quick", "--out", str(tmp_path), "--plot", str(plot), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| f | latent |" in out and ("goal holds" in out or "goal does not hold" in out)
    summary = json.loads((tmp_path / "results.json").read_text())
    results = summary["results"]
    assert sorted(results) == ["1", "2", "4", "8"]
    shapes = {f: r["latent_shape"] for f, r in results.items()}
    assert shapes == {"1": [1, 32, 32], "2": [2, 16, 16], "4": [3, 8, 8], "8": [4, 4, 4]}
    assert results["1"]["first_stage"]["preset"] == "identity" and results["1"]["scale_factor"] == 1.0
    for r in results.values():
        fractions = [p["fraction"] for p in r["points"]]
        assert fractions == [0.125, 0.25, 0.5, 1.0]
        steps = [p["step"] for p in r["points"]]
        assert steps[0] >= 1 and steps == sorted(steps)
        assert r["points"][-1]["cpu_s"] >= summary["budget"]  # trained to the budget
        assert all(p["fd"] >= 0 and 0 <= p["accuracy"] <= 1 for p in r["points"])
    # pixel space costs the most per sample, f=8 the least
    flops = [results[f]["gflops_per_sample"] for f in ("1", "2", "4", "8")]
    assert flops == sorted(flops, reverse=True)
    with Image.open(plot) as img:
        assert img.size == (1200, 520)
        assert len(img.getcolors(1 << 16) or []) > 20  # axes, text and four coloured lines, not a blank image
    # a rerun reuses the cached autoencoders and finished factors
    assert lvp.main(["--quick", "--out", str(tmp_path), "--plot", str(plot), "--threads", "1"]) == 0
    assert capsys.readouterr().out.count("reusing") == 4
