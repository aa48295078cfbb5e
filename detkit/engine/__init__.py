"""Training loop, hooks, writers, checkpoints, COCO evaluation, optimizers and schedules."""

from detkit.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from detkit.engine.hooks import HOOKS, Hook, NonFiniteLossError
from detkit.engine.interrupt import TrainingInterrupted
from detkit.engine.runner import build_trainer, evaluate_checkpoint, run_training
from detkit.engine.settings import TrainSettings
from detkit.engine.trainer import Trainer

__all__ = ["Trainer", "Hook", "HOOKS", "TrainSettings", "build_trainer", "run_training", "evaluate_checkpoint",
           "NonFiniteLossError", "TrainingInterrupted", "CheckpointError", "load_checkpoint", "save_checkpoint"]
