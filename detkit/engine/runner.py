"""From a resolved config to a running :class:`Trainer` (training) or an evaluation of a checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detkit.config import dump_config
from detkit.data import build_dataloader, build_dataset
from detkit.data.loader import data_settings
from detkit.distributed import any_rank, get_rank, get_world_size, is_distributed
from detkit.engine.checkpoint import (
    check_model_weights,
    check_resumable,
    evaluation_weights,
    find_resume_checkpoint,
    load_checkpoint,
    load_model_weights,
    remove_stale_temp_files,
)
from detkit.engine.compiled_step import CompiledLoss
from detkit.engine.evaluator import EvalSettings, eval_classes, evaluate_model
from detkit.engine.hooks import BestCheckpointHook, CloseMosaic, TermGradNormHook, build_hooks
from detkit.engine.hooks.close_mosaic import mixing_steps
from detkit.engine.hooks.schedule import weight_schedules
from detkit.engine.load_from import load_pretrained
from detkit.engine.optim import build_optimizer, check_optimizer_spec
from detkit.engine.precision import resolve_amp
from detkit.engine.rng import seed_everything
from detkit.engine.run_log import setup_logging
from detkit.engine.settings import TrainSettings
from detkit.engine.teacher import with_teacher
from detkit.engine.trainer import Trainer
from detkit.engine.workdir import WorkDirLock, check_new_run, clear_previous_run
from detkit.engine.writers import (
    ConsoleWriter,
    JsonlWriter,
    WriterGroup,
    build_writers,
    check_writer_specs,
)
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


def build_trainer(cfg: dict[str, Any], work_dir: Path, device: str | None = None, resume: str | None = None,
                  overwrite: bool = False) -> Trainer | None:
    """Everything validated and built before anything is written; None when the resumed run is finished.

    A new run refuses a work dir holding another run unless ``overwrite``; the work dir is locked
    (``.lock``) for the run's lifetime (``trainer.lock.release()``), so a second run into it refuses.
    """
    settings, optimizer_spec = check_train_config(cfg)
    dev, local_rank = init_distributed(device or settings.device, settings.ddp_timeout)
    rank, world = get_rank(), get_world_size()
    setup_logging(None, rank)
    if settings.amp == "fp16" and dev.type != "cuda":
        raise ConfigError("train.amp: fp16 needs CUDA (GradScaler); use bf16 on CPU")
    found = resume_state(resume, work_dir)
    if not found:
        check_new_run(work_dir, overwrite, resuming=bool(resume))
    seed_everything(settings.seed + rank)
    # the training set before the model: class_weight: auto is computed from its boxes per class
    train_set = build_dataset(cfg["data"]["train"], "data.train") if "train" in cfg["data"] else None
    cfg["model"] = resolve_class_weights(cfg["model"], train_set)  # config.yaml and checkpoints keep the numbers
    model = with_teacher(build_detector(cfg["model"]), getattr(train_set, "classes", None)).to(dev)
    if settings.sync_bn and is_distributed():
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    loader = build_dataloader(cfg["data"], "train", seed=settings.seed, rank=rank, world_size=world, dataset=train_set)
    if len(loader) == 0:
        raise ConfigError(f"data.train: {len(loader.dataset)} images give no batch of {loader.batch_size} on "
                          f"{world} process(es)")
    check_class_counts(model, loader.dataset)
    val_loader = (build_dataloader(cfg["data"], "val", seed=settings.seed, rank=rank, world_size=world)
                  if "val" in cfg["data"] else None)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(fused_optimizer_spec(optimizer_spec), model)
    train_model: nn.Module = model
    if is_distributed():
        if settings.compile == "full":
            raise ConfigError("train.compile: full runs in one process for now; under torchrun use train.compile: true")
        train_model = DistributedDataParallel(model, device_ids=[local_rank] if dev.type == "cuda" else None)
    if settings.compile == "full":
        if weight_schedules(model):
            raise ConfigError("train.compile: full cannot follow a loss_weight schedule (a recompile per step); "
                              "use a constant loss_weight or train.compile: true")
        train_model = CompiledLoss(model, channels_last=settings.channels_last)
    elif settings.compile:
        train_model.compile()
    load_report = None
    if found:
        check_model_weights(model, found[1]["model"], found[0])  # named before anything is written; the trainer loads
        if cfg.get("load_from"):
            logger.info("resuming: load_from %s is not used (the resumed checkpoint holds the weights)",
                        cfg["load_from"])
    elif cfg.get("load_from"):
        load_report = load_pretrained(model, str(cfg["load_from"]))
    hooks = build_hooks(cfg, settings, val_loader, model, getattr(loader.dataset, "classes", None))
    if any(isinstance(h, CloseMosaic) for h in hooks):
        mixing_steps(loader.dataset)
    if settings.compile == "full":  # the neck's outputs are inside the compiled graph: no per-term gradients
        hooks = [h for h in hooks if not isinstance(h, TermGradNormHook)]
    if found and finished_run(found, settings.epochs):  # said only once the whole config is known to be valid
        return None
    # validated and built: from here on the work dir is written
    lock, refused = None, None
    if rank == 0:
        try:
            lock = WorkDirLock(work_dir).acquire()
        except ConfigError as err:
            refused = err
    if any_rank(torch.tensor(refused is not None)):  # every rank stops, not only rank 0
        raise refused or ConfigError(f"{work_dir} is in use by another run (see rank 0's message)")
    if rank == 0:
        remove_stale_temp_files(work_dir)
        if not found and overwrite:
            clear_previous_run(work_dir)
    setup_logging(work_dir, rank)
    if rank == 0:
        dump_config(cfg, work_dir / "config.yaml")
        if load_report:
            (work_dir / "load_from.txt").write_text(load_report + "\n")
            logger.info("%s", load_report)
    trainer = Trainer(model, optimizer, loader, hooks, work_dir=work_dir, device=dev, epochs=settings.epochs,
                      train_model=train_model, accumulate=settings.accumulate, grad_clip=settings.grad_clip,
                      amp=resolve_amp(settings.amp, dev), seed=settings.seed, channels_last=settings.channels_last,
                      cfg=cfg, state=found[1] if found else None)
    trainer.lock = lock
    trainer.writers = build_writers(settings.writers, work_dir, found[1]["iter"] if found else None, rank == 0)
    if found:
        logger.info("resuming from %s (epoch %d, iteration %d)", found[0], found[1]["epoch"], found[1]["iter"])
    return trainer


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that continues this run: the same arguments, any ``--resume [CKPT]`` replaced by
    ``--resume`` (the work dir's newest checkpoint, which the interrupt just saved)."""
    argv = list(sys.argv if argv is None else argv)
    args, skip = [], False
    for i, arg in enumerate(argv[1:], 1):
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        if not arg.startswith("--resume="):
            args.append(arg)
    return shlex.join([Path(sys.executable).name, argv[0], *args, "--resume"])


