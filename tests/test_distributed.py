"""Training that scales and never loses work: 2-process DDP on CPU (gloo) against one process, kill -9 and
resume, a kill during a checkpoint write, rotating checkpoints, gradient accumulation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldmkit.config import load_config
from ldmkit.jobs.train import train_ldm
from ldmkit.ldm.checkpoint import CheckpointError, load_checkpoint, load_state
from ldmkit.training.distributed import Dist, micro_batches, micro_generator
from ldmkit.training.keeper import CheckpointKeeper

TINY = {"data.limit": 256, "train_autoencoder.steps": 8, "train_autoencoder.batch_size": 16,
        "train_diffusion.steps": 10, "train_diffusion.batch_size": 16, "train_diffusion.checkpoint_every": 5,
        "train_autoencoder.checkpoint_every": 4}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ldmkit.cli.main", *args]


def _sets(over: dict) -> list[str]:
    return [a for k, v in over.items() for a in ("--set", f"{k}={v}")]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _assert_close(a: Path, b: Path, atol: float) -> None:
    ta, _ = load_checkpoint(a)
    tb, _ = load_checkpoint(b)
    assert ta.keys() == tb.keys()
    worst = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta if ta[k].is_floating_point())
    assert worst <= atol, f"{a.name}: max difference {worst}"


def test_micro_batches_split_the_global_batch() -> None:
    assert micro_batches(16, 1, Dist()) == (16, [0])
    assert micro_batches(16, 2, Dist(rank=1, world_size=2)) == (4, [2, 3])
    with pytest.raises(ValueError, match="not divisible"):
        micro_batches(10, 2, Dist(rank=0, world_size=2))
    a, b = micro_generator(0, 5, 1), micro_generator(0, 5, 1)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
    assert not torch.equal(torch.rand(3, generator=micro_generator(0, 5, 2)), torch.rand(3, generator=a))


@pytest.mark.usefixtures("one_thread")
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    """torchrun --nproc_per_node 2 (gloo, CPU) gives the weights of one process that accumulates the same two
    micro-batches: both stages, every weight, within float tolerance (only the reduction order differs).

    The one process runs at one thread, as each rank does (`_env`): at two threads its float sums round
    otherwise, and Adam turns the sign of a near-zero gradient into a whole step (0.015 apart after 8 steps)."""
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "ldmkit.cli.main", "train", "--config", "mnist_tiny", "--out", str(ddp), "--quiet", *_sets(TINY)]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("trained:") == 1  # rank 0 alone prints
    one = tmp_path / "one"
    over = dict(TINY, **{"train_autoencoder.grad_accum": 2, "train_diffusion.grad_accum": 2})
    train_ldm(load_config("mnist_tiny", over), one, progress=False, log=lambda s: None)
    _assert_close(ddp / "autoencoder.safetensors", one / "autoencoder.safetensors", 1e-4)
    _assert_close(ddp / "ldm.safetensors", one / "ldm.safetensors", 1e-4)
    # and a plain single batch is a different sample stream: the comparison above is not vacuous
    plain = tmp_path / "plain"
    train_ldm(load_config("mnist_tiny", TINY), plain, progress=False, log=lambda s: None)
    with pytest.raises(AssertionError, match="max difference"):
        _assert_close(plain / "autoencoder.safetensors", one / "autoencoder.safetensors", 1e-4)


def test_kill_9_then_rerun_is_bitwise_equal_to_an_uninterrupted_run(tmp_path: Path) -> None:
    over = dict(TINY, **{"train_diffusion.steps": 120, "train_diffusion.checkpoint_every": 10,
                         "train_diffusion.batch_size": 8})
    full, part = tmp_path / "full", tmp_path / "part"
    # both runs in processes with the same thread count: float sums are bitwise only at equal threading
    args = _cli("train", "--config", "mnist_tiny", "--out", str(part), "--quiet", *_sets(over))
    ref = subprocess.run(_cli("train", "--config", "mnist_tiny", "--out", str(full), "--quiet", *_sets(over)),
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list((part / "checkpoints").glob("ldm_train_step*.safetensors")) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert not (part / "ldm.safetensors").exists()
    done = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    a, _ = load_state(full / "ldm_train.safetensors")
    b, _ = load_state(part / "ldm_train.safetensors")
    assert a["step"] == b["step"] == 120
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    ta, _ = load_checkpoint(full / "ldm.safetensors")
    tb, _ = load_checkpoint(part / "ldm.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


KILL_IN_WRITE = """
import os, signal, sys
import ldmkit.ldm.checkpoint as ck
real, calls = ck.save_file, []
def dying(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) == 2:  # the second state: write half of the file, then die as the power would
        real(tensors, path, metadata=metadata)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path, metadata=metadata)
