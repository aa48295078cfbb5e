"""A frozen teacher detector for distillation (``model.teacher``), held beside the student, never inside it.

The teacher is deliberately not a submodule of the student: ``state_dict`` (so checkpoints), ``parameters``
(so the optimizer, EMA and DDP), ``modules`` (so SyncBatchNorm conversion) and ``train()`` never reach it.
The student's ``Detector._apply`` moves it along (``.to(device)``, ``channels_last``); it runs in eval mode
under ``torch.no_grad()`` on the student's input batch. Loading it from a checkpoint is the engine's job
(:func:`detkit.engine.teacher.with_teacher`): this module only checks and holds it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from detkit.registry import ConfigError, check_keys

#: The keys of ``model.teacher``: a detkit checkpoint, and the teacher's config when it stores none.
TEACHER_KEYS = ("checkpoint", "config")
CHECKPOINT_KEY = "model.teacher.checkpoint"


def teacher_spec(spec: Any) -> dict[str, Any] | None:
    """``model.teacher`` checked: None, or ``{checkpoint: PATH, config: PATH or mapping (optional)}``; the
    checkpoint may still be null here (a config that leaves it to the command line still builds)."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise ConfigError(f"model.teacher must be a mapping {{checkpoint: PATH}}, got {spec!r}")
    check_keys(spec, TEACHER_KEYS, "model.teacher")
    path = spec.get("checkpoint")
    if path is not None and (not isinstance(path, str) or not path):  # None: given on the command line for training
        raise ConfigError(f"{CHECKPOINT_KEY}: the teacher's detkit checkpoint (a path), got {path!r}")
    config = spec.get("config")
    if config is not None and not isinstance(config, (str, Mapping)):
        raise ConfigError(f"model.teacher.config: a config file path or a config mapping with a 'model' section, "
                          f"got {type(config).__name__}")
    return dict(spec)


def check_distill_terms(head: nn.Module, spec: Mapping[str, Any] | None) -> None:
    """A teacher needs a distillation term in the head's losses, and a distillation term needs a teacher."""
    terms = list(getattr(head, "distill_terms", ()))
    if spec is not None and not terms:
        raise ConfigError(f"model.teacher: {type(head).__name__} has no distillation loss term, so the teacher "
                          f"would change nothing; add one to model.head.losses, e.g. ld: {{type: "
                          f"KnowledgeDistillationKLDivLoss, T: 10, loss_weight: 0.25}} (GFLHead), or remove "
                          f"model.teacher")
    if spec is None and terms:
        raise ConfigError(f"model.head.losses.{terms[0]}: a distillation term needs a teacher: set model.teacher: "
                          f"{{checkpoint: PATH}} (a trained detkit checkpoint with the same head type and classes)")


def check_teacher(student: nn.Module, teacher: nn.Module, source: str) -> None:
    """The teacher's head must give what the student's distillation terms compare: same head type,
    class count, bins and strides (backbone, neck and widths may differ). Names ``model.teacher.checkpoint``."""
    s_head, t_head = getattr(student, "head", None), getattr(teacher, "head", None)
    if type(t_head) is not type(s_head):
        raise ConfigError(f"{CHECKPOINT_KEY}: {source} holds a {type(teacher).__name__} with a "
                          f"{type(t_head).__name__}; the student's head is a {type(s_head).__name__}: distillation "
                          f"compares the outputs of the same head type")
    for name in ("num_classes", "reg_max", "strides"):
        mine, theirs = getattr(s_head, name, None), getattr(t_head, name, None)
        if mine != theirs:
            raise ConfigError(f"{CHECKPOINT_KEY}: the teacher in {source} has {name} {theirs}, the student "
                              f"{mine}; they must be equal (set model.head.{name} to {theirs}, or use another teacher)")


class FrozenTeacher:
    """A detector in eval mode with no gradient: ``teacher(images (B, 3, H, W))`` -> its raw head outputs.

    Not an ``nn.Module`` (see the module docstring). A deep copy (EMA's ``AveragedModel`` copies the
    student) shares the teacher: it never changes, so a second copy would only cost memory.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    def __call__(self, images: Tensor) -> Any:
        with torch.no_grad():
            return self.model(images)

    def apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply the student's ``_apply`` function (a device or dtype move) to the teacher's tensors."""
        self.model._apply(fn)

    def __deepcopy__(self, memo: dict) -> "FrozenTeacher":
        return self
