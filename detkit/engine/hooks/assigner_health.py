"""Assigner health of a detector's own assigner on a loader's targets, and the hook that writes it at
every evaluation (``eval_epoch_N/assigner_health.json`` and one log line)."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Mapping, Sequence, cast

import torch
from torch import nn
from torch.func import functional_call

from detkit.assigners.base import DenseAssigner
from detkit.assigners.centernet import CenterNetAssigner
from detkit.assigners.health import HealthAccumulator, HealthStats, assigner_health, centernet_health
from detkit.distributed import all_gather_objects, get_rank
from detkit.engine.evaluator import EvalClasses
from detkit.engine.hooks.base import Hook
from detkit.engine.run_log import progress
from detkit.models.dense_head import DenseHead
from detkit.models.detector import pad_targets
from detkit.registry import HOOKS, ConfigError

if TYPE_CHECKING:
    from detkit.engine.trainer import Trainer

logger = logging.getLogger("detkit")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the health of ``model`` cannot be measured (None when it can): it needs a dense head with a
    :class:`DenseAssigner` (FCOS, ATSS, GFL) or a CenterNet assigner."""
    head = getattr(model, "head", None)
    assigner = getattr(head, "assigner", None)
    if isinstance(head, DenseHead) and isinstance(assigner, DenseAssigner) or isinstance(assigner, CenterNetAssigner):
        return None
    return f"{type(model).__name__} has no detkit head assigner (dense or CenterNet)"


class HealthProbe:
    """The health of ``model``'s own assigner on padded batches, on the model's device.

    The feature-map sizes (hence the priors) come from a forward of the model on the meta device:
    shapes only, no arithmetic, the model's weights and BatchNorm statistics untouched; cached by the
    padded input size. Targets are padded by :func:`pad_targets`, as for the loss.
    """

    def __init__(self, model: nn.Module) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        self.model, self.head = model, cast(Any, model.head)
        self.dense = isinstance(self.head, DenseHead)
        self.strides = list(self.head.strides) if self.dense else [self.head.assigner.stride]
        self._sizes: dict[tuple[int, int], list[tuple[int, int]]] = {}

    @property
    def name(self) -> str:
        return type(self.head.assigner).__name__

    def map_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """``(H_l, W_l)`` of the head's output maps for a padded ``(height, width)`` input."""
        if (height, width) not in self._sizes:
            state = {name: torch.empty_like(t, device="meta")
                     for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]}
            image = torch.empty(1, 3, height, width, dtype=torch.uint8, device="meta")
            training = self.model.training
            self.model.eval()  # SyncBatchNorm in train mode refuses a tensor that is not on a GPU
            try:
                outputs = functional_call(self.model, state, (image,))
            finally:
                self.model.train(training)
            maps = outputs.cls if self.dense else [outputs.heatmap]
            self._sizes[(height, width)] = [tuple(m.shape[-2:]) for m in maps]
        return self._sizes[(height, width)]

    @torch.no_grad()
    def __call__(self, image_size: Sequence[int], targets: Sequence[Mapping[str, torch.Tensor]]) -> HealthStats:
        """Health of one batch: padded input ``image_size`` ``(H, W)`` and per-image targets."""
        device = cast(torch.Tensor, self.model.pixel_mean).device
        sizes = self.map_sizes(int(image_size[0]), int(image_size[1]))
        boxes, labels, mask = pad_targets(targets, device, self.head.num_classes)
        if not self.dense:
            return centernet_health(self.head.assigner, boxes, labels, mask, self.head.num_classes, sizes[0])
        priors = self.head.priors([torch.empty(1, 1, h, w, device=device) for h, w in sizes])
        return assigner_health(self.head.assigner, priors, boxes, labels, mask, self.head.num_classes)


def to_model_labels(targets: Sequence[Mapping[str, torch.Tensor]], label_map: Mapping[int, int]
                    ) -> list[dict[str, torch.Tensor]]:
    """``targets`` with dataset labels turned into model labels by ``label_map``; boxes of a class the
    model does not have are left out (they are not scored either)."""
    out = []
    for t in targets:
        labels = [int(label) for label in t["labels"]]
        keep = torch.tensor([label in label_map for label in labels], dtype=torch.bool)
        out.append({"boxes": t["boxes"][keep],
                    "labels": torch.tensor([label_map[label] for label in labels if label in label_map],
                                           dtype=torch.int64)})
    return out


