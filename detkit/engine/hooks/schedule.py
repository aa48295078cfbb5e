"""Per-iteration learning rate from the ``scheduler`` spec, and scheduled loss weights."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from torch import nn

from detkit.engine.hooks.base import Hook
from detkit.losses.weights import WeightSchedule
from detkit.registry import HOOKS, SCHEDULERS

if TYPE_CHECKING:
    from detkit.engine.trainer import Trainer


@HOOKS.register()
class LRScheduleHook(Hook):
    """Sets every param group's ``lr`` to ``base_lr * factor(iter)`` before each step.

    ``base_lr`` is the configured lr of each group (so a resumed run follows *this* config's lr and
    schedule length), and ``factor`` the ``scheduler`` spec (``WarmupCosine``, ``WarmupMultiStep``...)
    built for ``epochs x steps_per_epoch`` optimizer steps. Stateless: it derives everything from ``iter``.
    """

    priority = 20

    def __init__(self, scheduler: Mapping[str, Any] | None = None) -> None:
        self.spec = dict(scheduler or {"type": "WarmupCosine", "warmup_iters": 0})

    def before_train(self, trainer: "Trainer") -> None:
        self.factor = SCHEDULERS.build(self.spec, "scheduler", total_iters=trainer.total_steps,
                                       iters_per_epoch=trainer.steps_per_epoch)
        self.base_lrs = [float(g["lr"]) for g in trainer.optimizer.param_groups]

    def before_step(self, trainer: "Trainer") -> None:
        factor = self.factor(trainer.iter)
        for group, base in zip(trainer.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor


def weight_schedules(model: nn.Module) -> list[WeightSchedule]:
    """``model.weight_schedules()`` (:class:`~detkit.models.detector.Detector` has it); a model without that
    method (torchvision's FCOS) has no detkit loss, so no schedule."""
    own = getattr(model, "weight_schedules", None)
    return own() if own is not None else []


@HOOKS.register()
class LossWeightScheduleHook(Hook):
    """Moves every scheduled ``loss_weight`` (``{type: LinearWeight, ...}``) of the model to the step's iteration."""

    priority = 25

    def __init__(self) -> None:
        self.schedules: list[WeightSchedule] = []

    def before_train(self, trainer: "Trainer") -> None:
        self.schedules = weight_schedules(trainer.model)

    def before_step(self, trainer: "Trainer") -> None:
        for schedule in self.schedules:
            schedule.iter = trainer.iter
