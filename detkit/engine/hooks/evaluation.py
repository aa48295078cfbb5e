"""COCO evaluation every ``interval`` epochs, the best checkpoint by a chosen metric, early stopping."""

from __future__ import annotations

import itertools
import json
import logging
import math
from typing import TYPE_CHECKING, Any

from detkit.engine.checkpoint import inference_state, save_checkpoint
from detkit.engine.evaluator import EvalClasses, EvalSettings, Evaluation, evaluate_model
from detkit.engine.hooks.base import Hook
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


def warn_if_undefined(hook: "EvalHook | EarlyStopHook", value: float | None, key: str) -> None:
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
        self.position, self.current = 0, None

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
    early stop; writes an ``eval`` record and ``results/bbox_epoch_N.json``, and ``best.pth``
    (inference weights only) when ``metric`` improves (a NaN metric never does). The val pictures
    and, with ``settings.diagnostics`` (the config's ``eval`` section, :class:`EvalSettings`),
    ``eval_epoch_N/`` (PR curves, confusion matrix, per-class AP table, lowest-recall images) and
    ``results.png`` (training curves) are drawn after the epoch's checkpoint is saved (at the next
    ``before_epoch`` or ``after_train``): drawing them cannot cost the checkpoint.
    ``trainer.summary`` gets the last metrics and the best value and epoch."""

    priority = 60

    def __init__(self, loader: Any, interval: int = 1, metric: str = "AP", vis_images: int = 4,
                 settings: EvalSettings | None = None, classes: EvalClasses | None = None) -> None:
        self.loader, self.interval, self.metric, self.vis_images = loader, interval, metric, vis_images
        self.best: float | None = None
        self.best_epoch = 0
        self.settings = settings or EvalSettings()
        self.classes = classes  # the model's labels matched to data.val's categories (None: one to one)
        self.warned_nan = False
        self.pending: tuple[int, Evaluation] | None = None  # (epoch, evaluation) whose pictures are not drawn yet

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
                                backend=self.settings.backend, classes=self.classes)
        metrics = ev.metrics
        if self.metric not in metrics:
            raise ConfigError(f"train.best_metric: '{self.metric}' is not an evaluation metric; "
                              f"choose one of {[k for k in metrics if k != 'per_class']}")
        trainer.summary.update(last_eval={"epoch": trainer.epoch, **metrics})
        if trainer.is_main:
            trainer.writers.write("eval", trainer.iter, {"epoch": trainer.epoch, "iter": trainer.iter,
                                                         "num_images": ev.num_images, **metrics})
            results = trainer.work_dir / "results" / f"bbox_epoch_{trainer.epoch}.json"
            results.parent.mkdir(parents=True, exist_ok=True)
            results.write_text(json.dumps(ev.results))
            self.pending = (trainer.epoch, ev)
        warn_if_undefined(self, metrics[self.metric], "train.best_metric")
        if better(metrics[self.metric], self.best, "max"):
            self.best, self.best_epoch = metrics[self.metric], trainer.epoch
            if trainer.is_main:
                save_checkpoint(inference_state(trainer), trainer.work_dir / "best.pth")
        trainer.summary.update(best={"metric": self.metric, "value": self.best, "epoch": self.best_epoch,
                                     "file": trainer.work_dir / "best.pth"})

    def before_epoch(self, trainer: "Trainer") -> None:
        self.draw_pending(trainer)

    def after_train(self, trainer: "Trainer") -> None:
        self.draw_pending(trainer)

    def draw_pending(self, trainer: "Trainer") -> None:
        """The last evaluation's val pictures and diagnostics (its epoch's checkpoints are saved by now)."""
        if self.pending is None:
            return
        (epoch, ev), self.pending = self.pending, None
        self._pictures(trainer, ev.pictures, epoch)
        if self.settings.diagnostics:
            self._diagnostics(trainer, ev, epoch)

    def _pictures(self, trainer: "Trainer", pictures: list, epoch: int) -> None:
        from detkit.visualize import draw_detections

        classes = getattr(trainer.loader.dataset, "classes", None) or []  # the model's labels are data.train's
        for k, (image, det) in enumerate(pictures):
            keep = det["scores"] >= self.settings.score_thr
            drawn = draw_detections(image, det["boxes"][keep], det["labels"][keep], classes, det["scores"][keep])
            trainer.writers.image(f"val/predictions_{k}", drawn, epoch)

    def _diagnostics(self, trainer: "Trainer", ev: Evaluation, epoch: int) -> None:
        """``eval_epoch_N/`` from this evaluation, and ``results.png`` when the run writes ``metrics.jsonl``."""
        from detkit.analysis.report import write_eval_report
        from detkit.analysis.training_curves import write_results_png

        dataset, s = self.loader.dataset, self.settings
        coco, classes = (self.classes.coco, self.classes.classes) if self.classes else (dataset.coco, dataset.classes)
        out = trainer.work_dir / f"eval_epoch_{epoch}"
        write_eval_report(out, ev.coco_eval, coco, ev.results, classes, ev.image_ids, s.iou_thr,
                          s.score_thr, title=f"epoch {epoch}")
        written = [f"{out}/"]
        if (trainer.work_dir / "metrics.jsonl").is_file():
            written.append(str(write_results_png(trainer.work_dir)))
        logger.info("diagnostics of epoch %d: %s", epoch, ", ".join(written))

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
        last = trainer.summary.get("last_eval")
        if not last or last["epoch"] != trainer.epoch:
            return
        if self.metric not in last:
            raise ConfigError(f"train.early_stop.metric: '{self.metric}' is not an evaluation metric; "
                              f"choose one of {[k for k in last if k not in ('epoch', 'per_class')]}")
        warn_if_undefined(self, last[self.metric], "train.early_stop.metric")
        if better(last[self.metric], self.best, self.mode, self.min_delta):
            self.best, self.best_epoch, self.bad = last[self.metric], trainer.epoch, 0
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
