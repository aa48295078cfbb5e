"""Mosaic and MixUp: transforms that combine a sample with other images of its dataset.

They sit in a dataset's ``transforms`` list like any other transform. The transforms listed
*before* a mixing transform apply to each image it draws, those after it to its result
(``[RandomHorizontalFlip, Mosaic, MixUp]`` flips each of the four tiles, then blends two mosaics,
as ultralytics does). The other images are picked with torch's global generator, which
:class:`~detkit.data.sampler.SeededDataset` seeds per sample: a sample, its partners and all their
augmentation are a function of (seed, epoch, position), with any worker count and across a resume.
:meth:`~detkit.data.transforms.DetectionPipeline.bind` gives the transforms their dataset
(``build_dataset`` does it); the ``CloseMosaic`` hook switches them off for the last epochs.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from detkit.registry import TRANSFORMS, ConfigError, config_path

Sample = tuple[tv_tensors.Image, dict[str, Any]]
#: MixUp's ``alpha`` range: torch's Beta sampler draws 0.5 instead of values near 0 or 1 below 0.01
#: (measured: mean |r - 0.5| 0.37 at 1e-3, 0.0 at 1e-8, expected 0.5); from 1e6 up r is 0.5 within
#: 1e-3 anyway, and ``inf`` (or past float32's 3.4e38) draws r = 0: the other image only.
ALPHA_RANGE = (0.01, 1e6)


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{config_path(key)} must be a number in [0, 1], got {value!r}")
    return float(value)


def _uint8(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise ConfigError(f"{config_path(key)} must be an integer in [0, 255], got {value!r}")
    return value


def _size(value: Any) -> tuple[int, int]:
    """``size`` as ``(h, w)`` from an int or a pair of ints."""
    pair = [value, value] if isinstance(value, int) else value
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)):
        raise ConfigError(f"{config_path('size')} must be a positive int or [height, width], got {value!r}")
    return int(pair[0]), int(pair[1])


def fit(image: Tensor, boxes: tv_tensors.BoundingBoxes, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``image (3, h, w)`` rescaled to fit inside ``size = (H, W)`` keeping its aspect ratio, and its
    ``boxes`` as plain ``(n, 4)`` x1y1x2y2 float32 in the rescaled image's pixels."""
    h, w = image.shape[-2:]
    boxes = F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY)
    boxes = boxes.as_subclass(Tensor).float()
    scale = min(size[0] / h, size[1] / w)
    new_h, new_w = max(round(h * scale), 1), max(round(w * scale), 1)
    if (new_h, new_w) == (h, w):
        return image.as_subclass(Tensor), boxes
    image = F.resize(image.as_subclass(Tensor), [new_h, new_w], antialias=True)
    return image, boxes * boxes.new_tensor([new_w / w, new_h / h, new_w / w, new_h / h])


def paste(canvas: Tensor, image: Tensor, x0: int, y0: int) -> None:
    """Copy ``image (3, h, w)`` into ``canvas (3, H, W)`` with its top-left corner at ``(x0, y0)`` (may be
    outside the canvas: only the overlap is copied)."""
    h, w = image.shape[-2:]
    xa, ya = max(x0, 0), max(y0, 0)
    xb, yb = min(x0 + w, canvas.shape[-1]), min(y0 + h, canvas.shape[-2])
    if xa < xb and ya < yb:
        canvas[:, ya:yb, xa:xb] = image[:, ya - y0:yb - y0, xa - x0:xb - x0]


class MixSource:
    """Dataset item ``index`` before its transforms (``dataset.load_readable`` where the dataset has it,
    so that ``skip_bad_images`` also skips bad partner images; else ``dataset.load``), run through
    ``before`` (the transforms listed before the mixing one)."""

    def __init__(self, dataset: Any, before: Callable | None) -> None:
        self.dataset, self.before = dataset, before

    def __len__(self) -> int:
        return len(self.dataset)

    def __call__(self, index: int) -> Sample:
        load = getattr(self.dataset, "load_readable", self.dataset.load)
        image, target = load(index)
        return self.before(image, target) if self.before is not None else (image, target)


class MixTransform:
    """Base of the mixing transforms: ``(image, target) -> (image, target)``; with probability ``p`` it
    draws ``num_others`` dataset indices (uniformly, torch's global generator) and calls :meth:`mix`.
    Otherwise, or while ``enabled`` is False (close_mosaic), the sample passes unchanged."""

    num_others = 1

    def __init__(self, p: float) -> None:
        self.p = _fraction(p, "p")
        self.enabled = True
        self.source: MixSource | None = None

    def __call__(self, image: tv_tensors.Image, target: dict[str, Any]) -> Sample:
        if not self.enabled or not float(torch.rand(())) < self.p:
            return image, target
        if self.source is None:
            raise RuntimeError(f"{type(self).__name__} has no dataset to draw images from: build the dataset with "
                               f"detkit.data.build_dataset, or call dataset.transforms.bind(dataset)")
        picks = torch.randint(len(self.source), (self.num_others,)).tolist()
        return self.mix(image, target, [self.source(i) for i in picks])

    def mix(self, image: tv_tensors.Image, target: dict[str, Any], others: Sequence[Sample]) -> Sample:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k not in ("source", "enabled"))
        return f"{type(self).__name__}({args})"


def _result(target: dict[str, Any], image: Tensor, boxes: list[Tensor], labels: list[Tensor]) -> Sample:
    """The mixed sample: ``image (3, H, W)`` with the concatenated boxes and labels; the other keys
    (``image_id``, ``orig_size``) are those of the sample the transform was called on."""
    h, w = image.shape[-2:]
    out = {**target, "boxes": tv_tensors.BoundingBoxes(torch.cat(boxes).reshape(-1, 4), format="XYXY",
                                                       canvas_size=(h, w)),
           "labels": torch.cat(labels)}
    return tv_tensors.Image(image), out


