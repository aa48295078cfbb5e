"""Seeded, sharded, resumable sampling: the order and every sample's augmentation depend only on
``(seed, epoch, position)``, so a run resumed mid-epoch, with any worker count, sees the same data."""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence, Sized

import torch
from torch.utils.data import Dataset, Sampler

from detkit.registry import SAMPLERS

# ``data.sampler`` types (SAMPLERS) are built as ``cls(dataset, shuffle=..., seed=..., rank=..., world_size=...,
# drop_last=..., groups=..., batch_size=..., **options of the spec)``.


@SAMPLERS.register()
class EpochSampler(Sampler):
    """``DistributedSampler``'s order (seeded permutation, padded to a multiple of ``world_size``,
    rank-strided shards) yielding ``(index, sample_seed)`` pairs, and able to start at a position.

    ``set_epoch(epoch, start=k)`` skips this rank's first ``k`` samples of the epoch (no loading).
    ``sample_seed`` is unique per (seed, epoch, position in the epoch's global order).

    With ``groups`` (a group id per item, e.g. landscape / portrait) and ``batch_size``, the order
    is rearranged so that every batch of every rank holds one group only (mmdetection's
    GroupSampler, detectron2's aspect-ratio grouping): a batch mixing a portrait and a landscape
    image would be padded to a square, computing on up to twice the pixels. Leftovers of each
    group end the epoch.

    ``dataset`` is the dataset (or its length). Subclasses change what one epoch draws by
    overriding :meth:`epoch_order` (and ``size``, the samples per epoch before sharding).
    """

    def __init__(self, dataset: Sized | int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, groups: Sequence[int] | None = None,
                 batch_size: int = 1) -> None:
        size = dataset if isinstance(dataset, int) else len(dataset)
        self.groups = list(groups) if groups is not None and len(set(groups)) > 1 else None
        self.chunk = batch_size * world_size
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world = rank, world_size
        self.drop_last = drop_last
        self.per_rank = size // world_size if drop_last else math.ceil(size / world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)

    def epoch_generator(self) -> torch.Generator:
        """The generator of this epoch's order: a function of (seed, epoch) only."""
        return torch.Generator().manual_seed(self.seed + self.epoch)

    def epoch_order(self) -> list[int]:
        """This epoch's ``size`` dataset indices in global order (before grouping, padding and sharding)."""
        if not self.shuffle:
            return list(range(self.size))
        return torch.randperm(self.size, generator=self.epoch_generator()).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.epoch_order()
        if self.groups is not None:
            order = self.grouped(order)
        total = self.per_rank * self.world
        order = (order * math.ceil(total / max(len(order), 1)))[:total] if order else []
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for position in range(self.rank + self.start * self.world, total, self.world):
            yield order[position], (base + position) % (1 << 62)

    def grouped(self, order: list[int]) -> list[int]:
        """``order`` regrouped into chunks of ``batch_size x world_size`` items of one group each (so
        rank ``r``'s slice ``chunk[r::world]`` of every chunk is one batch of one group)."""
        assert self.groups is not None, "called only for a grouped sampler"
        buckets: dict[int, list[int]] = {}
        out: list[int] = []
        for index in order:
            bucket = buckets.setdefault(self.groups[index], [])
            bucket.append(index)
            if len(bucket) == self.chunk:
                out += bucket
                bucket.clear()
        return out + [i for bucket in buckets.values() for i in bucket]


class SeededDataset(Dataset):
    """Runs ``dataset[index]`` with torch's RNG seeded by the sampler's ``sample_seed`` (and restored
    afterwards), so random transforms do not depend on the worker or on what was loaded before.
    Other attributes (``classes``, ``coco``, ``cat_ids``...) are the wrapped dataset's."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # map-style: torch's Dataset declares no __len__

    def __getitem__(self, item: Any) -> Any:
        if not isinstance(item, tuple):
            return self.dataset[item]
        index, seed = item
        # the CPU generator only: torch.manual_seed would also queue a CUDA seeding with a formatted
        # stack trace on every call (about 0.5 ms an item inside a DataLoader worker)
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.dataset, name)
