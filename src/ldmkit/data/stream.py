"""Training straight from webdataset tar shards, without reading the dataset into memory.

`ShardStream` is an endless stream of decoded samples. Each epoch visits the shards in an order drawn from
(seed, epoch); under torchrun rank r of W reads shards r, r+W, r+2W, ... of that order, so the ranks see
disjoint data (the distributed sampler of a stream). Within a shard samples come in their stored order:
webdataset shards are shuffled when they are written.

Its position (epoch, shard, samples read in it) is part of every training checkpoint, so a resumed run reads
on from the sample after the last one it trained on: rerunning the command neither repeats nor skips data.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .records import SkipReport, decode_sample, expand_shards, iter_shard_samples


class ShardStream:
    def __init__(self, pattern: str, resolution: int, channels: int, *, min_size: int = 8, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.shards = expand_shards(pattern)
        if not self.shards:
            raise FileNotFoundError(f"no shards match {pattern!r}")
        if len(self.shards) < world_size:
            raise ValueError(f"{len(self.shards)} shard(s) for {world_size} processes: each rank streams its own "
                             f"shards, so write at least as many shards as processes")
        self.resolution, self.channels, self.min_size = resolution, channels, min_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.shard_pos, self.consumed = 0, 0, 0
        self.report = SkipReport()
        self._it: Iterator[tuple[str, dict[str, bytes]]] | None = None

    def order(self, epoch: int) -> list[str]:
        """This rank's shards in epoch `epoch`."""
        perm = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        return [self.shards[i] for i in perm.tolist()][self.rank:: self.world_size]

    def _open(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        it = iter_shard_samples([self.order(self.epoch)[self.shard_pos]], self.report)
        for _ in range(self.consumed):  # resuming inside a shard: read past what was already trained on
            next(it, None)
        return it

    def _next_sample(self) -> tuple[str, dict[str, bytes]]:
        empty_shards = 0
        while True:
            if self._it is None:
                self._it = self._open()
            item = next(self._it, None)
            if item is not None:
                self.consumed += 1
                return item
            empty_shards = empty_shards + 1 if self.consumed == 0 else 0
            if empty_shards > len(self.order(self.epoch)):
                raise ValueError(f"the shards of rank {self.rank} hold no samples ({self.report.summary()})")
            self._it, self.consumed = None, 0
            self.shard_pos += 1
            if self.shard_pos >= len(self.order(self.epoch)):
                self.epoch, self.shard_pos = self.epoch + 1, 0

    def take(self, n: int) -> tuple[Tensor, Tensor, list[str]]:
        """The next n usable samples: images [n, C, R, R] in [-1, 1], class labels [n] (0 without .cls), captions
        ("" without one). Bad samples are skipped and counted in `report`."""
        images: list[Tensor]
        images, labels, captions = [], [], []
        misses = 0
        while len(images) < n:
            sample = decode_sample(*self._next_sample(), self.resolution, self.channels, self.min_size,
                                   self.report)
            if sample is None:
                misses += 1
                if misses > 10000:
                    raise ValueError(f"10000 samples in a row were unusable ({self.report.summary()})")
                continue
            images.append(sample[0])
            labels.append(sample[1])
            captions.append(sample[2])
            misses = 0
        return torch.stack(images), torch.tensor(labels, dtype=torch.long), captions

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "consumed": self.consumed,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["world_size"]) != self.world_size:
            # another process count splits the shards differently: go on from the next epoch's start
            self.epoch, self.shard_pos, self.consumed = int(state["epoch"]) + 1, 0, 0
        else:
            self.epoch, self.shard_pos, self.consumed = int(state["epoch"]), int(state["shard_pos"]), \
                int(state["consumed"])
        self._it = None