@TRANSFORMS.register()
class Mosaic(MixTransform):
    """Four images in a 2x2 grid (YOLOv4's mosaic, as ultralytics and mmdetection do it).

    The sample (top-left) and three dataset images are each rescaled to fit ``size`` (keeping the
    aspect ratio) and placed around a junction on a ``2 size`` canvas: top-left image's bottom-right
    corner on it, top-right's bottom-left, and so on. The junction is uniform in ``center_range x
    size`` (mmdetection's ``center_ratio_range``, ultralytics' ``(0.5, 1.5)``); the output is the
    canvas's central ``size`` window (ultralytics' crop with no scale or translate jitter: add e.g.
    ``RandomAffine`` after it for those), ``fill`` where no image lies. Boxes move with their image,
    are clipped to the output and kept when at least ``min_visible`` of their area stays inside
    (ultralytics' area threshold 0.1); tiny ones are dropped by the pipeline's ``SanitizeBoundingBoxes``.

    Args:
        size: output side or ``[height, width]``. p: probability (else the sample passes unchanged).
        center_range: junction range, fractions of ``size``, within [0, 2]. fill: uint8 padding value.
        min_visible: fraction of a box's area that must stay in the output.
    """

    num_others = 3

    def __init__(self, size: int | Sequence[int], p: float = 1.0, center_range: Sequence[float] = (0.5, 1.5),
                 fill: int = 114, min_visible: float = 0.1) -> None:
        super().__init__(p)
        self.size = _size(size)
        if (not isinstance(center_range, (list, tuple)) or len(center_range) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in center_range)
                or not 0 <= center_range[0] <= center_range[1] <= 2):
            raise ConfigError(f"{config_path('center_range')} must be [low, high] with 0 <= low <= high <= 2, "
                              f"got {center_range!r}")
        self.center_range = (float(center_range[0]), float(center_range[1]))
        self.fill = _uint8(fill, "fill")
        self.min_visible = _fraction(min_visible, "min_visible")

    def mix(self, image: tv_tensors.Image, target: dict[str, Any], others: Sequence[Sample]) -> Sample:
        height, width = self.size
        low, high = self.center_range
        # junction in output pixels: canvas position minus the central window's offset (size / 2)
        cx = int(float(torch.empty(()).uniform_(low, high)) * width) - width // 2
        cy = int(float(torch.empty(()).uniform_(low, high)) * height) - height // 2
        canvas = torch.full((image.shape[0], height, width), self.fill, dtype=image.dtype)
        boxes, labels = [], []
        for k, (img, tgt) in enumerate([(image, target), *others]):
            img, b = fit(img, tgt["boxes"], self.size)
            h, w = img.shape[-2:]
            x0, y0 = (cx - w if k % 2 == 0 else cx), (cy - h if k < 2 else cy)
            paste(canvas, img, x0, y0)
            b = b + b.new_tensor([x0, y0, x0, y0])
            clipped = torch.stack([b[:, 0].clamp(0, width), b[:, 1].clamp(0, height),
                                   b[:, 2].clamp(0, width), b[:, 3].clamp(0, height)], 1)
            area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            inside = (clipped[:, 2] - clipped[:, 0]).clamp(min=0) * (clipped[:, 3] - clipped[:, 1]).clamp(min=0)
            keep = (inside > 0) & (inside >= self.min_visible * area)
            boxes.append(clipped[keep])
            labels.append(tgt["labels"][keep])
        return _result(target, canvas, boxes, labels)


@TRANSFORMS.register()
class MixUp(MixTransform):
    """Blend with one other dataset image (Zhang et al. 2018; ultralytics' and YOLOX's detection MixUp):
    ``r * this + (1 - r) * other`` with ``r ~ Beta(alpha, alpha)`` (ultralytics: 32, so r is near 0.5),
    keeping the boxes and labels of both. The other image (after the transforms listed before this
    one, so a mosaic when Mosaic comes first) is rescaled to fit this one, at its top-left corner,
    the rest ``fill``; the output keeps this image's size.

    Args:
        p: probability (ultralytics' default mixup is 0.0; YOLOX uses 1.0 after Mosaic).
        alpha: Beta distribution parameter, in [0.01, 1e6] (:data:`ALPHA_RANGE`).
        fill: uint8 value where the other image does not reach.
    """

    def __init__(self, p: float = 1.0, alpha: float = 32.0, fill: int = 114) -> None:
        super().__init__(p)
        low, high = ALPHA_RANGE
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not low <= alpha <= high:
            raise ConfigError(f"{config_path('alpha')} must be a number in [{low:g}, {high:g}] (r ~ Beta(alpha, "
                              f"alpha); ultralytics uses 32), got {alpha!r}")
        self.alpha, self.fill = float(alpha), _uint8(fill, "fill")

    def mix(self, image: tv_tensors.Image, target: dict[str, Any], others: Sequence[Sample]) -> Sample:
        other, other_target = others[0]
        size = tuple(image.shape[-2:])
        other, other_boxes = fit(other, other_target["boxes"], size)
        if other.shape != image.shape:
            canvas = torch.full_like(image.as_subclass(Tensor), self.fill)
            paste(canvas, other, 0, 0)
            other = canvas
        r = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        blended = torch.lerp(other.float(), image.as_subclass(Tensor).float(), r).round_()  # within 0..255
        own = F.convert_bounding_box_format(target["boxes"], new_format=tv_tensors.BoundingBoxFormat.XYXY)
        return _result(target, blended.to(image.dtype), [own.as_subclass(Tensor).float(), other_boxes],
                       [target["labels"], other_target["labels"]])
