"""Optimizers (no weight decay on norm and bias parameters) and per-iteration LR factors (``LRScheduleHook``)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from detkit.registry import OPTIMIZERS, SCHEDULERS, ConfigError

OPTIMIZERS.register(torch.optim.SGD)
OPTIMIZERS.register(torch.optim.AdamW)
OPTIMIZERS.register(torch.optim.Adam)

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: conv/linear weights with ``weight_decay``; biases, norm and scale parameters without."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            skip = isinstance(module, NORM_TYPES) or name == "bias" or param.ndim <= 1
            (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_optimizer_spec(spec: Any) -> dict[str, Any]:
    """``optimizer`` checked before anything is built: a mapping, ``lr > 0``, ``weight_decay, momentum >= 0``."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"optimizer: expected a spec like {{type: SGD, lr: 0.01}}, got {spec!r}")
    for key, strict in (("lr", True), ("weight_decay", False), ("momentum", False)):
        value = spec.get(key, 1.0 if key == "lr" else 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (strict and value == 0):
            raise ConfigError(f"optimizer.{key} must be a number {'>' if strict else '>='} 0, got {value!r}")
    return dict(spec)


def build_optimizer(spec: Mapping[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    """``optimizer: {type: SGD | AdamW | Adam, lr: ..., weight_decay: ..., ...}`` (see :func:`check_optimizer_spec`);
    torch's own refusals come back naming ``optimizer``."""
    spec = check_optimizer_spec(spec)
    groups = param_groups(model, float(spec.get("weight_decay", 0.0)))
    try:
        return OPTIMIZERS.build(spec, "optimizer", params=groups)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"optimizer: {spec.get('type')} refused these settings: {err}") from None


@SCHEDULERS.register()
class WarmupCosine:
    """Linear warmup from ``warmup_ratio * lr`` over ``warmup_iters``, then cosine to ``min_lr_ratio * lr``."""

    def __init__(self, total_iters: int, iters_per_epoch: int, warmup_iters: int = 500,
                 warmup_ratio: float = 0.001, min_lr_ratio: float = 0.0) -> None:
        self.total, self.warmup = max(int(total_iters), 1), min(int(warmup_iters), max(int(total_iters) - 1, 0))
        self.warmup_ratio, self.min_ratio = float(warmup_ratio), float(min_lr_ratio)

    def __call__(self, it: int) -> float:
        if it < self.warmup:
            return self.warmup_ratio + (1 - self.warmup_ratio) * it / self.warmup
        progress = (it - self.warmup) / max(self.total - self.warmup, 1)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@SCHEDULERS.register()
class WarmupMultiStep:
    """Linear warmup, then the LR times ``gamma`` at each epoch in ``milestones``."""

    def __init__(self, total_iters: int, iters_per_epoch: int, milestones: Sequence[int] = (8, 11),
                 gamma: float = 0.1, warmup_iters: int = 500, warmup_ratio: float = 0.001) -> None:
        self.steps = sorted(int(m) * int(iters_per_epoch) for m in milestones)
        self.gamma, self.warmup, self.warmup_ratio = float(gamma), int(warmup_iters), float(warmup_ratio)

    def __call__(self, it: int) -> float:
        factor = self.gamma ** sum(it >= s for s in self.steps)
        if it < self.warmup:
            factor *= self.warmup_ratio + (1 - self.warmup_ratio) * it / self.warmup
        return factor
