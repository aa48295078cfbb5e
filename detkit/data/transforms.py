"""Detection transforms from ``torchvision.transforms.v2``, registered for YAML.

A pipeline is a list of specs (``[{type: RandomHorizontalFlip, p: 0.5}, {type: Resize, size: 512}]``).
Boxes are ``tv_tensors.BoundingBoxes`` and move with the image; every pipeline ends with
``ClampBoundingBoxes`` + ``SanitizeBoundingBoxes`` so boxes that leave the image are clipped and
those left degenerate (under ``min_size`` pixels) are dropped with their labels.
Images stay ``uint8`` in 0..255; the detector normalises on its device.
``Mosaic`` and ``MixUp`` (:mod:`detkit.data.mix`) draw other images of the dataset: the pipeline
must be bound to it (:meth:`DetectionPipeline.bind`, done by ``build_dataset``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torchvision.transforms import v2

from detkit.data.mix import MixSource, MixTransform
from detkit.registry import TRANSFORMS, ConfigError, config_path

for _cls in (v2.Resize, v2.RandomResize, v2.RandomShortestSize, v2.ScaleJitter, v2.RandomHorizontalFlip,
             v2.RandomVerticalFlip, v2.RandomPhotometricDistort, v2.ColorJitter, v2.RandomIoUCrop,
             v2.RandomZoomOut, v2.RandomGrayscale, v2.RandomAffine, v2.ClampBoundingBoxes,
             v2.SanitizeBoundingBoxes):
    TRANSFORMS.register(_cls)


class DetectionPipeline:
    """``(image, target) -> (image, target)``: the listed transforms, then clamp + sanitize."""

    def __init__(self, transforms: Sequence[Callable], min_size: float = 1.0) -> None:
        self.transforms = v2.Compose([*transforms, v2.ClampBoundingBoxes(),
                                      v2.SanitizeBoundingBoxes(min_size=min_size)])

    def __call__(self, image: Any, target: dict) -> tuple[Any, dict]:
        return self.transforms(image, target)

    def mixing(self) -> list[MixTransform]:
        """The mixing transforms (Mosaic, MixUp) of the pipeline, in order."""
        return [t for t in self.transforms.transforms if isinstance(t, MixTransform)]

    def bind(self, dataset: Any) -> None:
        """Let each mixing transform draw from ``dataset``: item ``i`` is ``dataset.load(i)`` (before
        transforms) run through the transforms listed before the mixing one."""
        steps = self.transforms.transforms
        for k, step in enumerate(steps):
            if isinstance(step, MixTransform):
                if not callable(getattr(dataset, "load", None)):
                    raise ConfigError(f"{config_path(f'transforms.{k}')}: {type(step).__name__} needs the dataset's "
                                      f"load(index) (an item before transforms); {type(dataset).__name__} has none")
                step.source = MixSource(dataset, v2.Compose(steps[:k]) if k else None)

    def __repr__(self) -> str:
        return f"DetectionPipeline({self.transforms})"


def refuse_mixing(pipeline: Callable | None, key: str) -> None:
    """A :class:`ConfigError` naming ``<key>.transforms.N`` when an evaluation or inference pipeline holds
    Mosaic or MixUp: they would score mosaics against one image's boxes, and inference has no dataset
    to draw the other images from."""
    steps = pipeline.transforms.transforms if isinstance(pipeline, DetectionPipeline) else []
    for k, step in enumerate(steps):
        if isinstance(step, MixTransform):
            raise ConfigError(f"{key}.transforms.{k}: {type(step).__name__} mixes training images; evaluation and "
                              f"inference see one image at a time: remove it from {key}.transforms (keep it in "
                              f"data.train.transforms)")


def build_transforms(specs: Sequence[dict] | Callable | None) -> Callable:
    """A :class:`DetectionPipeline` from a list of transform specs (or a ready callable)."""
    if callable(specs):
        return specs
    if specs is None:
        specs = []
    if not isinstance(specs, (list, tuple)):
        raise ConfigError(f"transforms must be a list of transform specs, got {type(specs).__name__}")
    return DetectionPipeline([TRANSFORMS.build(spec, f"transforms.{i}") for i, spec in enumerate(specs)])
