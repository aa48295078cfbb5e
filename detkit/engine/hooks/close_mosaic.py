"""``close_mosaic`` (ultralytics' name): train the last epochs on unmixed images."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from detkit.engine.hooks.base import Hook
from detkit.registry import HOOKS, ConfigError, positive_int

if TYPE_CHECKING:
    from detkit.engine.trainer import Trainer

logger = logging.getLogger("detkit")


def mixing_steps(dataset: Any) -> list:
    """The mixing transforms (Mosaic, MixUp) of ``dataset``'s pipeline; a :class:`ConfigError` when it has none."""
    pipeline = getattr(dataset, "transforms", None)
    mixing = getattr(pipeline, "mixing", None)
    steps = mixing() if mixing is not None else []
    if not steps:
        raise ConfigError("CloseMosaic (close_mosaic): data.train.transforms has no mixing transform (Mosaic, "
                          "MixUp) to turn off; add one or drop close_mosaic")
    return steps


@HOOKS.register()
class CloseMosaic(Hook):
    """Switches the training pipeline's mixing transforms (Mosaic, MixUp) off for the last ``epochs``
    epochs, so the model ends on images like the ones it will see (ultralytics: 10; YOLOX: 15).

    Whether they are on is decided before every epoch from the epoch number alone, so a run
    resumed inside the last ``epochs`` epochs has them off (there is no state to save). Persistent
    DataLoader workers hold a copy of the pipeline: at the switch they are restarted.
    """

    priority = 50

    def __init__(self, epochs: int) -> None:
        self.epochs = positive_int(epochs, "epochs")

    def before_train(self, trainer: "Trainer") -> None:
        mixing_steps(trainer.loader.dataset)  # the runner checks it before writing; this covers direct use

    def before_epoch(self, trainer: "Trainer") -> None:
        on = trainer.epoch < trainer.max_epochs - self.epochs
        steps = mixing_steps(trainer.loader.dataset)
        if all(step.enabled == on for step in steps):
            return
        for step in steps:
            step.enabled = on
        logger.info("close_mosaic: %s %s from epoch %d", "on" if on else "off",
                    ", ".join(type(s).__name__ for s in steps), trainer.epoch + 1)
        stale = getattr(trainer.loader, "_iterator", None)  # persistent workers, started with the old pipeline
        if stale is not None:
            stale._shutdown_workers()
            trainer.loader._iterator = None
