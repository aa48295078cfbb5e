"""The hook interface: what the training loop calls, in order, and what a hook may keep across a resume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from detkit.engine.evaluator import Evaluation

if TYPE_CHECKING:
    from detkit.engine.trainer import Trainer


@dataclass
class EvalRecord:
    """One evaluation during training, published by ``EvalHook`` as ``trainer.last_eval`` for the hooks
    after it (best checkpoint, early stop, diagnostics, assigner health).

    ``metrics``: COCO bbox ``AP`` ... ``APl`` (fractions; NaN where the val set has no box a metric
    measures), on every rank; ``per_class``: AP by class name; ``evaluation``: the whole
    :class:`~detkit.engine.evaluator.Evaluation` (detections, COCOeval, val pictures: rank 0's);
    ``results_json``: ``results/bbox_epoch_N.json`` on rank 0, None on the other ranks."""

    epoch: int
    iter: int
    metrics: dict[str, float]
    per_class: dict[str, float]
    evaluation: Evaluation
    results_json: Path | None = None


class Hook:
    """Base class of every training hook; override only the stages you need.

    The loop calls, for every hook in ``priority`` order (lower first):
    ``before_train`` once (before a resumed state is loaded, so a hook can create what its state
    loads into), then per epoch ``before_epoch``, per optimizer step ``before_step``,
    ``after_forward`` (once per micro-batch, with the weighted loss terms; may return changed
    terms), ``after_step``, then ``after_epoch``, and ``after_train`` once, also after an
    interrupt or an early stop. ``state_dict`` / ``load_state_dict`` travel in every
    checkpoint under ``hooks.<name>``, so a hook resumes exactly.
    """

    priority: int = 50
    #: names this hook's state was saved under before a rename: a resume reads the first one present
    former_names: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def before_train(self, trainer: "Trainer") -> None:
        pass

    def before_epoch(self, trainer: "Trainer") -> None:
        pass

    def before_step(self, trainer: "Trainer") -> None:
        pass

    def after_forward(self, trainer: "Trainer", losses: dict[str, Tensor]) -> dict[str, Tensor]:
        return losses

    def after_step(self, trainer: "Trainer") -> None:
        pass

    def after_epoch(self, trainer: "Trainer") -> None:
        pass

    def after_train(self, trainer: "Trainer") -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
