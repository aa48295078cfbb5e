"""The hook interface: what the training loop calls, in order, and what a hook may keep across a resume."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from detkit.engine.trainer import Trainer


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
