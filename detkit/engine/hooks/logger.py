"""Train records every ``log_interval`` steps (means over the interval) and the console progress bar."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from detkit.engine.hooks.base import Hook
from detkit.engine.run_log import progress
from detkit.registry import HOOKS

if TYPE_CHECKING:
    from detkit.engine.trainer import Trainer


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@HOOKS.register()
class LoggerHook(Hook):
    """Every ``interval`` applied steps and at each epoch's end: one ``train`` record to every writer
    with the mean of each weighted term and of the total over the steps since the last record
    (the console, ``log.txt``, ``metrics.jsonl`` and tensorboard show the same numbers), lr, gradient
    norm, seconds per step and the ETA of the whole run. On a terminal, a tqdm bar per epoch."""

    priority = 80

    def __init__(self, interval: int = 20) -> None:
        self.interval = interval
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def before_train(self, trainer: "Trainer") -> None:
        self.start_time = time.time()
        self.start_step: int | None = None  # set at this process's first step

    def before_epoch(self, trainer: "Trainer") -> None:
        self.bar = progress(None, trainer.steps_per_epoch, f"epoch {trainer.epoch + 1}/{trainer.max_epochs}",
                            trainer.is_main, leave=True, initial=trainer.inner)

    def after_step(self, trainer: "Trainer") -> None:
        result, done = trainer.result, trainer.epoch * trainer.steps_per_epoch + trainer.inner
        if self.start_step is None:  # first step of this process (also after a resume)
            self.start_step, self.start_time = done - 1, time.time()
        if result.applied:
            assert result.total is not None, "an applied step has a total"
            for key, value in {**result.losses, "total": result.total}.items():
                self.sums[key] = self.sums.get(key, 0) + value.float()
            self.count += 1
        end_of_epoch = trainer.inner == trainer.steps_per_epoch
        if self.count and (trainer.iter % self.interval == 0 or end_of_epoch):
            self._record(trainer, done)
        self.bar.update(1)

    def after_epoch(self, trainer: "Trainer") -> None:
        self.bar.close()

    def after_train(self, trainer: "Trainer") -> None:
        if getattr(self, "bar", None) is not None:
            self.bar.close()

    def _record(self, trainer: "Trainer", done: int) -> None:
        means = {k: float(v) / self.count for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        assert self.start_step is not None, "after_step sets it before the first record"
        per_step = (time.time() - self.start_time) / max(done - self.start_step, 1)
        total = means.pop("total")
        record: dict[str, Any] = {
            "epoch": trainer.epoch + 1, "iter": trainer.iter, "step": trainer.inner, "steps": trainer.steps_per_epoch,
            **means, "total": total, "lr": trainer.optimizer.param_groups[0]["lr"],
            "grad_norm": float("nan") if trainer.result.grad_norm is None else float(trainer.result.grad_norm),
            **trainer.result.extras, "time": per_step,
            "eta": format_eta(per_step * (trainer.total_steps - done)),
        }
        terms = " ".join(f"{k} {v:.3f}" for k, v in means.items())
        self.bar.update(0, f"{terms} total {total:.3f} lr {record['lr']:.1e}")
        trainer.writers.write("train", trainer.iter, record)