def run_training(cfg: dict[str, Any], work_dir: Path, device: str | None = None, resume: str | None = None,
                 overwrite: bool = False) -> None:
    """Build, train, and print the run's summary (also after an early stop)."""
    trainer = build_trainer(cfg, work_dir, device, resume, overwrite)
    if trainer is None:
        return
    logger.info("training %s on %s (%s): %d epochs x %d steps (accumulate %d), %d process(es), work_dir %s",
                cfg["model"].get("type"), trainer.device, f"{trainer.amp} autocast" if trainer.amp else "fp32",
                trainer.max_epochs, trainer.steps_per_epoch, trainer.accumulate, trainer.world, work_dir)
    try:
        trainer.train()
    finally:
        trainer.writers.close()
    s, last = trainer.summary, trainer.last_eval
    lines = [f"finished: {trainer.stop_reason or f'{trainer.epoch} epochs'}, {trainer.iter} optimizer steps in "
             f"{s.get('wall_time', 0) / 60:.1f} min"]
    best = next((h for h in trainer.hooks if isinstance(h, BestCheckpointHook)), None)
    if best is not None and last is not None:
        lines.append(f"best {best.metric} {best.best:.4f} at epoch {best.best_epoch} ({best.path(trainer)})"
                     if best.best is not None
                     else f"best {best.metric}: no evaluation gave it a value (NaN), so no best.pth")
        lines.append("final: " + " ".join(f"{k} {last.metrics[k]:.4f}" for k in ("AP", "AP50", "AP75")
                                          if k in last.metrics))
    lines += [f"{name}: {path}" for name, path in s.get("files", {}).items()]
    lines.append(f"config: {work_dir / 'config.yaml'}")
    logger.info("\n  ".join(lines))


def evaluate_checkpoint(cfg: dict[str, Any], checkpoint: str, work_dir: Path, device: str | None = None
                        ) -> dict[str, Any]:
    """Load ``checkpoint``'s evaluation weights into the config's model and evaluate on ``data.val``,
    the model's labels matched to ``data.val``'s categories by the class names the checkpoint stores.

    Writes ``log.txt``, ``metrics.jsonl`` and ``results.json`` into ``work_dir``; no trainer involved.
    """
    settings = TrainSettings.from_config(cfg)
    if "val" not in (cfg.get("data") or {}):
        raise ConfigError("data.val: no validation dataset in the config")
    dev, _ = init_distributed(device or settings.device)
    setup_logging(None, get_rank())
    state = load_checkpoint(checkpoint)
    model = build_detector(cfg["model"])
    loader = build_dataloader(cfg["data"], "val", seed=settings.seed, rank=get_rank(), world_size=get_world_size())
    classes = eval_classes(loader.dataset, state.get("classes"), getattr(model, "num_classes", None),
                           f"the checkpoint {checkpoint}")
    load_model_weights(model, evaluation_weights(state), checkpoint)
    setup_logging(work_dir, get_rank())
    if classes.left_out:
        logger.warning("%s", classes.left_out)
    eval_settings = EvalSettings.from_config(cfg)
    ev = evaluate_model(model.to(dev), loader, dev, resolve_amp(settings.amp, dev),
                        backend=eval_settings.backend, classes=classes, tiles=eval_settings.tiles)
    if get_rank() == 0:
        record = {"epoch": int(state.get("epoch", 0)), "iter": int(state.get("iter", 0)),
                  "checkpoint": str(checkpoint), "num_images": ev.num_images, **ev.metrics}
        WriterGroup([ConsoleWriter(), JsonlWriter(work_dir)]).write("eval", record["iter"], record)
        (work_dir / "results.json").write_text(json.dumps(ev.results))
    return ev.metrics
