"""Trainer, checkpoints, COCO evaluation, optimizers and schedules."""

from detkit.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from detkit.engine.trainer import NonFiniteLossError, Trainer, evaluate_checkpoint

__all__ = ["Trainer", "evaluate_checkpoint", "NonFiniteLossError", "CheckpointError", "load_checkpoint",
           "save_checkpoint"]
