"""Inference calls of a module replayed from CUDA graphs: one capture per input signature, then one launch per call.

A diffusion sampler calls the same UNet with the same shapes tens of times. On a fast GPU at small batch such a
call is bound by the CPU launching its ~1,000 kernels one by one (an SD-v1 UNet step at batch 2 in fp16 takes
about as long as its kernels plus every launch), so `torch.cuda.CUDAGraph` capture, which replays the whole
recorded sequence with one launch, removes that time without changing a kernel: the outputs are those of the
eager module, bit for bit, when the same kernels are chosen.

What a graph fixes at capture, and how each is kept right:

- the input shapes, dtypes and devices and every non-tensor argument: they form the key of the graph, and a new
  key captures a new graph (at most `max_graphs`; beyond that the call runs eagerly);
- the addresses of the inputs: each call copies its tensors into the graph's own static inputs;
- the addresses of the weights: a moved, cast or replaced parameter (`.to`, `load_state_dict(assign=True)`)
  drops every graph before the next call; in-place writes (`load_state_dict`, an optimiser step) are seen by
  the graphs as they are;
- the output buffer, which the next replay overwrites: each call returns a clone.

Calls with autograd on, with inputs off CUDA or during another capture run the module eagerly: graphs are for
inference only. Graphs share one memory pool, so several signatures cost about one forward's activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CUDAGraphRunner"]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]  # static copies of the call's tensors, in flattening order
    output: Tensor


def _flatten(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Tensor], tuple[Any, ...]] | None:
    """The call's tensors and its signature (tensor metadata in place of each tensor, other values as they
    are), or None when an argument is neither a tensor, None, a number, a string nor a list / tuple of these."""
    tensors: list[Tensor] = []

    def sig(v: Any) -> Any:
        if isinstance(v, Tensor):
            tensors.append(v)
            return ("T", tuple(v.shape), v.dtype, v.device)
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return (type(v).__name__, tuple(sig(u) for u in v))
        raise TypeError

    try:
        key = (tuple(sig(a) for a in args), tuple((k, sig(v)) for k, v in sorted(kwargs.items())))
    except TypeError:
        return None
    return tensors, key


def _rebuild(args: tuple[Any, ...], kwargs: dict[str, Any], tensors: list[Tensor]
             ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """args and kwargs with their tensors replaced, in flattening order, by `tensors`."""
    it = iter(tensors)

    def put(v: Any) -> Any:
        if isinstance(v, Tensor):
            return next(it)
        if isinstance(v, (list, tuple)):
            return type(v)(put(u) for u in v)
        return v

    new_args = tuple(put(a) for a in args)
    return new_args, {k: put(kwargs[k]) for k in sorted(kwargs)}


class CUDAGraphRunner:
    """Call it like `module`; under no_grad / inference_mode with CUDA inputs it replays captured graphs."""

    def __init__(self, module: nn.Module, *, max_graphs: int = 4, warmup: int = 2) -> None:
        if max_graphs < 1 or warmup < 1:
            raise ValueError(f"max_graphs and warmup must be >= 1, got {max_graphs} and {warmup}")
        self.module = module
        self.max_graphs = max_graphs
        self.warmup = warmup  # eager calls on a side stream before capture: cuBLAS / cuDNN set up their state
        self.graphs: dict[Any, _Graph] = {}
        self.captures = 0  # graphs captured so far (recaptures after moved weights included)
        self._weights_key: tuple[tuple[int, torch.dtype, torch.device], ...] | None = None
        self._pool: Any = None

    def _weights(self) -> tuple[tuple[int, torch.dtype, torch.device], ...]:
        return tuple((t.data_ptr(), t.dtype, t.device)
                     for t in (*self.module.parameters(), *self.module.buffers()))

    def reset(self) -> None:
        """Drop every captured graph (and its memory once no output refers to it); the next call captures anew."""
        self.graphs.clear()
        self._pool = None
        self._weights_key = None

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        flat = _flatten(args, kwargs)
        if (flat is None or torch.is_grad_enabled() or not torch.cuda.is_available()
                or torch.cuda.is_current_stream_capturing()):
            return self.module(*args, **kwargs)
        tensors, key = flat
        devices = {t.device for t in tensors}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            return self.module(*args, **kwargs)
        weights = self._weights()
        if weights != self._weights_key:  # moved, cast or replaced weights: every graph reads stale memory
            self.reset()
            self._weights_key = weights
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                return self.module(*args, **kwargs)
            entry = self._capture(args, kwargs, tensors)
            self.graphs[key] = entry
        for static, t in zip(entry.inputs, tensors, strict=True):
            static.copy_(t)
        entry.graph.replay()
        return entry.output.clone()

    def _capture(self, args: tuple[Any, ...], kwargs: dict[str, Any], tensors: list[Tensor]) -> _Graph:
        static = [t.clone() for t in tensors]
        s_args, s_kwargs = _rebuild(args, kwargs, static)
        call: Callable[[], Tensor] = lambda: self.module(*s_args, **s_kwargs)  # noqa: E731
        side = torch.cuda.Stream(device=static[0].device)
        side.wait_stream(torch.cuda.current_stream(static[0].device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                call()
        torch.cuda.current_stream(static[0].device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = call()
        if not isinstance(out, Tensor):
            raise TypeError(f"CUDA graphs replay modules that return one tensor, got {type(out).__name__}")
        self.captures += 1
        return _Graph(graph, static, out)
