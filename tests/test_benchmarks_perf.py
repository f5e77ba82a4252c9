"""Smoke tests of the performance suite's own scripts (issue 9): `--quick` runs end to end and prints its tables.

No timing is asserted (speed lives in the benchmark output, not in tests); what is asserted is what the tables
must say whatever the machine: equal outputs where the scripts compare two implementations of the same math.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_vae_decode_quick_reports_memory_and_the_tiling_error() -> None:
    out = _run("benchmarks/vae_decode.py", "--quick", "--threads", "1")
    assert out.count("| whole |") == 3 and out.count("| tiled |") == 2 and "| sliced |" in out
    rows = re.findall(r"\| (\d+) x \d+ \| ([\d.]+) \| ([\d.]+) \|", out)  # the error table: image, max, mean
    assert [r[0] for r in rows] == ["64", "128"]
    assert all(0 < float(mean) <= float(mx) <= 2 for _, mx, mean in rows)  # tiles of 4 latent px do differ


def test_unet_step_quick_compares_ldmkit_and_diffusers_on_the_same_weights() -> None:
    out = _run("benchmarks/sd_unet_step.py", "--quick", "--threads", "1")
    assert "| ldmkit |" in out and "| diffusers |" in out
    assert re.search(r"max \|ldmkit - diffusers\| over the output: ([\d.e+-]+)", out)
    diff = float(re.search(r"over the output: ([\d.e+-]+)", out).group(1))
    assert diff < 1e-4
    gdiff = float(re.search(r"max relative difference ([\d.e+-]+)", out).group(1))
    assert gdiff < 1e-4


def test_suite_runner_names_its_scripts() -> None:
    res = subprocess.run([sys.executable, "benchmarks/run_all.py", "--only", "nope"], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode != 0 and "unknown benchmark" in res.stderr
    for name in ("sd_unet_step", "roofline", "unet_options", "vae_decode", "sd_sampling_memory", "latent_vs_pixel",
                 "gpu"):
        assert (ROOT / "benchmarks" / f"{name}.py").exists()
