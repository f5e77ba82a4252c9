"""Exponential moving average of weights (Polyak averaging), with LDM's LitEma warm-up.

decay_n = min(decay, (1 + n) / (10 + n)) at update n, so early averages forget the random init quickly.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class EMA:
    """Keeps a frozen copy of `model` whose floating-point parameters and buffers track it."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = self.current_decay()
        src = model.state_dict()
        for name, shadow in self.model.state_dict().items():
            value = src[name]
            if shadow.dtype.is_floating_point:
                shadow.lerp_(value.to(shadow.dtype), 1.0 - d)  # shadow = d * shadow + (1 - d) * value
            else:
                shadow.copy_(value)

    def state_dict(self) -> dict[str, Tensor | float | int]:
        return {"decay": self.decay, "num_updates": self.num_updates, **self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Tensor | float | int]) -> None:
        state = dict(state)
        self.decay = float(state.pop("decay"))
        self.num_updates = int(state.pop("num_updates"))
        self.model.load_state_dict(state, strict=True)
