"""Pieces shared by the training loops: learning-rate schedule, batch drawing, loss guard, progress, log."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

T = TypeVar("T")


def seeded_init(seed: int, build: Callable[[], T]) -> T:
    """Build modules with their default initialisers drawing from `seed`, leaving the global RNG untouched.

    nn.Module constructors read only the global generator; forking it makes a run's initial weights a
    function of its config alone, which is what makes runs reproducible and resumes exact.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to `min_ratio * peak` at `total` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate to lr times the group's own `lr_ratio` (1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)


def draw_batch(n: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """Indices of a batch drawn uniformly with replacement: resumable from the generator state alone."""
    return torch.randint(0, n, (batch_size,), generator=generator)


def check_finite(loss: Tensor, what: str, step: int, checkpoint: Path) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"{what} loss became {loss.item()} at step {step}; training stopped, the last good "
            f"checkpoint is kept at {checkpoint} (lower the learning rate and rerun to resume from it)"
        )


def trim_log(path: Path, step: int) -> None:
    """Drop the lines after `step` from a JSON-lines log: what an interrupted run logged past its last checkpoint
    is logged again when those steps are redone, so a resumed log reads as an uninterrupted one."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)

    def keep(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step and line.endswith("\n")
        except (ValueError, KeyError, TypeError):
            return False  # a line torn by a kill mid-write

    kept = [line for line in lines if keep(line)]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


class Progress:
    """A tqdm bar with ETA, a JSON-lines log of (step, loss, lr, seconds, ...), TensorBoard scalars and images.

    TensorBoard event files go to `tb_dir` when the tensorboard package is installed (`pip install
    tensorboard`); without it the run says so once and keeps the JSON-lines log. Under torchrun only rank 0
    writes (`write`).
    """

    def __init__(self, total: int, start: int, desc: str, log_path: Path, enabled: bool = True,
                 write: bool = True, tb_dir: Path | None = None, running: float | None = None) -> None:
        self.bar = tqdm(total=total, initial=start, desc=desc, disable=not enabled, dynamic_ncols=True,
                        mininterval=1.0)
        self.desc = desc
        self.total = total
        self.log_path = log_path
        self.write = write  # under torchrun only rank 0 writes the log
        self.t0 = time.perf_counter()
        # the running loss average goes into every checkpoint (its metric) and comes back on resume: a resumed
        # run then logs and ranks its checkpoints exactly as an uninterrupted one
        self.running: float | None = running
        if write:
            trim_log(log_path, start)
        self.tb: Any = None
        if write and tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print(f"{desc}: tensorboard is not installed (pip install tensorboard); logging to {log_path} only")
            else:
                self.tb = SummaryWriter(str(tb_dir))

    def update(self, step: int, loss: float, lr: float, every: int = 50, **extra: Any) -> None:
        self.running = loss if self.running is None else 0.98 * self.running + 0.02 * loss
        self.bar.update(1)
        if self.write and (step % every == 0 or step in (1, self.total)):
            self.bar.set_postfix(loss=f"{self.running:.4f}", lr=f"{lr:.2e}")
            rec = {"step": step, "loss": loss, "loss_avg": self.running, "lr": lr,
                   "seconds": round(time.perf_counter() - self.t0, 2), **extra}
            with open(self.log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.tb is not None:
                for k, v in rec.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self.tb.add_scalar(f"{self.desc}/{k}", v, step)

    def image(self, name: str, images: Tensor, step: int, path: Path, nrow: int = 8) -> None:
        """A grid of images in [-1, 1] as a PNG file and a TensorBoard image."""
        if not self.write:
            return
        from ..data.images import make_grid, save_grid

        save_grid(images, path, nrow=nrow)
        if self.tb is not None:
            grid = make_grid(images.float().cpu(), nrow)  # [C, H, W] in [-1, 1]
            self.tb.add_image(f"{self.desc}/{name}", ((grid + 1) / 2).clamp(0, 1), step)

    def close(self) -> float:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        return time.perf_counter() - self.t0
