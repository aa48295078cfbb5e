"""Training hooks: the built-in ones, and the list a config asks for (``train.hooks`` for your own)."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from torch import nn

from detkit.distributed import is_distributed
from detkit.engine.evaluator import EvalClasses, EvalSettings, eval_classes
from detkit.engine.hooks.assigner_health import AssignerHealthHook, health_hook
from detkit.engine.hooks.balance import Uncertainty
from detkit.engine.hooks.base import EvalRecord, Hook
from detkit.engine.hooks.checkpoint import CheckpointHook
from detkit.engine.hooks.close_mosaic import CloseMosaic
from detkit.engine.hooks.ema import EMAHook, WarmupEMA
from detkit.engine.hooks.epoch import SetEpochHook
from detkit.engine.hooks.evaluation import BestCheckpointHook, EarlyStopHook, EvalHook
from detkit.engine.hooks.grad_norm import TermGradNormHook
from detkit.engine.hooks.logger import LoggerHook
from detkit.engine.hooks.nan_guard import NaNGuardHook, NonFiniteLossError
from detkit.engine.hooks.schedule import LossWeightScheduleHook, LRScheduleHook, weight_schedules
from detkit.engine.hooks.watchdog import StallWatchdogHook
from detkit.engine.settings import TrainSettings
from detkit.registry import HOOKS, ConfigError

logger = logging.getLogger("detkit")


def picture_hooks(dataset: Any, vis_images: int, settings: EvalSettings, classes: EvalClasses) -> list[Hook]:
    """``DiagnosticsHook`` (``detkit.analysis``, found in ``HOOKS``: the engine never imports the plotting
    layer) when the run draws anything: val pictures (``train.vis_images``) or ``eval.diagnostics``."""
    if not (vis_images or settings.diagnostics):
        return []
    if "DiagnosticsHook" not in HOOKS:
        logger.warning("train.vis_images / eval.diagnostics: no val pictures nor eval_epoch_N/ in this run: they are "
                       "drawn by DiagnosticsHook, which `import detkit.build` registers (the CLI and detkit.api do)")
        return []
    return [HOOKS.get("DiagnosticsHook")(dataset, settings, classes)]


def build_hooks(cfg: dict[str, Any], s: TrainSettings, val_loader: Any, model: nn.Module,
                train_classes: Sequence[str] | None = None) -> list[Hook]:
    """The built-in hooks the settings ask for, then ``train.hooks`` (user specs) and ``train.loss_balance``.

    ``train_classes`` (the model's class names, ``data.train``'s) are matched to ``data.val``'s by name
    here, so a val set that cannot be scored is refused before anything is written."""
    hooks: list[Hook] = [NaNGuardHook(s.nan_patience), LRScheduleHook(cfg.get("scheduler")),
                         TermGradNormHook(s.grad_norm_interval or s.log_interval),
                         CheckpointHook(s.checkpoint_interval, s.checkpoint_interval_iters, s.keep_checkpoints),
                         LoggerHook(s.log_interval)]
    if weight_schedules(model):
        hooks.append(LossWeightScheduleHook())
    if any(callable(getattr(m, "set_epoch", None)) for m in model.modules()):
        hooks.append(SetEpochHook())
    if s.ema_decay is not None:
        hooks.append(EMAHook(*s.ema_decay))
    if s.close_mosaic:
        hooks.append(CloseMosaic(s.close_mosaic))
    if is_distributed():
        hooks.append(StallWatchdogHook(s.ddp_timeout))
    eval_settings = EvalSettings.from_config(cfg)  # checked with or without a val set, before anything is written
    if val_loader is not None:
        classes = eval_classes(val_loader.dataset, train_classes, getattr(model, "num_classes", None), "data.train")
        hooks += [EvalHook(val_loader, s.eval_interval, s.vis_images, eval_settings, classes),
                  BestCheckpointHook(s.best_metric),
                  *picture_hooks(val_loader.dataset, s.vis_images, eval_settings, classes)]
        if eval_settings.diagnostics:
            hooks.append(health_hook(val_loader, classes, getattr(model, "num_classes", None)))
    if s.early_stop is not None:
        if val_loader is None:
            raise ConfigError("train.early_stop needs evaluations: add a data.val dataset")
        hooks.append(EarlyStopHook(**s.early_stop))
    if s.loss_balance is not None:
        hooks.append(HOOKS.build(s.loss_balance, "train.loss_balance"))
    hooks += [HOOKS.build(spec, f"train.hooks.{i}") for i, spec in enumerate(s.hooks)]
    names = [h.name for h in hooks]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"train.hooks: {duplicated} given twice (or already built in); a hook's state is saved "
                          f"under its name, so names must be unique")
    return hooks


__all__ = ["Hook", "HOOKS", "build_hooks", "NaNGuardHook", "NonFiniteLossError", "LRScheduleHook",
           "LossWeightScheduleHook", "EMAHook", "WarmupEMA", "TermGradNormHook", "EvalHook", "EvalRecord",
           "BestCheckpointHook", "EarlyStopHook",
           "CheckpointHook", "LoggerHook", "Uncertainty", "CloseMosaic", "StallWatchdogHook", "AssignerHealthHook",
           "SetEpochHook"]
