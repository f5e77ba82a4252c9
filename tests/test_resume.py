"""Killed at any moment and rerun, a training run ends exactly where an uninterrupted one ends.

A child process runs `ldmkit train`'s library call on a tiny MNIST run and sends itself SIGKILL at chosen
points: no `finally`, no flush, no atexit, as a crash or an OOM killer would. After the kills the same call is
made once more and finishes. Everything the run directory then holds is compared with an uninterrupted run:
every tensor of every .safetensors file bitwise, their metadata (the step, the loss metric the checkpoint keeper
ranks by, the scale factor, the config), which checkpoints are kept and which one is the best, every other file
byte for byte, and the JSON-lines logs line by line without their wall-clock fields.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldmkit.ldm.checkpoint import META_KEY

# tensorboard off: its event files hold wall times (what they log is in the JSON-lines logs compared here)
OVERRIDES = {"data.limit": 300, "train_autoencoder.steps": 6, "train_autoencoder.checkpoint_every": 3,
             "train_autoencoder.tensorboard": False, "train_diffusion.steps": 8,
             "train_diffusion.checkpoint_every": 3, "train_diffusion.tensorboard": False}
WALL_CLOCK = {"seconds", "images_per_s"}  # log fields that time the run, the only ones allowed to differ

# The child: run `ldmkit train --config mnist_tiny --out RUN --set ...`, and SIGKILL this process at a point named
# on the command line:
#   "<stage>:<step>"  right after step <step> of stage "autoencoder" / "diffusion" is logged (before any
#                     checkpoint of that step is written)
#   "latest:<stem>:<step>" / "best:<stem>:<step>"  inside the save of step <step> of the state <stem>
#                     ("autoencoder_train" / "ldm_train"), its numbered file on disk, before the keeper's hard
#                     link that makes it the latest / the best
CHILD = r"""
import os, signal, sys
from ldmkit.cli.main import main
from ldmkit.training import keeper, loop

point = sys.argv[2] if len(sys.argv) > 2 else ""
update, link = loop.Progress.update, keeper._link

def dying_update(self, step, *args, **kwargs):
    update(self, step, *args, **kwargs)
    if point == f"{self.desc}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)

def dying_link(src, dst):
    stem, _, step = src.name.removesuffix(".safetensors").partition("_step")
    which = "best" if dst.name.endswith("_best.safetensors") else "latest"
    if point == f"{which}:{stem}:{step.lstrip('0')}":
        os.kill(os.getpid(), signal.SIGKILL)
    link(src, dst)

loop.Progress.update, keeper._link = dying_update, dying_link
sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={v}")]
sys.exit(main(["train", "--config", "mnist_tiny", "--out", sys.argv[1], "--quiet", *sets]))
"""


def run_child(run_dir: Path, kill_at: str | None = None) -> None:
    """One training process; with `kill_at` it must die there (SIGKILL), without it it must finish."""
    code = f"OVERRIDES = {OVERRIDES!r}\n{CHILD}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread in every run: the same float reductions
    args = [sys.executable, "-c", code, str(run_dir)] + ([kill_at] if kill_at else [])
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == (-9 if kill_at else 0), (kill_at, done.returncode, done.stderr[-3000:])


def snapshot(run_dir: Path) -> dict[str, object]:
    """Every file of a run directory, in a form to compare: tensors + metadata, log records, or bytes."""
    out: dict[str, object] = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        name = str(path.relative_to(run_dir))
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[META_KEY])
            out[name] = (load_file(str(path)), meta)
        elif path.suffix == ".jsonl":
            out[name] = [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
                         for line in path.read_text().splitlines()]
        else:
            out[name] = path.read_bytes()
    return out


def assert_same_run(got: dict[str, object], want: dict[str, object]) -> None:
    assert sorted(got) == sorted(want)  # the same files: checkpoints kept, best, logs, weights
    for name, w in want.items():
        g = got[name]
        if isinstance(w, tuple):
            (gt, gm), (wt, wm) = g, w
            assert gm == wm, name  # step, metric (the running loss the keeper ranks by), scale factor, config
            assert sorted(gt) == sorted(wt), name
            for k in wt:
                assert gt[k].dtype == wt[k].dtype and gt[k].shape == wt[k].shape, (name, k)
                assert torch.equal(gt[k].reshape(-1).view(torch.uint8), wt[k].reshape(-1).view(torch.uint8)), (name, k)
        else:
            assert g == w, name


def best_of(run: dict[str, object], stem: str) -> tuple[int, float]:
    meta = run[f"checkpoints/{stem}_best.safetensors"][1]  # type: ignore[index]
    return meta["step"], meta["metric"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, object]:
    run = tmp_path_factory.mktemp("full")
    run_child(run)
    return snapshot(run)


def test_a_run_killed_between_checkpoints_ends_as_an_uninterrupted_one(uninterrupted, tmp_path):
    # autoencoder: killed at step 2 (its step-1 log line written, no checkpoint yet: it restarts from scratch),
    # then at step 5 (resumes from step 3); diffusion: killed at its last step, its log line written and its
    # final checkpoint not (resumes from step 6 and logs step 8 again)
    for kill_at in ("autoencoder:2", "autoencoder:5", "diffusion:8"):
        run_child(tmp_path, kill_at)
    assert not (tmp_path / "ldm.safetensors").exists()
    run_child(tmp_path)
    got = snapshot(tmp_path)
    assert_same_run(got, uninterrupted)
    # what the review found: the running loss average (the checkpoints' metric) restarted on resume
    assert best_of(got, "ldm_train") == best_of(uninterrupted, "ldm_train")


def test_a_run_killed_inside_a_checkpoint_save_ends_as_an_uninterrupted_one(uninterrupted, tmp_path):
    # diffusion step 8, the last save: the latest already links to it, the best does not; the rerun finds the
    # stage finished and saves nothing more, so the best stays at step 6 (the uninterrupted run's is step 8)
    run_child(tmp_path, "best:ldm_train:8")
    run_child(tmp_path)
    got = snapshot(tmp_path)
    assert best_of(got, "ldm_train") == best_of(uninterrupted, "ldm_train")
    assert_same_run(got, uninterrupted)
