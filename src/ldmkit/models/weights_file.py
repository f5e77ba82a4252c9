"""Reading a user's local weight file (safetensors, or a PyTorch pickle loaded with weights_only=True)."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor


class WeightsFileError(ValueError):
    """A weight file is missing, unreadable, or not a state dict."""


def read_tensor_file(path: str | Path, what: str) -> dict[str, Tensor]:
    """The tensors of `path` by name; `what` names the weights in errors ("LPIPS weights file", ...).

    Pickles are read with ``weights_only=True``: nothing in them is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsFileError(f"{path} is not a readable safetensors file: {e}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise WeightsFileError(
            f"cannot read {path} as a tensor-only PyTorch file (weights_only=True): {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(obj, Mapping):
        raise WeightsFileError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
