"""Read foreign checkpoint files without ever running code from them.

Formats: `.safetensors` (tensors only, cannot run code) and PyTorch pickles (`.ckpt`, `.pt`, `.pth`, `.bin`),
including PyTorch Lightning checkpoints, whose weights sit under `state_dict`.

A pickle is a program: unpickling may call any importable function. We only ever unpickle with PyTorch's
`weights_only` unpickler, which builds tensors, containers and numbers and refuses every other global.
Lightning checkpoints of the CompVis era also store callback objects (e.g. `ModelCheckpoint`) and numpy
scalars beside the weights; those few globals are mapped to `InertObject`, a class that records the pickled
state and has no behaviour, so no code of theirs runs either. Anything else is refused with the names of the
globals the file wanted, before any of them was called.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Globals a Lightning-era checkpoint may name outside its weights. Each is replaced by InertObject: its
# pickled state is kept as data and nothing of the original class is imported or called.
INERT_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
    "pytorch_lightning.trainer.states.TrainerFn",
    "pytorch_lightning.trainer.states.RunningStage",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning_fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "typing.Any",
    "collections.defaultdict",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "numpy.dtypes.Float64DType",
    "numpy.dtypes.Float32DType",
    "numpy.dtypes.Int64DType",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "_codecs.encode",
)


class UnsafeCheckpointError(ValueError):
    """The file would need to run code (call unknown globals) to load; it was not loaded."""


class CheckpointReadError(ValueError):
    """The file is missing, truncated, or not a checkpoint format we read."""


class InertObject:
    """Stands in for a class named in a pickle: keeps its constructor args and state, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:  # pickle's NEWOBJ passes the args here
        return super().__new__(cls)

    def __call__(self, *args: Any, **kwargs: Any) -> InertObject:  # a function-style global (REDUCE)
        return InertObject(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"InertObject(state={type(self.state).__name__})"


def _inert_class(name: str) -> type:
    # one subclass per global so that torch's allow-list (keyed by class) can name it; the class carries the
    # original dotted name for error messages and `info`.
    return type(name.rsplit(".", 1)[-1], (InertObject,), {"__module__": "ldmkit.interop.inert", "original": name})


# typed as torch.serialization.safe_globals takes it (a list is invariant, so list[tuple[type, str]] would not do)
_INERT: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [(_inert_class(n), n) for n in INERT_GLOBALS]


@dataclass
class RawCheckpoint:
    """The tensors of a checkpoint file plus what else it said about itself."""

    path: Path
    format: str  # "safetensors" or "pickle"
    tensors: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)  # global_step, epoch, safetensors metadata, ...
    skipped: list[str] = field(default_factory=list)  # non-tensor entries of the state dict (ignored)


def _unsafe_globals(path: Path) -> list[str]:
    """The globals (module.name) a pickle file names, read from its opcodes without running any of them."""
    try:
        if _is_zip(path):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        return [g for g in _pickle_globals(path.read_bytes()) if g not in _torch_allowed_globals()]
    except Exception:  # noqa: BLE001  (the listing is best effort; the load below is what protects)
        return []


