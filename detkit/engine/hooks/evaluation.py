"""COCO evaluation every ``interval`` epochs and its record, the best checkpoint by a chosen metric, early stopping."""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detkit.engine.checkpoint import inference_state, save_checkpoint
from detkit.engine.evaluator import EvalClasses, EvalSettings, evaluate_model
from detkit.engine.hooks.base import EvalRecord, Hook
from detkit.engine.memory import batch_image_ids, name_out_of_memory
from detkit.registry import HOOKS, ConfigError

if TYPE_CHECKING:
    from detkit.engine.trainer import Trainer

logger = logging.getLogger("detkit")


def better(value: float | None, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` improves on ``best``; a NaN or None value (a metric without data, e.g. APl
    with no large boxes) is never an improvement."""
    if value is None or math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def warn_if_undefined(hook: "BestCheckpointHook | EarlyStopHook", value: float | None, key: str) -> None:
    """Say once per run (not at every evaluation) that ``hook.metric`` had no value: no improvement."""
    if (value is None or math.isnan(value)) and not hook.warned_nan:
        hook.warned_nan = True
        logger.warning("%s: %s is NaN (the val set has no box it measures, e.g. APl without large boxes, or only "
                       "crowd boxes): counted as no improvement while it stays so; choose another metric",
                       key, hook.metric)


class WatchedLoader:
    """``loader`` for an evaluation inside training: before each batch a Ctrl-C / SIGTERM stops the
    run (``trainer.stop_if_interrupted``), so a signal does not wait for the whole evaluation; and
    :meth:`image_ids` says which images the batch being loaded or predicted holds (out of memory)."""

    def __init__(self, loader: Any, trainer: "Trainer") -> None:
        self.loader, self.trainer, self.dataset = loader, trainer, loader.dataset
        self.position = 0
        self.current: list[Any] | None = None  # image ids of the batch being evaluated; None while loading

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        batches = iter(self.loader)
        for self.position in itertools.count():
            self.current = None  # loading batch `position`
            batch = next(batches, None)
            if batch is None:
                return
            self.current = list(batch["image_ids"])
            self.trainer.stop_if_interrupted()
            yield batch

    def image_ids(self) -> list[int]:
        return self.current if self.current is not None else batch_image_ids(self.loader, self.position)


@HOOKS.register()
class EvalHook(Hook):
    """Evaluates the (EMA) model on ``data.val`` after every ``interval`` epochs, the last one and an
    early stop, and publishes the result: an ``eval`` record to every writer, ``results/bbox_epoch_N.json``
    (rank 0) and :class:`EvalRecord` ``trainer.last_eval``, which the hooks after it read
    (:class:`BestCheckpointHook`, :class:`EarlyStopHook`, the diagnostics of ``detkit.analysis``).
    ``vis_images`` val images keep their detections in the record, for the pictures."""

    priority = 60

    def __init__(self, loader: Any, interval: int = 1, vis_images: int = 4, settings: EvalSettings | None = None,
                 classes: EvalClasses | None = None) -> None:
        self.loader, self.interval, self.vis_images = loader, interval, vis_images
        self.settings = settings or EvalSettings()
        self.classes = classes  # the model's labels matched to data.val's categories (None: one to one)

    def before_train(self, trainer: "Trainer") -> None:
        if self.classes is not None and self.classes.left_out:
            logger.warning("%s", self.classes.left_out)

    def after_epoch(self, trainer: "Trainer") -> None:
        due = trainer.epoch % self.interval == 0 or trainer.epoch == trainer.max_epochs or trainer.stop_reason
        if not due:
            return
        watched = WatchedLoader(self.loader, trainer)
        with name_out_of_memory(self.loader.dataset, "evaluating", watched.image_ids, split="data.val"):
            ev = evaluate_model(trainer.eval_model(), watched, trainer.device, trainer.amp, self.vis_images,
                                backend=self.settings.backend, classes=self.classes,
                                tiles=self.settings.tiles)
        metrics = {k: v for k, v in ev.metrics.items() if k != "per_class"}
        results = None
        if trainer.is_main:
            trainer.writers.write("eval", trainer.iter, {"epoch": trainer.epoch, "iter": trainer.iter,
                                                         "num_images": ev.num_images, **ev.metrics})
            results = trainer.work_dir / "results" / f"bbox_epoch_{trainer.epoch}.json"
            results.parent.mkdir(parents=True, exist_ok=True)
            results.write_text(json.dumps(ev.results))
        trainer.last_eval = EvalRecord(trainer.epoch, trainer.iter, metrics, ev.metrics["per_class"], ev, results)


@HOOKS.register()
class BestCheckpointHook(Hook):
    """``best.pth`` (inference weights only) whenever ``metric`` of an evaluation (``trainer.last_eval``)
    improves on the best so far; a NaN metric never does. Keeps the best value and its epoch."""

    priority = 61  # right after EvalHook: the best weights are saved before anything else can fail
    former_names = ("EvalHook",)  # where the best value was kept before this hook was split off

    def __init__(self, metric: str = "AP") -> None:
        self.metric = metric
        self.best: float | None = None
        self.best_epoch = 0
        self.warned_nan = False

    def after_epoch(self, trainer: "Trainer") -> None:
        record = trainer.last_eval
        if record is None or record.epoch != trainer.epoch:
            return
        if self.metric not in record.metrics:
            raise ConfigError(f"train.best_metric: '{self.metric}' is not an evaluation metric; "
                              f"choose one of {list(record.metrics)}")
        warn_if_undefined(self, record.metrics[self.metric], "train.best_metric")
        if better(record.metrics[self.metric], self.best, "max"):
            self.best, self.best_epoch = record.metrics[self.metric], trainer.epoch
            if trainer.is_main:
                save_checkpoint(inference_state(trainer), self.path(trainer))

    @staticmethod
    def path(trainer: "Trainer") -> Path:
        return trainer.work_dir / "best.pth"

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], int(state["best_epoch"])


@HOOKS.register()
class EarlyStopHook(Hook):
    """Stops training when ``metric`` of the evaluations has not improved by more than ``min_delta``
    for ``patience`` evaluations in a row (``mode: max`` for AP, ``min`` for a loss-like metric).
    The stop is logged with the best epoch; the run still evaluates, saves and writes its final files."""

    priority = 65

    def __init__(self, metric: str = "AP", patience: int = 5, min_delta: float = 0.0, mode: str = "max") -> None:
        self.metric, self.patience, self.min_delta, self.mode = metric, patience, min_delta, mode
        self.best: float | None = None
        self.best_epoch = self.bad = 0
        self.warned_nan = False

    def after_epoch(self, trainer: "Trainer") -> None:
        record = trainer.last_eval
        if record is None or record.epoch != trainer.epoch:
            return
        if self.metric not in record.metrics:
            raise ConfigError(f"train.early_stop.metric: '{self.metric}' is not an evaluation metric; "
                              f"choose one of {list(record.metrics)}")
        value = record.metrics[self.metric]
        warn_if_undefined(self, value, "train.early_stop.metric")
        if better(value, self.best, self.mode, self.min_delta):
            self.best, self.best_epoch, self.bad = value, trainer.epoch, 0
            return
        self.bad += 1
        if self.bad >= self.patience and trainer.epoch < trainer.max_epochs:
            best = ("no evaluation gave it a value" if self.best is None
                    else f"best {self.best:.4f} at epoch {self.best_epoch}")
            trainer.stop_reason = (f"early stop after epoch {trainer.epoch}: {self.metric} has not improved by more "
                                   f"than {self.min_delta} for {self.bad} evaluations ({best})")
            logger.info("%s", trainer.stop_reason)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad = state["best"], int(state["best_epoch"]), int(state["bad"])
