"""Exponential moving average of the weights (evaluated and saved as the inference weights)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel

from detkit.engine.hooks.base import Hook
from detkit.registry import HOOKS

if TYPE_CHECKING:
    from detkit.engine.trainer import Trainer


class WarmupEMA:
    """``AveragedModel`` update with decay ``d (1 - exp(-iter / warmup))`` (YOLOX / mmdetection).

    A plain decay of 0.9998 keeps ~0.9998^iter of the random initial weights, so on a short
    schedule the averaged model evaluates near 0 AP; the warm-up ramps the decay up instead.
    """

    def __init__(self, decay: float, warmup_iters: int) -> None:
        self.decay, self.warmup, self.iter = decay, warmup_iters, 0

    @torch.no_grad()
    def __call__(self, averaged: list[Tensor] | tuple[Tensor, ...], current: list[Tensor] | tuple[Tensor, ...],
                 num_averaged: Tensor | int) -> None:
        decay = self.decay * (1 - math.exp(-self.iter / self.warmup))
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1 - decay)
        else:  # integer buffers (BatchNorm's step counter) follow the model
            for a, c in zip(averaged, current):
                a.copy_(c)


@HOOKS.register()
class EMAHook(Hook):
    """Keeps ``trainer.ema_model`` (an EMA of the weights and buffers), updated after every applied
    optimizer step (not after a skipped one); its state resumes exactly."""

    priority = 40

    def __init__(self, decay: float = 0.9998, warmup_iters: int = 2000) -> None:
        self.update = WarmupEMA(decay, warmup_iters)
        self.averaged: AveragedModel | None = None

    def before_train(self, trainer: "Trainer") -> None:
        self.averaged = AveragedModel(trainer.model, multi_avg_fn=self.update, use_buffers=True)
        trainer.ema_model = self.averaged.module

    def after_step(self, trainer: "Trainer") -> None:
        if trainer.result.applied:
            self.update.iter = trainer.iter
            assert self.averaged is not None, "before_train builds it"
            self.averaged.update_parameters(trainer.model)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.averaged.state_dict()} if self.averaged is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.averaged is not None, "the trainer resumes hooks after before_train"
        self.averaged.load_state_dict(state["ema"])