def loader_health(probe: HealthProbe, loader: Any, classes: Sequence[str], limit: int | None = None,
                  desc: str = "assigner health", label_map: Mapping[int, int] | None = None
                  ) -> HealthAccumulator | str:
    """The health over the batches of ``loader`` (collated as :func:`collate_detection` does), or its
    first ``limit`` images; or why it cannot be measured: an assigner that assigns from the model's
    predictions refuses a call without them (:class:`ConfigError`), and the health passes none.
    ``label_map`` (dataset label -> model label; None: the same) and ``classes`` (names by model label)
    serve a val set whose classes are not the model's."""
    acc = HealthAccumulator(classes, probe.strides, probe.name)
    seen = 0
    for batch in progress(loader, len(loader), desc, get_rank() == 0):
        targets, ids = batch["targets"], batch["image_ids"]
        if label_map is not None:
            targets = to_model_labels(targets, label_map)
        if limit is not None:
            targets, ids = targets[:limit - seen], ids[:limit - seen]
        try:
            stats = probe(batch["images"].shape[-2:], targets)
        except ConfigError as err:
            return f"{probe.name} needs the model's predictions: {err}"
        acc.add(stats, ids)
        seen += len(ids)
        if limit is not None and seen >= limit:
            break
    return acc


@HOOKS.register()
class AssignerHealthHook(Hook):
    """After every evaluation, the health of the model's assigner on the val loader's targets (no
    gradient, no prediction): ``eval_epoch_N/assigner_health.json`` and one log line. Built in with
    ``eval.diagnostics`` (the default); a model without a detkit assigner says so once and is skipped."""

    # after EvalHook (60), which records this epoch's evaluation in trainer.last_eval, and after the
    # epoch's checkpoint (70): measuring the health cannot cost it
    priority = 75

    def __init__(self, loader: Any, classes: Sequence[str] | None = None,
                 label_map: Mapping[int, int] | None = None) -> None:
        """``classes`` (names by model label) and ``label_map`` (val label -> model label): for a val set
        whose classes are not the model's (:func:`~detkit.engine.evaluator.eval_classes`)."""
        self.loader, self.label_map = loader, label_map
        self.classes = list(classes) if classes is not None else list(loader.dataset.classes)
        self.probe: HealthProbe | None = None

    def before_train(self, trainer: "Trainer") -> None:
        reason = unsupported_reason(trainer.model)
        if reason is None:
            self.probe = HealthProbe(trainer.model)
        else:
            logger.info("assigner health: not measured (%s)", reason)

    def after_epoch(self, trainer: "Trainer") -> None:
        record = trainer.last_eval
        if self.probe is None or record is None or record.epoch != trainer.epoch:
            return
        acc = loader_health(self.probe, self.loader, self.classes, label_map=self.label_map)
        if isinstance(acc, str):  # every rank alike: the assigner's kind decides
            logger.info("assigner health: not measured from now on (%s)", acc)
            self.probe = None
            return
        parts = all_gather_objects(acc)  # the val loader is sharded under DDP
        if not trainer.is_main:
            return
        acc.merge(parts[1:])
        out = trainer.work_dir / f"eval_epoch_{trainer.epoch}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "assigner_health.json").write_text(json.dumps(acc.summary(), indent=1) + "\n")
        logger.info("%s", acc.log_line())


def health_hook(loader: Any, matched: EvalClasses, num_classes: int | None) -> AssignerHealthHook:
    """The hook for the val set of ``loader``, in the model's label space: ``matched`` (the model's
    labels -> the val set's category ids) gives the val label -> model label map, None when the
    val set's classes are the model's, one to one."""
    dataset = loader.dataset
    label_of_cat = {cat: label for label, cat in enumerate(dataset.cat_ids)}
    label_map = {label_of_cat[cat]: model_label for model_label, cat in matched.cat_of.items()}
    count = num_classes if num_classes is not None else max(matched.cat_of, default=-1) + 1
    if label_map == {label: label for label in range(len(dataset.cat_ids))} and count == len(dataset.cat_ids):
        return AssignerHealthHook(loader)
    names = {model_label: dataset.classes[label] for label, model_label in label_map.items()}
    return AssignerHealthHook(loader, [names.get(m, f"class {m}") for m in range(count)], label_map)
