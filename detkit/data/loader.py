"""Datasets and data loaders from the ``data`` section of a config."""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from detkit.data.collate import collate_detection
from detkit.registry import DATASETS, ConfigError, suggestion

DATA_KEYS = ("train", "val", "batch_size", "val_batch_size", "num_workers", "pin_memory", "persistent_workers",
             "drop_last", "size_divisor")


def build_dataset(spec: Mapping[str, Any], key: str | None = None) -> Dataset:
    """A dataset from ``{type: CocoDataset | ShapesDataset, ...}``."""
    import detkit.data.shapes  # noqa: F401  (registers the datasets)

    return DATASETS.build(spec, key)


def build_dataloader(data_cfg: Mapping[str, Any], split: str, seed: int = 0, rank: int = 0,
                     world_size: int = 1, dataset: Dataset | None = None) -> DataLoader:
    """The loader of ``data_cfg[split]`` (``train`` shuffles, anything else keeps file order).

    Sampling always goes through ``DistributedSampler`` (also for one process), so the order
    depends only on ``(seed, epoch)``: call ``loader.sampler.set_epoch(epoch)`` every epoch and
    a resumed run sees the same order. Keys used: ``batch_size`` (per process), ``num_workers``,
    ``pin_memory`` (null: when CUDA is available), ``persistent_workers``, ``drop_last``,
    ``size_divisor`` and, for evaluation, ``val_batch_size``.
    """
    for key in data_cfg:
        if key not in DATA_KEYS:
            hint = suggestion(key, DATA_KEYS)
            raise ConfigError(f"data.{key}: unknown data setting.{hint} Known: {', '.join(DATA_KEYS)}")
    if split not in data_cfg:
        raise ConfigError(f"data.{split}: no dataset spec for split '{split}'; "
                          f"data has keys {sorted(data_cfg)}")
    train = split == "train"
    dataset = dataset if dataset is not None else build_dataset(data_cfg[split], f"data.{split}")
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed,
                                 drop_last=train and world_size > 1)
    batch_size = int(data_cfg.get("batch_size", 8) if train else
                     data_cfg.get("val_batch_size", data_cfg.get("batch_size", 8)))
    workers = int(data_cfg.get("num_workers", 2))
    generator = torch.Generator().manual_seed(seed + rank)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=partial(collate_detection, size_divisor=int(data_cfg.get("size_divisor", 32))),
        pin_memory=torch.cuda.is_available() if data_cfg.get("pin_memory") is None else bool(data_cfg["pin_memory"]),
        persistent_workers=bool(data_cfg.get("persistent_workers", False)) and workers > 0,
        drop_last=train and bool(data_cfg.get("drop_last", False)), generator=generator)
