"""torchrun plumbing: one process per device, PyTorch's own process group, world size 1 without torchrun.

`torchrun --nproc_per_node N -m ldmkit.cli.main train ...` sets RANK / WORLD_SIZE / LOCAL_RANK (and the
rendezvous for --nnodes); `setup()` joins the group (NCCL for CUDA devices, gloo on CPU) and picks this
process's device. Training code then asks the `Dist` it gets back who it is, instead of reading globals.

How a global batch is shared (see `micro_batches`): the `batch_size` of the config is the global batch; it is
cut into `world_size * grad_accum` micro-batches, and micro-batch m of step s draws its data and noise from
its own generator seeded by (seed, s, m). Rank r computes micro-batches r*A .. r*A+A-1. So a run's samples
depend only on the config and the micro-batch count, 2 processes equal 1 process with grad_accum 2, and a
resumed run needs nothing but the step counter to continue the same stream.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import Tensor


@dataclass(frozen=True)
class Dist:
    """Who this process is: rank `rank` of `world_size` (local_rank on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes checkpoints and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, name: str = "auto") -> torch.device:
        """The device a config's `device` names for this rank: "auto" = this rank's GPU when CUDA is present,
        else the CPU; "cuda" = this rank's GPU; "cpu"; or an explicit "cuda:k" (one process only)."""
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(name)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {name!r} asked for, but this machine has no CUDA device (use 'cpu' or "
                                 f"'auto')")
            if dev.index is None:
                dev = torch.device("cuda", self.local_rank)  # one GPU per process, picked by the local rank
            elif self.distributed:
                raise ValueError(f"device {name!r}: under torchrun each rank takes its GPU; use 'cuda' or 'auto'")
            torch.cuda.set_device(dev)
        elif dev.type != "cpu":
            raise ValueError(f"unsupported training device {name!r}; use 'auto', 'cpu' or 'cuda'")
        return dev


def setup() -> Dist:
    """Join torchrun's process group when launched by it (gloo for CPU tensors, NCCL for CUDA ones);
    a plain process is rank 0 of a world of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        tdist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return Dist(rank=rank, world_size=world, local_rank=local)


def teardown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.distributed:
        tdist.barrier()


def mean_over_ranks(x: Tensor, d: Dist) -> Tensor:
    """The mean of a tensor over all ranks (a NaN on any rank reaches every rank, so all stop together)."""
    if not d.distributed:
        return x
    y = x.detach().clone()
    tdist.all_reduce(y)
    return y / d.world_size


def average_gradients(params: list[torch.nn.Parameter], d: Dist) -> None:
    """All-reduce the gradients of `params` to their mean over ranks, in one flat buffer.

    What DistributedDataParallel does for stage 2, done by hand for stage 1, whose GAN step computes gradient
    norms with autograd.grad and runs two optimisers on one forward: DDP's one-forward-one-backward hooks do
    not fit that loop.
    """
    if not d.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat)
    flat /= d.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_module(module: torch.nn.Module, d: Dist) -> None:
    """Copy rank 0's parameters and buffers to every rank (state changed outside the gradient: VQ codebook
    EMA statistics and dead-code restarts; DDP broadcasts buffers the same way)."""
    if not d.distributed:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        tdist.broadcast(t.data, 0)


def micro_batches(batch_size: int, grad_accum: int, d: Dist) -> tuple[int, list[int]]:
    """(micro-batch size, the global indices of this rank's micro-batches) for one optimiser step."""
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    m = d.world_size * grad_accum
    if batch_size % m:
        raise ValueError(f"batch_size {batch_size} is not divisible by world size {d.world_size} x grad_accum "
                         f"{grad_accum} = {m} micro-batches")
    return batch_size // m, [d.rank * grad_accum + a for a in range(grad_accum)]


def micro_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The CPU generator of micro-batch `micro` at `step`: a function of (seed, step, micro) alone."""
    digest = hashlib.blake2b(f"{seed}/{step}/{micro}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def gather_objects(obj: object, d: Dist) -> list[object]:
    """Every rank's `obj` (small picklable state, e.g. a data stream's position), in rank order."""
    if not d.distributed:
        return [obj]
    out: list[object] = [None] * d.world_size
    tdist.all_gather_object(out, obj)
    return out
