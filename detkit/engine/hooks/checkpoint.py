"""Checkpoints: ``epoch_N.pth`` + ``latest.pth`` per epoch interval, ``latest.pth`` every N iterations
and on an interrupt, and a slim ``model_final.pth`` (inference weights only) at the end."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from detkit.distributed import any_rank
from detkit.engine.checkpoint import (
    CheckpointError,
    copy_checkpoint,
    inference_state,
    prune_epoch_checkpoints,
    save_checkpoint,
)
from detkit.engine.hooks.base import Hook
from detkit.engine.hooks.nan_guard import NonFiniteLossError
from detkit.registry import HOOKS

if TYPE_CHECKING:
    from detkit.engine.trainer import Trainer

logger = logging.getLogger("detkit")


def save_training_state(trainer: "Trainer", name: str) -> None:
    """Every rank builds the state (RNG states are gathered); rank 0 writes ``work_dir/name`` atomically."""
    state = trainer.state_dict()
    bad = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # the weights are the same on every rank: all ranks raise together
        raise NonFiniteLossError(f"refusing to save {name}: non-finite weights in {bad[:5]}")
    error = None
    if trainer.is_main:
        try:
            save_checkpoint(state, trainer.work_dir / name)
        except CheckpointError as err:
            error = err
    if any_rank(torch.tensor(error is not None)):
        raise error or CheckpointError(f"rank 0 could not write {trainer.work_dir / name}")


@HOOKS.register()
class CheckpointHook(Hook):
    """``interval`` epochs (and the last one): ``epoch_N.pth`` and ``latest.pth`` (a byte copy),
    keeping the newest ``keep`` epoch files (0: all); ``interval_iters``: ``latest.pth`` every N
    optimizer steps, mid-epoch included; on an interrupt: ``latest.pth`` at the interrupted step;
    at the end: ``model_final.pth`` with the inference weights, config and classes only."""

    priority = 70

    def __init__(self, interval: int = 1, interval_iters: int | None = None, keep: int = 3) -> None:
        self.interval, self.interval_iters, self.keep = interval, interval_iters, keep

    def after_step(self, trainer: "Trainer") -> None:
        mid_epoch = trainer.inner < trainer.steps_per_epoch
        if self.interval_iters and trainer.result.applied and mid_epoch and trainer.iter % self.interval_iters == 0:
            save_training_state(trainer, "latest.pth")

    def after_epoch(self, trainer: "Trainer") -> None:
        if trainer.epoch % self.interval and trainer.epoch < trainer.max_epochs and trainer.stop_reason is None:
            return
        save_training_state(trainer, f"epoch_{trainer.epoch}.pth")
        if trainer.is_main:
            copy_checkpoint(trainer.work_dir / f"epoch_{trainer.epoch}.pth", trainer.work_dir / "latest.pth")
            prune_epoch_checkpoints(trainer.work_dir, self.keep)

    def after_train(self, trainer: "Trainer") -> None:
        if "interrupted" in trainer.summary:
            save_training_state(trainer, "latest.pth")
        elif trainer.is_main:
            save_checkpoint(inference_state(trainer), trainer.work_dir / "model_final.pth")
        files: dict[str, Any] = trainer.summary.setdefault("files", {})
        files.update({"latest": trainer.work_dir / "latest.pth"})
        if "interrupted" not in trainer.summary:
            files["model_final"] = trainer.work_dir / "model_final.pth"
