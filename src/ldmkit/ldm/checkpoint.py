"""Checkpoints as `.safetensors` files: tensors plus a JSON document in the file's metadata.

Safetensors cannot run code when loaded (unlike pickles). Writes are atomic: the file is written beside
its target, flushed to disk and renamed over it, so a crash mid-save never destroys the last good
checkpoint. Nested training state (optimizer state dicts, EMA, RNG, counters) is flattened into named
tensors plus a JSON skeleton by `pack_state` and rebuilt by `unpack_state`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

META_KEY = "ldmkit"  # the metadata entry holding our JSON document


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or not what the caller expected."""


def save_checkpoint(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any] | None = None) -> Path:
    """Atomically write `tensors` and the JSON-serialisable `meta` to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors wants contiguous tensors that share no storage
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(clean, str(tmp), metadata={META_KEY: json.dumps(meta or {})})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`: (tensors, meta)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {e}") from None
    if raw is None:
        raise CheckpointError(f"{path} has no ldmkit metadata (was it written by ldmkit?)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt ldmkit metadata: {e}") from None
    return tensors, meta


def pack_state(tree: Any, prefix: str = "") -> tuple[dict[str, Tensor], Any]:
    """Flatten a nest of dicts/lists/tuples/tensors/scalars into (tensors by path, JSON skeleton)."""
    tensors: dict[str, Tensor] = {}

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, Tensor):
            tensors[key] = node
            return {"__tensor__": key}
        if isinstance(node, dict):
            # keys may be ints (optimizer state): keep their type
            return {"__dict__": [[k, walk(v, f"{key}/{k}")] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            items = [walk(v, f"{key}/{i}") for i, v in enumerate(node)]
            return {"__tuple__": items} if isinstance(node, tuple) else items
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot checkpoint a {type(node).__name__} at {key or '/'}")

    skeleton = walk(tree, prefix)
    return tensors, skeleton


def unpack_state(tensors: dict[str, Tensor], skeleton: Any) -> Any:
    """Inverse of `pack_state`."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "__tensor__" in node:
                key = node["__tensor__"]
                if key not in tensors:
                    raise CheckpointError(f"checkpoint is missing tensor {key!r}")
                return tensors[key]
            if "__dict__" in node:
                return {k: walk(v) for k, v in node["__dict__"]}
            if "__tuple__" in node:
                return tuple(walk(v) for v in node["__tuple__"])
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(skeleton)


def save_state(path: str | Path, state: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
    """Atomically save a nested training state (anything `pack_state` accepts)."""
    tensors, skeleton = pack_state(state)
    return save_checkpoint(path, tensors, {**(meta or {}), "state": skeleton})


def load_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a state saved by `save_state`: (state, meta without the skeleton)."""
    tensors, meta = load_checkpoint(path)
    if "state" not in meta:
        raise CheckpointError(f"{path} is not a training-state checkpoint")
    skeleton = meta.pop("state")
    return unpack_state(tensors, skeleton), meta


# ------------------------------------------------------------------------------- does a state dict fit?


@dataclass
class KeyReport:
    """How a state dict differs from the one a module (or a converter) expects."""

    part: str
    missing: list[str] = field(default_factory=list)  # expected, absent from the state
    unexpected: list[str] = field(default_factory=list)  # in the state, not expected
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, got, expected

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """One line: counts with one example each."""
        out = []
        if self.missing:
            out.append(f"{len(self.missing)} missing (e.g. {self.missing[0]})")
        if self.unexpected:
            out.append(f"{len(self.unexpected)} unexpected (e.g. {self.unexpected[0]})")
        if self.mismatched:
            k, got, want = self.mismatched[0]
            out.append(f"{len(self.mismatched)} of another shape (e.g. {k}: {got} in the file, {want} in the model)")
        return "; ".join(out)

    def format(self, limit: int = 8) -> str:
        """Several lines: every difference, up to `limit` per kind."""
        lines = [f"{self.part}:"]

        def block(title: str, items: list[str]) -> None:
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {s}" for s in items[:limit])
                if len(items) > limit:
                    lines.append(f"    ... and {len(items) - limit} more")

        block("missing (the model needs them, the file lacks them)", self.missing)
        block("unexpected (in the file, unknown to the model)", self.unexpected)
        block("of another shape (file vs model)", [f"{k}: {a} vs {b}" for k, a, b in self.mismatched])
        return "\n".join(lines)


def compare_state(expected: Mapping[str, Tensor], got: Mapping[str, Tensor], part: str) -> KeyReport:
    """Compare key sets and shapes (not values) of `got` against `expected`."""
    return KeyReport(
        part,
        missing=sorted(set(expected) - set(got)),
        unexpected=sorted(set(got) - set(expected)),
        mismatched=[(k, tuple(got[k].shape), tuple(expected[k].shape)) for k in sorted(expected.keys() & got.keys())
                    if tuple(expected[k].shape) != tuple(got[k].shape)],
    )


# ------------------------------------------------------------------------------- rotating training states


def read_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint without loading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {e}") from None