def _torch_allowed_globals() -> set[str]:
    """What torch's weights_only unpickler builds by itself (tensors, storages, OrderedDict, ...): not worth naming
    in a refusal. A private helper of torch's; without it every global is named, which is merely longer."""
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals())
    except (ImportError, AttributeError):
        return set()


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def _pickle_globals(data: bytes) -> list[str]:
    """Every GLOBAL / STACK_GLOBAL of the pickles stored one after another in `data` (a legacy torch.save file
    holds several, then raw storage bytes, where the scan stops). STACK_GLOBAL takes its module and name from
    the two strings pushed before it, directly or through the memo, which is all a well-formed pickle does."""
    found: list[str] = []
    pos = 0
    while pos < len(data):
        strings: list[str] = []  # the strings pushed so far, in order
        memo: dict[int, str | None] = {}
        top: str | None = None  # the string on top of the stack, when the last push was one
        end = None
        try:
            for op, arg, at in pickletools.genops(io.BytesIO(data[pos:])):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                    top = None
                elif name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                    top = None
                elif name in _STRING_OPS:
                    top = arg.decode("latin-1") if isinstance(arg, bytes) else str(arg)
                    strings.append(top)
                elif name == "MEMOIZE":
                    memo[len(memo)] = top
                elif name in _PUT_OPS:
                    assert arg is not None  # every PUT op carries its memo index, an int
                    memo[int(arg)] = top
                elif name in _GET_OPS:
                    assert arg is not None  # and every GET op the index it reads
                    top = memo.get(int(arg))
                    if top is not None:
                        strings.append(top)
                else:
                    top = None
                if name == "STOP":
                    assert at is not None  # genops gives each opcode's offset when its stream can tell (BytesIO can)
                    end = pos + at + 1
        except Exception:  # noqa: BLE001  (past the pickles: raw storage bytes, or a damaged file)
            break
        if end is None or end <= pos:
            break
        pos = end
    return list(dict.fromkeys(found))


def _load_pickle(path: Path) -> Any:
    """torch.load with weights_only=True, allowing only INERT_GLOBALS (as InertObject) beyond PyTorch's own."""
    try:
        # torch warns about pickle protocols its safe unpickler was not written for; the refusal below says
        # all that matters, so its warnings (and its advice to load unsafely) are not passed on
        with torch.serialization.safe_globals(_INERT), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError:
        wanted = [g for g in _unsafe_globals(path) if g not in INERT_GLOBALS]
        names = ", ".join(wanted) if wanted else "globals that could not be listed"
        raise UnsafeCheckpointError(
            f"refusing to load {path}: the pickle asks to call code outside plain tensors and containers "
            f"({names}). Nothing in it was run. Convert the file to .safetensors with a tool you trust, or "
            "re-save only its state_dict."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointReadError(f"{path} is not a readable PyTorch checkpoint: {str(e).splitlines()[0]}") from None


def _is_zip(path: Path) -> bool:
    # the mmap option only applies to the zip format of torch.save (>= 1.6); legacy pickles load normally
    return zipfile.is_zipfile(path)


def _flatten_state(obj: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any], list[str]]:
    meta: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        # Lightning: {"state_dict": ..., "global_step": ..., "epoch": ..., "callbacks": ..., ...}
        for k in ("global_step", "epoch", "pytorch-lightning_version"):
            if isinstance(obj.get(k), (int, str)):
                meta[k] = obj[k]
        meta["lightning_keys"] = sorted(str(k) for k in obj)
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict) and not any(
        isinstance(v, Tensor) for v in obj.values()
    ):
        obj = obj["model"]  # {"model": state_dict} wrappers (several training scripts)
    if not isinstance(obj, dict):
        raise CheckpointReadError(f"{path} holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    skipped = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor))
    if not tensors:
        raise CheckpointReadError(f"{path} contains no tensors")
    return tensors, meta, skipped


def read_checkpoint(path: str | Path) -> RawCheckpoint:
    """Read a `.safetensors` or PyTorch/Lightning pickle checkpoint into a flat {key: tensor} dict, safely."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"checkpoint not found: {path}")
    if path.suffix.lower() == ".safetensors":
        try:
            tensors: dict[str, Tensor] = {}
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                for k in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                    tensors[k] = f.get_tensor(k)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointReadError(f"{path} is not a readable safetensors file: {e}") from None
        if not tensors:
            raise CheckpointReadError(f"{path} contains no tensors")
        return RawCheckpoint(path, "safetensors", tensors, meta)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        raise CheckpointReadError(
            f"{path}: unknown checkpoint type {path.suffix!r}; "
            f"expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)}"
        )
    tensors, meta, skipped = _flatten_state(_load_pickle(path), path)
    return RawCheckpoint(path, "pickle", tensors, meta, skipped)
