"""Skipped non-finite steps are reported; too many in a row abort the run."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from detkit.engine.hooks.base import Hook
from detkit.registry import HOOKS

if TYPE_CHECKING:
    from detkit.engine.trainer import Trainer

logger = logging.getLogger("detkit")


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses for ``nan_patience`` consecutive steps."""


@HOOKS.register()
class NaNGuardHook(Hook):
    """The loop skips a step whose loss or gradient is not finite (on any rank); this hook logs each
    skip with the culprit terms, writes a ``skipped_step`` record, and raises
    :class:`NonFiniteLossError` after ``patience`` consecutive skips. fp16 GradScaler overflow
    skips are normal and do not count."""

    priority = 10

    def __init__(self, patience: int = 10) -> None:
        self.patience, self.bad = patience, 0

    def after_step(self, trainer: "Trainer") -> None:
        result = trainer.result
        if result.applied or not result.bad_terms:
            self.bad = 0 if result.applied else self.bad
            return
        self.bad += 1
        bad = ", ".join(result.bad_terms)
        logger.warning("epoch %d iteration %d: %s in %s; step skipped (%d in a row, limit %d)", trainer.epoch + 1,
                       trainer.iter, result.skipped, bad, self.bad, self.patience)
        trainer.writers.write("skipped_step", trainer.iter, {"epoch": trainer.epoch + 1, "iter": trainer.iter,
                                                            "non_finite": result.bad_terms})
        if self.bad >= self.patience:
            raise NonFiniteLossError(
                f"{self.bad} consecutive training steps had a {result.skipped} (terms: {bad}) at epoch "
                f"{trainer.epoch + 1}, iteration {trainer.iter}. Lower optimizer.lr, set train.grad_clip, or check "
                f"the data; the last checkpoint in {trainer.work_dir} holds the last finite weights.")

    def state_dict(self) -> dict[str, int]:
        return {"bad": self.bad}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.bad = int(state["bad"])
