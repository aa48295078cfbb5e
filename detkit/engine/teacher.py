"""``model.teacher``: load the teacher of a distillation run from its detkit checkpoint and attach it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn

from detkit.config import load_config
from detkit.engine.checkpoint import CheckpointError, check_model_weights, evaluation_weights, load_checkpoint
from detkit.models import build_detector
from detkit.models.teacher import CHECKPOINT_KEY, FrozenTeacher, check_teacher
from detkit.registry import ConfigError


def teacher_config(spec: Mapping[str, Any], state: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    """The teacher's config: ``model.teacher.config`` (a file or a mapping), else the one its checkpoint stores."""
    given = spec.get("config")
    cfg = load_config(given) if isinstance(given, str) else given or state.get("config")
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("model"), Mapping):
        raise ConfigError(f"{CHECKPOINT_KEY}: {path} stores no config with a 'model' section; give the teacher's "
                          f"config as model.teacher.config (its YAML file)")
    return cfg


def load_teacher(spec: Mapping[str, Any], student: nn.Module, classes: list[str] | None = None) -> nn.Module:
    """The teacher detector for ``student`` with its evaluation weights (EMA when it has them), loaded
    weights-only as :func:`detkit.load_detector` does, after :func:`check_teacher`; ``classes`` (the training
    set's) must be the ones it was trained on, in the same order."""
    path = spec.get("checkpoint")
    if path is None:
        raise ConfigError(f"{CHECKPOINT_KEY}: give the teacher's detkit checkpoint, e.g. --set "
                          f"model.teacher.checkpoint=work_dirs/teacher/best.pth")
    if not Path(path).is_file():
        raise ConfigError(f"{CHECKPOINT_KEY}: file not found: {path}")
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"{CHECKPOINT_KEY}: {err}") from None
    cfg = teacher_config(spec, state, path)
    try:
        teacher = build_detector(cfg["model"])
    except ConfigError as err:  # the message's "model..." path is the teacher's, not this run's
        raise ConfigError(f"{CHECKPOINT_KEY}: the teacher's config ({spec.get('config') or path}): {err}") from None
    check_teacher(student, teacher, path)
    weights = evaluation_weights(state)
    try:
        check_model_weights(teacher, weights, path)
    except CheckpointError as err:
        raise ConfigError(f"{CHECKPOINT_KEY}: {err}") from None
    teacher.load_state_dict(weights)
    own = list(state.get("classes") or [])
    if classes and own and own != list(classes):
        raise ConfigError(f"{CHECKPOINT_KEY}: the teacher in {path} was trained on the classes {own}, this run's "
                          f"data.train has {list(classes)}: distillation compares class scores position by position, "
                          f"so they must be the same classes in the same order")
    return teacher


def with_teacher(student: nn.Module, classes: list[str] | None = None) -> nn.Module:
    """``student`` with its ``model.teacher`` (``student.teacher_spec``) loaded, checked and attached as a
    :class:`FrozenTeacher`; unchanged without one. Everything is checked before any file is written."""
    spec = getattr(student, "teacher_spec", None)
    if spec is not None:
        # setattr: a FrozenTeacher is deliberately no nn.Module (its weights stay out of the student's)
        setattr(student, "teacher", FrozenTeacher(load_teacher(spec, student, classes)))
    return student
