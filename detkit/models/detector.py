"""What every detector shares: input normalisation, GT padding, backbone + neck + head wiring."""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import torch
from torch import Tensor, nn

from detkit.losses.reduce import WeightedLoss
from detkit.losses.weights import WeightSchedule
from detkit.models.teacher import FrozenTeacher, check_distill_terms, teacher_spec
from detkit.registry import BACKBONES, HEADS, NECKS, ConfigError, config_path

# torchvision's ImageNet statistics, in 0..255 pixel units.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def pad_targets(targets: Sequence[Mapping[str, Tensor]], device: torch.device,
                num_classes: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image GT lists -> ``boxes (B, G, 4)``, ``labels (B, G)`` int64, ``mask (B, G)`` bool.

    ``G`` is the largest box count of the batch (at least 1); padding rows have ``mask`` False.
    One host-to-device copy per tensor instead of one per image. Labels are checked against
    ``num_classes`` here, on the CPU, so that the losses need no host-syncing check on device.
    """
    counts = [len(t["labels"]) for t in targets]
    g = max(max(counts, default=0), 1)
    boxes = torch.zeros(len(targets), g, 4)
    labels = torch.zeros(len(targets), g, dtype=torch.int64)
    mask = torch.zeros(len(targets), g, dtype=torch.bool)
    for i, (t, n) in enumerate(zip(targets, counts)):
        boxes[i, :n] = t["boxes"].detach().float().cpu()
        labels[i, :n] = t["labels"].cpu()
        mask[i, :n] = True
    if num_classes is not None and mask.any():
        bad = labels[mask]
        if bad.min() < 0 or bad.max() >= num_classes:
            raise ValueError(f"target labels must lie in 0..{num_classes - 1} (the head's num_classes is "
                             f"{num_classes}), got labels {sorted(set(bad.tolist()))}: does the dataset have "
                             f"more classes than model.head.num_classes?")
    return (boxes.to(device, non_blocking=True), labels.to(device, non_blocking=True),
            mask.to(device, non_blocking=True))


class Strided(Protocol):
    """A backbone or neck: the strides of its output maps, finest first."""

    strides: Sequence[int]


def check_head_levels(backbone: Strided, neck: Strided, head: nn.Module) -> None:
    """The head's ``strides`` (one per level) or ``stride`` (a one-map head, which reads the neck's last level)
    against ``neck.strides``, the strides of the neck's outputs: another count fails the first forward on a
    shape, other strides train without an error on misplaced points. One :class:`ConfigError` saying what to set."""
    if not isinstance(getattr(neck, "strides", None), Sequence):
        raise ConfigError(f"{config_path('neck')} ({type(neck).__name__}) does not report the strides of its outputs: "
                          f"a neck sets self.strides, finest first, from the in_strides it is built with "
                          f"(docs/architecture.md section 4)")
    levels: list[int] = list(neck.strides)
    count = f"{len(levels)} level{'s' if len(levels) != 1 else ''}"
    where = (f"{config_path('neck')}'s {count}, strides {levels} ({type(neck).__name__} on "
             f"{config_path('backbone')}'s maps of strides {list(backbone.strides)})")
    strides, stride = getattr(head, "strides", None), getattr(head, "stride", None)
    if strides is not None:
        key = config_path("head.strides")
        if len(strides) != len(levels):
            raise ConfigError(f"{key} has {len(strides)} strides {list(strides)} for {where}; set {key}: {levels}")
        if list(strides) != levels:
            raise ConfigError(f"{key} {list(strides)} are not the strides of {where}; set {key}: {levels}")
    elif stride is not None and stride != levels[-1]:
        key = config_path("head.stride")
        raise ConfigError(f"{key} {stride} is not the stride of the map the head reads, the last of {where}; "
                          f"set {key}: {levels[-1]}")


class Detector(nn.Module):
    """Backbone -> neck -> head, with images normalised on the model's device.

    Images are ``(B, 3, H, W)`` in 0..255 pixel units (``uint8`` as the loaders give, or float).
    The head owns its assigner and loss terms (``head.loss``) and its decoding (``head.predict``);
    ``loss(images, targets)`` -> ``{term: weighted loss}``, ``predict(images, image_sizes)`` -> per
    image ``{"boxes" (n, 4) x1y1x2y2 input pixels, "scores" (n,), "labels" (n,)}``.

    ``teacher``: ``model.teacher`` of a distillation run (``{checkpoint: PATH}``), checked here; the engine
    loads it into :attr:`teacher` (:func:`detkit.engine.teacher.with_teacher`), which ``loss`` then runs.
    """

    #: the frozen teacher whose outputs the head's distillation terms take (not a submodule: never saved)
    teacher: FrozenTeacher | None = None
    pixel_mean: Tensor  # (1, 3, 1, 1) buffers
    pixel_std: Tensor

    def __init__(self, backbone: dict, neck: dict, head: dict, pixel_mean: Sequence[float] = PIXEL_MEAN,
                 pixel_std: Sequence[float] = PIXEL_STD, teacher: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = BACKBONES.build(backbone, "backbone")
        self.neck = NECKS.build(neck, "neck", in_channels=self.backbone.out_channels,
                                in_strides=self.backbone.strides)
        self.head = HEADS.build(head, "head", in_channels=self.neck.out_channels)
        check_head_levels(self.backbone, self.neck, self.head)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)
        self.teacher_spec = teacher_spec(teacher)
        check_distill_terms(self.head, self.teacher_spec)
        self._weight_schedules: list[WeightSchedule] | None = None

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def weight_schedules(self) -> list[WeightSchedule]:
        """The scheduled ``loss_weight`` of each of this detector's losses (``LossWeightScheduleHook`` moves
        them to the step); found once: the losses are built with the model."""
        if self._weight_schedules is None:
            self._weight_schedules = [m.weight_schedule for m in self.modules()
                                      if isinstance(m, WeightedLoss) and m.weight_schedule is not None]
        return self._weight_schedules

    def loss_names(self) -> list[str]:
        """The names of the loss terms ``loss()`` returns (one per loss spec of the head)."""
        return [name for names in self.head.losses.names.values() for name in names]

    def normalize(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` 0..255 -> float normalised, on the model's device."""
        images = images.to(self.pixel_mean.device, non_blocking=True)
        return (images.float() - self.pixel_mean) / self.pixel_std

    def features(self, images: Tensor) -> list[Tensor]:
        return self.neck(self.backbone(self.normalize(images)))

    def forward(self, images: Tensor, targets: Sequence[Mapping[str, Tensor]] | None = None) -> Any:
        """Raw head outputs, or with ``targets`` the weighted loss terms (the DDP entry point)."""
        outputs = self.head(self.features(images))
        if targets is None:
            return outputs
        boxes, labels, mask = pad_targets(targets, self.pixel_mean.device, self.head.num_classes)
        if self.teacher is None:
            return self.head.loss(outputs, boxes, labels, mask)
        return self.head.loss(outputs, boxes, labels, mask, teacher=self.teacher(images))

    def _apply(self, fn: Any, recurse: bool = True) -> "Detector":
        # .to(device), .double(), channels_last: the teacher is no submodule, so it is moved here
        if self.teacher is not None:
            self.teacher.apply(fn)
        return super()._apply(fn, recurse)

    @staticmethod
    def full_sizes(images: Tensor, image_sizes: Tensor | Sequence | None) -> Tensor:
        """``(B, 2)`` (h, w) valid sizes; the padded size when none are given."""
        if image_sizes is None:
            return torch.tensor([images.shape[-2:]] * images.shape[0])
        return torch.as_tensor(image_sizes).reshape(-1, 2)

    def loss(self, images: Tensor, targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Weighted loss terms for ``targets`` = per image ``{"boxes" (n, 4), "labels" (n,)}``."""
        return self(images, targets)

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: Tensor | Sequence | None = None) -> list[dict[str, Tensor]]:
        """Detections per image, boxes clipped to ``image_sizes (B, 2)`` (h, w) (default: padded size)."""
        return self.head.predict(self(images), self.full_sizes(images, image_sizes))
