"""`ldmkit info CKPT`: what a checkpoint file is, without building the model at full size."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from torch import Tensor

from .ckpt_reader import read_checkpoint
from .compvis import EMA_SCALARS, split_checkpoint
from .detect import UnknownCheckpointError, detect_first_stage, detect_variant
from .loader import load_first_stage_checkpoint, load_ldm_checkpoint


def _count(state: dict[str, Tensor]) -> int:
    return sum(v.numel() for v in state.values())


def describe_checkpoint(path: str | Path, *, check: bool = True) -> dict[str, Any]:
    """Variant, parameter counts per part, EMA, dtypes and a key summary; `check` also verifies the keys fit."""
    raw = read_checkpoint(path)
    parts = split_checkpoint(raw.tensors)
    dtypes = Counter(str(v.dtype).replace("torch.", "") for v in raw.tensors.values())
    prefixes = Counter("(schedule buffers)" if k in parts.schedule else k.split(".")[0] for k in raw.tensors)
    info: dict[str, Any] = {
        "file": str(path), "format": raw.format, "tensors": len(raw.tensors),
        "dtypes": dict(dtypes), "top_level_prefixes": dict(prefixes.most_common()),
        "meta": {k: v for k, v in raw.meta.items() if k != "lightning_keys"},
    }
    if parts.unet:
        variant = detect_variant(parts, path)
        info["kind"] = "latent diffusion"
        info["parameters"] = {
            "unet": _count(parts.unet),
            "first_stage": _count(parts.first_stage),
            "cond_stage": _count(parts.cond_stage),
        }
        shadows = {k: v for k, v in parts.ema.items() if k not in EMA_SCALARS}
        info["ema"] = {"present": bool(shadows), "tensors": len(shadows), "parameters": _count(shadows)}
        if "num_updates" in parts.ema:
            info["ema"]["num_updates"] = int(parts.ema["num_updates"])
        if check:
            load_ldm_checkpoint(path, raw=raw, check_only=True)
            info["strict_check"] = "every key and shape fits the preset"
    else:
        state = {k: v for k, v in raw.tensors.items() if not k.startswith("loss.")}
        if not any(k.startswith("encoder.") for k in state):
            raise UnknownCheckpointError(f"{path}: neither a latent diffusion model nor an autoencoder "
                                         f"(top-level prefixes: {', '.join(list(prefixes)[:8])})")
        variant = detect_first_stage(state)
        info["kind"] = "first stage autoencoder"
        info["parameters"] = {"first_stage": _count(state),
                              "training_loss": _count({k: v for k, v in raw.tensors.items() if k.startswith("loss.")})}
        if check:
            load_first_stage_checkpoint(path)
            info["strict_check"] = "every key and shape fits the preset"
    info["variant"] = variant.name
    info["preset"] = variant.preset
    info["prediction"] = variant.parameterization
    if variant.alternatives:
        info["alternatives"] = variant.alternatives
    info["notes"] = variant.notes
    return info


def format_info(info: dict[str, Any]) -> str:
    lines = [f"{info['file']}: {info['kind']}, variant {info['variant']} (preset {info['preset']})"]
    if info["kind"] == "latent diffusion":
        lines.append(f"  prediction: {info['prediction']}")
    for k in ("alternatives", "notes"):
        if k in info:
            lines.append(f"  {k}: {'; '.join(info[k])}")
    lines.append(f"  format: {info['format']}, {info['tensors']} tensors, dtypes {info['dtypes']}")
    lines.append("  parameters: " + ", ".join(f"{k} {v:,}" for k, v in info["parameters"].items()))
    if "ema" in info:
        e = info["ema"]
        lines.append(f"  EMA: {'present' if e['present'] else 'absent'}"
                     + (f", {e['tensors']} shadows ({e['parameters']:,} values)" if e["present"] else ""))
    lines.append("  keys by prefix: " + ", ".join(f"{k} {v}" for k, v in info["top_level_prefixes"].items()))
    if info["meta"]:
        lines.append("  meta: " + ", ".join(f"{k}={v}" for k, v in info["meta"].items()))
    if "strict_check" in info:
        lines.append(f"  strict check: {info['strict_check']}")
    return "\n".join(lines)
