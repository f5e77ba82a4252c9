"""The training states a run keeps on disk: the latest (what resuming reads), the last few by step, and the best.

Each state is one `.safetensors` file written atomically (`ldm.checkpoint.save_state`); the latest and the best
are hard links to a numbered one, so a crash at any moment leaves a readable state behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..ldm.checkpoint import CheckpointError, load_state, read_meta, save_state


def _link(src: Path, dst: Path) -> None:
    """Make `dst` the same file as `src`, atomically (a hard link where the filesystem has them, else a copy)."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class CheckpointKeeper:
    """A training state that survives crashes: the latest at `path` (what resuming reads), the last `keep`
    states by step and the best by a metric in `path.parent / "checkpoints"`.

    Each state is written once (atomically, beside its target, then renamed); the latest and the best are
    hard links to it. Loading falls back to the newest readable numbered state when the latest is damaged.
    """

    def __init__(self, path: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.path = Path(path)
        self.keep = keep
        self.dir = self.path.parent / "checkpoints"
        self.stem = self.path.name.removesuffix(".safetensors")
        self.best_path = self.dir / f"{self.stem}_best.safetensors"

    def numbered(self) -> list[Path]:
        """The kept states, oldest first."""
        return sorted(self.dir.glob(f"{self.stem}_step*.safetensors"))

    def best_metric(self) -> float | None:
        if not self.best_path.exists():
            return None
        value = read_meta(self.best_path).get("metric")
        return None if value is None else float(value)

    def save(self, state: dict[str, Any], meta: dict[str, Any], step: int, metric: float | None = None) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        target = self.dir / f"{self.stem}_step{step:08d}.safetensors"
        save_state(target, state, {**meta, "step": step, "metric": metric})
        # the best is judged before the latest moves: a run killed between the two links resumes from the state
        # before, and judges this one again when it is saved again (judging is idempotent)
        self._judge(target, metric)
        _link(target, self.path)
        for old in self.numbered()[: -self.keep]:
            old.unlink(missing_ok=True)  # the best stays through its own link
        return target

    def _judge(self, path: Path, metric: float | None) -> None:
        """Make `path` the best when its metric is at least as low as the best's (ties go to the later state)."""
        best = self.best_metric()
        if metric is not None and (best is None or float(metric) <= best):
            _link(path, self.best_path)

    def load(self, log: Any = print) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The latest readable state, or None when the run has none yet."""
        candidates = ([self.path] if self.path.exists() else []) + self.numbered()[::-1]
        for i, p in enumerate(candidates):
            try:
                loaded = load_state(p)
            except CheckpointError as e:
                log(f"warning: {e}; trying an older checkpoint")
                continue
            if i:
                log(f"resuming from {p}")
            # a state written but killed before its links (or before the best link) was never judged: judge it now
            self._judge(p, loaded[1].get("metric"))
            return loaded
        if candidates:
            raise CheckpointError(f"no readable training state among {[str(p) for p in candidates]}")
        return None