ck.save_file = dying
from ldmkit.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path: Path) -> None:
    over = {"data.limit": 128, "train_autoencoder.steps": 6, "train_autoencoder.checkpoint_every": 2,
            "train_autoencoder.batch_size": 8}
    args = ["train-autoencoder", "--config", "kl-f4-mnist", "--out", str(tmp_path), "--quiet", *_sets(over)]
    died = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, *args], env=_env(), capture_output=True,
                          timeout=300)
    assert died.returncode == -signal.SIGKILL
    state, meta = load_state(tmp_path / "autoencoder_train.safetensors")  # the step-2 state, whole
    assert state["step"] == 2 and meta["step"] == 2
    done = subprocess.run(_cli(*args), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_state(tmp_path / "autoencoder_train.safetensors")[0]["step"] == 6


def test_checkpoints_rotate_keep_the_best_and_fall_back_when_the_latest_is_damaged(tmp_path: Path) -> None:
    keeper = CheckpointKeeper(tmp_path / "ldm_train.safetensors", keep=2)
    assert keeper.load() is None
    for step, metric in [(10, 0.5), (20, 0.2), (30, 0.4), (40, 0.3)]:
        keeper.save({"w": torch.full((3,), float(step)), "step": step}, {"kind": "test"}, step, metric)
    assert [p.name for p in keeper.numbered()] == ["ldm_train_step00000030.safetensors",
                                                  "ldm_train_step00000040.safetensors"]
    assert load_state(keeper.best_path)[0]["step"] == 20 and keeper.best_metric() == pytest.approx(0.2)
    assert keeper.load()[0]["step"] == 40
    keeper.path.unlink()
    keeper.path.write_bytes(b"garbage")  # a damaged latest: resume from the newest readable kept state
    notes: list[str] = []
    assert keeper.load(log=notes.append)[0]["step"] == 40
    assert any("not a readable" in n for n in notes)
    for p in keeper.numbered():
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no readable training state"):
        keeper.load(log=notes.append)


def test_two_process_streamed_training_reads_disjoint_shards_and_saves_both_positions(tmp_path: Path) -> None:
    from test_records import write_clean_shards

    write_clean_shards(tmp_path / "shards")
    over = {"data.name": "shards", "data.root": str(tmp_path / "shards"), "data.stream": "true",
            "train_autoencoder.steps": 4, "train_autoencoder.batch_size": 16, "train_diffusion.steps": 4,
            "train_diffusion.batch_size": 16, "train_diffusion.checkpoint_every": 2}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "ldmkit.cli.main", "train", "--config", "mnist_tiny", "--out", str(tmp_path / "run"), "--quiet",
           *_sets(over)]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    state, _ = load_state(tmp_path / "run" / "ldm_train.safetensors")
    positions = state["data"]
    assert [p["rank"] for p in positions] == [0, 1] and all(p["world_size"] == 2 for p in positions)
    # 4 steps x 8 images per rank = 32 samples each, read from each rank's own first shard (40 samples)
    assert all(p["consumed"] == 32 and p["shard_pos"] == 0 for p in positions)
