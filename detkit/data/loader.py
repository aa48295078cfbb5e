"""Datasets and data loaders from the ``data`` section of a config."""

from __future__ import annotations

import signal
from functools import partial
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader, Dataset

import detkit.data.repeat_factor  # noqa: F401  (registers RepeatFactorSampler)
import detkit.data.shapes  # noqa: F401  (registers ShapesDataset and CocoDataset)
from detkit.data.collate import collate_detection
from detkit.data.sampler import EpochSampler, SeededDataset
from detkit.data.transforms import DetectionPipeline, refuse_mixing
from detkit.registry import DATASETS, SAMPLERS, ConfigError, build_path, check_keys

#: ``data.*`` settings with their defaults (``train`` / ``val`` are dataset specs; ``sampler`` is the
#: training sampler's spec, ``{type: EpochSampler}`` when null).
DATA_DEFAULTS: dict[str, Any] = {"batch_size": 8, "val_batch_size": None, "num_workers": 2, "pin_memory": None,
                                 "persistent_workers": False, "drop_last": False, "size_divisor": 32,
                                 "group_by_aspect_ratio": True, "sampler": None}
#: what the loader gives every sampler (a ``data.sampler`` spec sets the other arguments)
SAMPLER_ARGS = ("dataset", "shuffle", "seed", "rank", "world_size", "drop_last", "groups", "batch_size")
DATA_KEYS = ("train", "val", *DATA_DEFAULTS)


def data_settings(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` over :data:`DATA_DEFAULTS`, checked: unknown keys, and every number's type and range."""
    if not isinstance(data_cfg, Mapping):
        raise ConfigError(f"data must be a mapping with train/val dataset specs, got {data_cfg!r}")
    check_keys(data_cfg, DATA_KEYS, "data", "data setting")
    s = {**DATA_DEFAULTS, **{k: v for k, v in data_cfg.items() if k in DATA_DEFAULTS}}
    s["val_batch_size"] = s["val_batch_size"] if s["val_batch_size"] is not None else s["batch_size"]
    for key, minimum in (("batch_size", 1), ("val_batch_size", 1), ("num_workers", 0), ("size_divisor", 1)):
        value = s[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"data.{key} must be an integer >= {minimum}, got {value!r}")
    for key in ("persistent_workers", "drop_last", "group_by_aspect_ratio"):
        if not isinstance(s[key], bool):
            raise ConfigError(f"data.{key} must be true or false, got {s[key]!r}")
    if s["pin_memory"] is not None and not isinstance(s["pin_memory"], bool):
        raise ConfigError(f"data.pin_memory must be null (when CUDA is available), true or false, "
                          f"got {s['pin_memory']!r}")
    sampler = s["sampler"]
    if sampler is not None:
        if not isinstance(sampler, Mapping) or "type" not in sampler:
            raise ConfigError(f"data.sampler must be null (EpochSampler) or a spec like {{type: RepeatFactorSampler, "
                              f"repeat_thr: 0.1}}, got {sampler!r}")
        fixed = sorted(set(sampler) & set(SAMPLER_ARGS))
        if fixed:
            raise ConfigError(f"data.sampler.{fixed[0]} is set by the loader (from train.seed, the process rank, "
                              f"data.batch_size...); remove it from data.sampler")
    return s


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C / SIGTERM to the main process, which finishes the step and saves
    (a terminal's Ctrl-C reaches the whole process group; a worker killed by it would end the run)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_dataset(spec: Mapping[str, Any], key: str | None = None) -> Dataset:
    """A dataset from ``{type: CocoDataset | VOCDataset | YOLODataset | ShapesDataset, ...}``, its mixing
    transforms (Mosaic, MixUp) bound to it."""
    dataset = DATASETS.build(spec, key)
    if isinstance(getattr(dataset, "transforms", None), DetectionPipeline):
        with build_path(key):
            dataset.transforms.bind(dataset)
    return dataset


def build_dataloader(data_cfg: Mapping[str, Any], split: str, seed: int = 0, rank: int = 0,
                     world_size: int = 1, dataset: Dataset | None = None) -> DataLoader:
    """The loader of ``data_cfg[split]`` (``train`` shuffles, anything else keeps file order and refuses
    Mosaic / MixUp in its transforms).

    Sampling goes through :class:`EpochSampler` (also for one process; ``data.sampler`` picks a
    subclass for training, e.g. ``RepeatFactorSampler``): the order and each
    sample's random transforms depend only on ``(seed, epoch, position)``; with
    ``group_by_aspect_ratio`` (default) training batches hold landscape or portrait images only. Call
    ``loader.sampler.set_epoch(epoch, start=k)`` every epoch; a resumed run sees the same data.
    """
    s = data_settings(data_cfg)
    if split not in data_cfg:
        raise ConfigError(f"data.{split}: no dataset spec for split '{split}'; data has keys {sorted(data_cfg)}")
    train = split == "train"
    dataset = dataset if dataset is not None else build_dataset(data_cfg[split], f"data.{split}")
    if not train:
        refuse_mixing(getattr(dataset, "transforms", None), f"data.{split}")
    batch_size = s["batch_size"] if train else s["val_batch_size"]
    groups = dataset.landscape() if train and s["group_by_aspect_ratio"] and hasattr(dataset, "landscape") else None
    args = dict(dataset=dataset, shuffle=train, seed=seed, rank=rank, world_size=world_size,
                drop_last=train and world_size > 1, groups=groups, batch_size=batch_size)
    sampler = (SAMPLERS.build(s["sampler"], "data.sampler", **args) if train and s["sampler"] is not None
               else EpochSampler(**args))
    workers = s["num_workers"]
    return DataLoader(
        SeededDataset(dataset), batch_size=batch_size, sampler=sampler,
        num_workers=workers, collate_fn=partial(collate_detection, size_divisor=s["size_divisor"]),
        pin_memory=torch.cuda.is_available() if s["pin_memory"] is None else s["pin_memory"],
        persistent_workers=s["persistent_workers"] and workers > 0,
        drop_last=train and s["drop_last"], generator=torch.Generator().manual_seed(seed + rank),
        worker_init_fn=ignore_interrupts if workers > 0 else None)
