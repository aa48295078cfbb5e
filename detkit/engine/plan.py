"""Planning a training run: every check of the config and every component built (data, model,
optimizer, wrappers, hooks), before anything is written or locked. :func:`plan_run` -> :class:`RunPlan`;
``detkit/engine/runner.py`` then opens the work dir and starts it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detkit.data import build_dataloader, build_dataset
from detkit.data.loader import data_settings
from detkit.distributed import get_rank, get_world_size, is_distributed
from detkit.engine.checkpoint import check_model_weights, check_resumable, find_resume_checkpoint, load_checkpoint
from detkit.engine.compiled_step import CompiledLoss
from detkit.engine.evaluator import EvalSettings
from detkit.engine.hooks import CloseMosaic, Hook, TermGradNormHook, build_hooks
from detkit.engine.hooks.close_mosaic import mixing_steps
from detkit.engine.hooks.schedule import weight_schedules
from detkit.engine.load_from import load_pretrained
from detkit.engine.optim import build_optimizer, check_optimizer_spec
from detkit.engine.rng import seed_everything
from detkit.engine.run_log import setup_logging
from detkit.engine.settings import TrainSettings
from detkit.engine.teacher import with_teacher
from detkit.engine.workdir import check_new_run
from detkit.engine.writers import check_writer_specs
from detkit.losses.weights import resolve_class_weights
from detkit.models import build_detector
from detkit.registry import ConfigError

logger = logging.getLogger("detkit")


def init_distributed(device_arg: str, timeout: float | None = None) -> tuple[torch.device, int]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1``, its collectives failing after ``timeout``
    seconds (torch's default when None); returns (device, local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch.cuda.is_available() is False")
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if world > 1 and not is_distributed():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=None if timeout is None else timedelta(seconds=timeout))
        if not use_cuda:  # share the cores between the local processes
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), local_rank
    return torch.device("cpu"), local_rank


def check_class_counts(model: nn.Module, dataset: Any) -> None:
    """Fewer model classes than the dataset has is an error (labels out of range); more is a warning
    (the extra outputs are trained as background and left out of evaluation)."""
    classes, num = list(getattr(dataset, "classes", []) or []), getattr(model, "num_classes", None)
    if not classes or num is None or num == len(classes):
        return
    if num < len(classes):
        raise ConfigError(f"the model has {num} classes (model num_classes) but data.train has {len(classes)} "
                          f"({', '.join(map(str, classes[:8]))}{', ...' if len(classes) > 8 else ''}); set the "
                          f"model's num_classes to {len(classes)}")
    logger.warning("the model has %d classes but data.train has %d: the extra %d outputs are only trained as "
                   "background and are left out of evaluation", num, len(classes), num - len(classes))


def fused_optimizer_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``optimizer`` with ``fused: true`` (one kernel over all parameters: AdamW's update of the default
    FCOS takes 8 ms instead of 34 ms on 2 CPU cores) where the type supports it and the config does not
    set ``fused``."""
    if spec.get("type") not in ("SGD", "Adam", "AdamW") or "foreach" in spec:  # fused and foreach exclude each other
        return spec
    return {**spec, "fused": spec.get("fused", True)}


