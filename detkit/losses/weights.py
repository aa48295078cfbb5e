"""Loss weights that change with the iteration: ``loss_weight: {type: LinearWeight, start, end, iters}``."""

from __future__ import annotations

import math
from typing import Any, Mapping

from detkit.registry import WEIGHT_SCHEDULES, ConfigError


class WeightSchedule:
    """A loss weight as a function of the optimizer step ``iter`` (set by ``LossWeightScheduleHook``
    before every step; 0 outside training). ``float(schedule)`` is the current weight."""

    def __init__(self, start: float, end: float, iters: int, begin: int = 0) -> None:
        if not isinstance(iters, int) or iters < 1 or not isinstance(begin, int) or begin < 0:
            raise ConfigError(f"{type(self).__name__}: iters must be a positive integer and begin >= 0, "
                              f"got iters={iters!r}, begin={begin!r}")
        self.start, self.end, self.iters, self.begin = float(start), float(end), iters, begin
        self.iter = 0

    def progress(self) -> float:
        """0 before ``begin``, 1 from ``begin + iters`` on."""
        return min(max((self.iter - self.begin) / self.iters, 0.0), 1.0)

    def ramp(self, p: float) -> float:
        raise NotImplementedError

    def __float__(self) -> float:
        return self.start + (self.end - self.start) * self.ramp(self.progress())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(start={self.start}, end={self.end}, iters={self.iters}, begin={self.begin}, "
                f"now={float(self):.4g})")


@WEIGHT_SCHEDULES.register()
class LinearWeight(WeightSchedule):
    """``start`` -> ``end`` linearly over ``iters`` steps from step ``begin``, then ``end``."""

    def ramp(self, p: float) -> float:
        return p


@WEIGHT_SCHEDULES.register()
class CosineWeight(WeightSchedule):
    """``start`` -> ``end`` along a half cosine over ``iters`` steps from step ``begin``, then ``end``."""

    def ramp(self, p: float) -> float:
        return 0.5 * (1 - math.cos(math.pi * p))


def build_loss_weight(value: Any) -> float | WeightSchedule:
    """A number stays a float; ``{type: LinearWeight | CosineWeight, ...}`` becomes a schedule."""
    if isinstance(value, Mapping):
        return WEIGHT_SCHEDULES.build(value, "loss_weight")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"loss_weight must be a number or a schedule like {{type: LinearWeight, start: 0, end: 1, "
                          f"iters: 1000}}, got {value!r}")
    return float(value)
