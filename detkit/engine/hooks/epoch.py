"""Tells the model which epoch it trains: for assigners that change with it (TaskAlignedAssigner's initial epochs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from detkit.engine.hooks.base import Hook
from detkit.registry import HOOKS

if TYPE_CHECKING:
    from detkit.engine.trainer import Trainer


@HOOKS.register()
class SetEpochHook(Hook):
    """Before every epoch, calls ``set_epoch(finished epochs)`` on each module of the model that has it
    (the dense heads, which pass it to their assigner). Stateless: a resumed run gets its epoch anew."""

    priority = 10

    def before_epoch(self, trainer: "Trainer") -> None:
        for module in trainer.model.modules():
            set_epoch = getattr(module, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(trainer.epoch)
