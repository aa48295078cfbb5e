"""Gradient norm of each loss term w.r.t. the features all terms share (the neck outputs)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from detkit.engine.hooks.base import Hook
from detkit.registry import HOOKS

if TYPE_CHECKING:
    from detkit.engine.trainer import Trainer


@HOOKS.register()
class TermGradNormHook(Hook):
    """Every ``interval`` steps, ``||d term / d neck outputs||`` per weighted term, logged as
    ``term_grad_norm``: which term drives the shared features. Captures the neck's outputs with a
    forward hook for that one step only; models without a ``neck`` are skipped."""

    priority = 50

    def __init__(self, interval: int = 20) -> None:
        self.interval = interval
        self.features: list[Tensor] | None = None
        self.handle: Any = None

    def before_step(self, trainer: "Trainer") -> None:
        neck = getattr(trainer.model, "neck", None)
        if neck is not None and trainer.is_main and trainer.iter % self.interval == 0:
            self.handle = neck.register_forward_hook(self._capture)

    def _capture(self, module: Any, inputs: Any, output: Any) -> None:
        self.features = [f for f in (output if isinstance(output, (list, tuple)) else [output]) if f.requires_grad]

    def after_forward(self, trainer: "Trainer", losses: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.handle is None:
            return losses
        self.handle.remove()
        self.handle, features, self.features = None, self.features, None
        if not features:
            return losses
        norms = {}
        for name, value in losses.items():
            if value.requires_grad:
                grads = torch.autograd.grad(value, features, retain_graph=True, allow_unused=True)
                norms[name] = math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None))
        trainer.result.extras["term_grad_norm"] = norms
        return losses
