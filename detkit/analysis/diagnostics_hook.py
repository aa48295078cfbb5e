"""The pictures of each evaluation during training: the val images with their detections (to the
writers: tensorboard), and with ``eval.diagnostics`` ``eval_epoch_N/`` and ``results.png``.

Registered in ``HOOKS`` by importing this module (``detkit.build`` does; the CLI and ``detkit.api``
import that); the engine's ``build_hooks`` builds it from the registry, by name, and never imports
``detkit.analysis`` itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from detkit.analysis.tide import tide_errors
from detkit.engine.evaluator import EvalClasses, EvalSettings
from detkit.engine.hooks.base import EvalRecord, Hook
from detkit.registry import HOOKS
from detkit.visualize import draw_detections

if TYPE_CHECKING:
    from detkit.engine.trainer import Trainer

logger = logging.getLogger("detkit")


@HOOKS.register()
class DiagnosticsHook(Hook):
    """Draws the last evaluation (``trainer.last_eval``) after the epoch's checkpoint is saved (at the
    next ``before_epoch`` or ``after_train``, rank 0), so drawing cannot cost the checkpoint: the val
    pictures to every writer (``val/predictions_K``), and with ``settings.diagnostics`` ``eval_epoch_N/``
    (PR curves, confusion matrix, per-class AP table, lowest-recall images) and ``results.png``
    (training curves, when the run writes ``metrics.jsonl``).

    ``dataset``: ``data.val``; ``classes``: the model's labels matched to its categories (None: one to one).
    """

    priority = 62  # after EvalHook (60) and BestCheckpointHook (61) in after_epoch

    def __init__(self, dataset: Any, settings: EvalSettings | None = None, classes: EvalClasses | None = None) -> None:
        self.dataset, self.classes = dataset, classes
        self.settings = settings or EvalSettings()
        self.pending: EvalRecord | None = None  # the evaluation whose pictures are not drawn yet

    def after_epoch(self, trainer: "Trainer") -> None:
        record = trainer.last_eval
        if trainer.is_main and record is not None and record.epoch == trainer.epoch:
            self.pending = record

    def before_epoch(self, trainer: "Trainer") -> None:
        self.draw_pending(trainer)

    def after_train(self, trainer: "Trainer") -> None:
        self.draw_pending(trainer)

    def draw_pending(self, trainer: "Trainer") -> None:
        """The pending evaluation's pictures and diagnostics (its epoch's checkpoints are saved by now)."""
        if self.pending is None:
            return
        record, self.pending = self.pending, None
        self.pictures(trainer, record)
        if self.settings.diagnostics:
            self.diagnostics(trainer, record)

    def pictures(self, trainer: "Trainer", record: EvalRecord) -> None:
        classes = getattr(trainer.loader.dataset, "classes", None) or []  # the model's labels are data.train's
        for k, (image, det) in enumerate(record.evaluation.pictures):
            keep = det["scores"] >= self.settings.score_thr
            drawn = draw_detections(image, det["boxes"][keep], det["labels"][keep], classes, det["scores"][keep])
            trainer.writers.image(f"val/predictions_{k}", drawn, record.epoch)

    def diagnostics(self, trainer: "Trainer", record: EvalRecord) -> None:
        """``eval_epoch_N/`` from the evaluation, and ``results.png`` when the run writes ``metrics.jsonl``."""
        # lazy: matplotlib stays out of start-up (detkit.build imports this module)
        from detkit.analysis.report import write_eval_report
        from detkit.analysis.tide_plot import write_tide
        from detkit.analysis.training_curves import write_results_png

        ev, s, epoch = record.evaluation, self.settings, record.epoch
        coco, classes = ((self.classes.coco, self.classes.classes) if self.classes
                         else (self.dataset.coco, self.dataset.classes))
        out = trainer.work_dir / f"eval_epoch_{epoch}"
        write_eval_report(out, ev.coco_eval, coco, ev.results, classes, ev.image_ids, s.iou_thr, s.score_thr,
                          title=f"epoch {epoch}")
        write_tide(tide_errors(coco, ev.results, ev.image_ids), out)  # where the AP goes: tide.md/json/png
        written = [f"{out}/"]
        if (trainer.work_dir / "metrics.jsonl").is_file():
            written.append(str(write_results_png(trainer.work_dir)))
        logger.info("diagnostics of epoch %d: %s", epoch, ", ".join(written))