def resume_state(resume: str | None, work_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """``None``, ``"auto"`` (the work dir's checkpoint with the most iterations) or a path -> (path, state)."""
    if not resume:
        return None
    if resume == "auto":
        found = find_resume_checkpoint(work_dir) if work_dir.is_dir() else None
        if found is not None:
            check_resumable(found[1], found[0])
        return found
    state = load_checkpoint(resume)
    check_resumable(state, resume)
    return Path(resume), state


def finished_run(found: tuple[Path, dict[str, Any]], epochs: int) -> bool:
    """Whether the resumed checkpoint ends its run (``train.epochs`` reached, or an early stop); says so."""
    path, state = found
    if int(state["epoch"]) >= epochs:
        logger.info("%s: this run already finished (epoch %d of train.epochs %d); nothing to train. To train "
                    "longer: --resume --set train.epochs=N", path, state["epoch"], epochs)
        return True
    if state.get("stop_reason"):
        logger.info("%s: this run already finished (%s); nothing to train. To go on from its weights: a new run "
                    "with --load-from %s", path, state["stop_reason"], path)
        return True
    return False


def check_train_config(cfg: dict[str, Any]) -> tuple[TrainSettings, dict[str, Any]]:
    """The checks of a training config that need no data and write nothing (sections, the train, data
    and eval settings, writers and their packages, the optimizer): its settings and optimizer spec."""
    for section in ("model", "data"):
        if not isinstance(cfg.get(section), dict):
            raise ConfigError(f"the config has no '{section}' section (a mapping); see configs/ for examples")
    settings = TrainSettings.from_config(cfg)
    data_settings(cfg["data"])
    check_writer_specs(settings.writers)  # the packages too: before --overwrite deletes anything
    EvalSettings.from_config(cfg)
    return settings, check_optimizer_spec(cfg.get("optimizer") or {"type": "SGD", "lr": 0.01, "momentum": 0.9})


@dataclass
class RunPlan:
    """A training run, validated and built; nothing in ``work_dir`` written yet and no lock taken.

    ``model`` is what checkpoints hold; ``train_model`` what the step calls (DDP / compiled wrapper);
    ``resumed``: ``(path, state)`` of the checkpoint to resume, or None; ``load_report``: what
    ``load_from`` loaded, for ``load_from.txt``; ``overwrite``: clear the old run when the work dir opens."""

    cfg: dict[str, Any]
    settings: TrainSettings
    work_dir: Path
    device: torch.device
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: Any
    hooks: list[Hook]
    resumed: tuple[Path, dict[str, Any]] | None = None
    load_report: str | None = None
    overwrite: bool = False


def build_model_and_data(cfg: dict[str, Any], settings: TrainSettings, device: torch.device
                         ) -> tuple[nn.Module, Any, Any]:
    """The detector (on ``device``, SyncBN under DDP, channels_last), the train loader and the val loader
    (None without ``data.val``), in the order that fixes their random draws."""
    rank, world = get_rank(), get_world_size()
    # the training set before the model: class_weight: auto is computed from its boxes per class
    train_set = build_dataset(cfg["data"]["train"], "data.train") if "train" in cfg["data"] else None
    cfg["model"] = resolve_class_weights(cfg["model"], train_set)  # config.yaml and checkpoints keep the numbers
    model = with_teacher(build_detector(cfg["model"]), getattr(train_set, "classes", None)).to(device)
    if settings.sync_bn and is_distributed():
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    loader = build_dataloader(cfg["data"], "train", seed=settings.seed, rank=rank, world_size=world, dataset=train_set)
    if len(loader) == 0:
        images = len(loader.dataset)  # type: ignore[arg-type]  # map-style: torch's Dataset declares no __len__
        raise ConfigError(f"data.train: {images} images give no batch of {loader.batch_size} on "
                          f"{world} process(es)")
    check_class_counts(model, loader.dataset)
    val_loader = (build_dataloader(cfg["data"], "val", seed=settings.seed, rank=rank, world_size=world)
                  if "val" in cfg["data"] else None)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, loader, val_loader


def wrap_model(model: nn.Module, settings: TrainSettings, device: torch.device, local_rank: int) -> nn.Module:
    """What the training step calls: ``model``, its DDP wrapper, compiled (``train.compile: true``) or
    the whole compiled loss step (``full``)."""
    train_model: nn.Module = model
    if is_distributed():
        if settings.compile == "full":
            raise ConfigError("train.compile: full runs in one process for now; under torchrun use train.compile: true")
        train_model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    if settings.compile == "full":
        if weight_schedules(model):
            raise ConfigError("train.compile: full cannot follow a loss_weight schedule (a recompile per step); "
                              "use a constant loss_weight or train.compile: true")
        train_model = CompiledLoss(model, channels_last=settings.channels_last)
    elif settings.compile:
        train_model.compile()
    return train_model


def starting_weights(model: nn.Module, cfg: dict[str, Any], resumed: tuple[Path, dict[str, Any]] | None) -> str | None:
    """Check the resumed checkpoint's weights against ``model`` (the trainer loads them), or load
    ``load_from`` into it; returns the load report of ``load_from`` (None otherwise)."""
    if resumed:
        check_model_weights(model, resumed[1]["model"], resumed[0])  # named before anything is written
        if cfg.get("load_from"):
            logger.info("resuming: load_from %s is not used (the resumed checkpoint holds the weights)",
                        cfg["load_from"])
        return None
    return load_pretrained(model, str(cfg["load_from"])) if cfg.get("load_from") else None


def plan_run(cfg: dict[str, Any], work_dir: Path, device: str | None = None, resume: str | None = None,
             overwrite: bool = False) -> RunPlan | None:
    """Every check and every component of the run, with nothing written and no lock taken; None when the
    resumed run is finished. A new run refuses a work dir holding another run unless ``overwrite``."""
    settings, optimizer_spec = check_train_config(cfg)
    dev, local_rank = init_distributed(device or settings.device, settings.ddp_timeout)
    setup_logging(None, get_rank())
    if settings.amp == "fp16" and dev.type != "cuda":
        raise ConfigError("train.amp: fp16 needs CUDA (GradScaler); use bf16 on CPU")
    resumed = resume_state(resume, work_dir)
    if not resumed:
        check_new_run(work_dir, overwrite, resuming=bool(resume))
    seed_everything(settings.seed + get_rank())
    model, loader, val_loader = build_model_and_data(cfg, settings, dev)
    optimizer = build_optimizer(fused_optimizer_spec(optimizer_spec), model)
    train_model = wrap_model(model, settings, dev, local_rank)
    load_report = starting_weights(model, cfg, resumed)
    hooks = build_hooks(cfg, settings, val_loader, model, getattr(loader.dataset, "classes", None))
    if any(isinstance(h, CloseMosaic) for h in hooks):
        mixing_steps(loader.dataset)
    if settings.compile == "full":  # the neck's outputs are inside the compiled graph: no per-term gradients
        hooks = [h for h in hooks if not isinstance(h, TermGradNormHook)]
    if resumed and finished_run(resumed, settings.epochs):  # said only once the whole config is known to be valid
        return None
    return RunPlan(cfg, settings, work_dir, dev, model, train_model, optimizer, loader, hooks, resumed, load_report,
                   overwrite)
