"""From a :class:`~detkit.engine.plan.RunPlan` to a running :class:`Trainer` (the work dir opened, locked and
written; the writers started), the run's final report, and the evaluation of a checkpoint."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from detkit.config import dump_config
from detkit.data import build_dataloader
from detkit.distributed import any_rank, get_rank, get_world_size
from detkit.engine.checkpoint import (
    evaluation_weights,
    load_checkpoint,
    load_model_weights,
    remove_stale_temp_files,
)
from detkit.engine.evaluator import EvalSettings, eval_classes, evaluate_model
from detkit.engine.hooks import BestCheckpointHook
from detkit.engine.plan import RunPlan, init_distributed, plan_run
from detkit.engine.precision import resolve_amp
from detkit.engine.run_log import setup_logging
from detkit.engine.settings import TrainSettings
from detkit.engine.trainer import Trainer
from detkit.engine.workdir import WorkDirLock, clear_previous_run
from detkit.engine.writers import (
    ConsoleWriter,
    JsonlWriter,
    WriterGroup,
    build_writers,
)
from detkit.models import build_detector
from detkit.registry import ConfigError

logger = logging.getLogger("detkit")


def lock_work_dir(work_dir: Path) -> WorkDirLock | None:
    """Rank 0 takes the work dir's ``.lock`` (None on the other ranks); every rank stops when it cannot."""
    lock, refused = None, None
    if get_rank() == 0:
        try:
            lock = WorkDirLock(work_dir).acquire()
        except ConfigError as err:
            refused = err
    if any_rank(torch.tensor(refused is not None)):  # every rank stops, not only rank 0
        raise refused or ConfigError(f"{work_dir} is in use by another run (see rank 0's message)")
    return lock


def start_run(plan: RunPlan) -> Trainer:
    """Open the planned run's work dir: lock it (``.lock``, for the run's lifetime: the trainer releases
    it), remove stale temp files, clear the old run with ``overwrite``, write ``log.txt``,
    ``config.yaml`` and ``load_from.txt``, start the writers (rank 0); the :class:`Trainer` gets them."""
    work_dir, rank, resumed, s = plan.work_dir, get_rank(), plan.resumed, plan.settings
    lock = lock_work_dir(work_dir)
    try:
        if rank == 0:
            remove_stale_temp_files(work_dir)
            if not resumed and plan.overwrite:
                clear_previous_run(work_dir)
        setup_logging(work_dir, rank)
        if rank == 0:
            dump_config(plan.cfg, work_dir / "config.yaml")
            if plan.load_report:
                (work_dir / "load_from.txt").write_text(plan.load_report + "\n")
                logger.info("%s", plan.load_report)
        writers = build_writers(s.writers, work_dir, resumed[1]["iter"] if resumed else None, rank == 0)
    except BaseException:
        if lock is not None:  # the work dir stays usable for the next try
            lock.release()
        raise
    trainer = Trainer(plan.model, plan.optimizer, plan.loader, plan.hooks, work_dir=work_dir, device=plan.device,
                      epochs=s.epochs, train_model=plan.train_model, accumulate=s.accumulate, grad_clip=s.grad_clip,
                      amp=resolve_amp(s.amp, plan.device), seed=s.seed, channels_last=s.channels_last, cfg=plan.cfg,
                      state=resumed[1] if resumed else None, writers=writers, lock=lock)
    if resumed:
        logger.info("resuming from %s (epoch %d, iteration %d)", resumed[0], resumed[1]["epoch"], resumed[1]["iter"])
    return trainer


def build_trainer(cfg: dict[str, Any], work_dir: Path, device: str | None = None, resume: str | None = None,
                  overwrite: bool = False) -> Trainer | None:
    """:func:`plan_run` then :func:`start_run`: None when the resumed run is finished (nothing written)."""
    plan = plan_run(cfg, work_dir, device, resume, overwrite)
    return None if plan is None else start_run(plan)


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
