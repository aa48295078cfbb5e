"""The Python API: ``detkit.load_detector(ckpt).predict(images)`` -> torchvision-format detections."""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torchvision import tv_tensors

import detkit.build  # noqa: F401  (fills every registry: a checkpoint's model, transforms and hooks are built by name)
from detkit.data.coco import decode_rgb
from detkit.data.collate import collate_detection
from detkit.data.transforms import build_transforms, refuse_mixing
from detkit.engine.checkpoint import (
    evaluation_weights,
    load_checkpoint,
    load_model_weights,
)
from detkit.engine.evaluator import to_original_coords
from detkit.models import build_detector
from detkit.models.fuse import fold_batchnorm
from detkit.ops.tiles import TileSettings, sliced_predict
from detkit.registry import ConfigError, UnknownTypeError

ImageInput = Any  # str | Path | PIL.Image.Image | np.ndarray (H, W[, 3]) uint8 | Tensor (3, H, W)


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but torch.cuda.is_available() is False")
    return dev


def with_pixels(image: Tensor) -> Tensor:
    """``image (3, H, W)`` itself, or a ValueError when H or W is 0 (no network input is that small)."""
    if not image.shape[-2] or not image.shape[-1]:
        raise ValueError(f"an image of {image.shape[-2]}x{image.shape[-1]} pixels has nothing to detect; images need "
                         f"a height and width of at least 1")
    return image


def to_uint8_chw(image: ImageInput) -> Tensor:
    """One image as ``uint8 (3, H, W)`` RGB: a file path, a PIL image, an ``(H, W[, C])`` uint8 array,
    or a ``(3, H, W)`` tensor (uint8 0..255, or float 0..1 as torchvision uses)."""
    if isinstance(image, (str, os.PathLike)):
        if Path(image).is_dir():
            raise IsADirectoryError(f"{image} is a folder; predict takes image files (or arrays, tensors, PIL "
                                    f"images): pass its files, e.g. sorted(Path({str(image)!r}).glob('*.jpg'))")
        return decode_rgb(Path(image))
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        if image.mode.startswith("I"):  # 16/32-bit integer: scale 16 bits to 8, as for files
            image = (np.clip(np.asarray(image), 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        else:
            image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8 (H, W, 3) or (H, W), got dtype {image.dtype}")
        image = image[..., None].repeat(3, -1) if image.ndim == 2 else image
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"numpy images must be (H, W, 3), (H, W, 4) or (H, W), got shape {image.shape}")
        return with_pixels(torch.from_numpy(image[..., :3].copy()).permute(2, 0, 1).contiguous())
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"tensor images must be (3, H, W) or (1, H, W), got shape {tuple(image.shape)}")
        if image.is_floating_point():
            if image.numel() and float(image.max()) > 1.0:
                raise ValueError("float tensor images must be in 0..1 (torchvision's convention), got values up "
                                 f"to {float(image.max()):.1f}: pass uint8 0..255, or divide by 255")
            image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        elif image.dtype != torch.uint8:
            raise ValueError(f"tensor images must be uint8 (0..255) or float (0..1), got {image.dtype}")
        return with_pixels(image.expand(3, -1, -1).cpu())
    raise TypeError(f"cannot read an image from {type(image).__name__}: give a path, a PIL image, a numpy array "
                    f"or a tensor")


class DetectorModel:
    """A trained detector ready for inference: ``predict(images)`` -> one dict per image with
    ``boxes (n, 4)`` x1y1x2y2 float32 in the image's own pixels, ``scores (n,)`` and ``labels (n,)``
    int64 in ``0..len(classes) - 1`` (torchvision's format), sorted by score.

    Images go through the config's ``data.val.transforms`` (as in evaluation), are padded into
    batches of ``batch_size`` and run on the model's device. For speed the model has its BatchNorms
    folded into the convolutions and runs in ``channels_last`` (same detections up to float
    rounding): ``model`` is for inference and export, not for training or loading weights.
    """

    def __init__(self, model: nn.Module, config: Mapping[str, Any], classes: Sequence[str],
                 device: torch.device, cat_ids: Sequence[int] | None = None) -> None:
        self.model = fold_batchnorm(model.to(device).eval()).to(memory_format=torch.channels_last)
        self.config, self.classes, self.device = dict(config), list(classes), device
        self.cat_ids = list(cat_ids) if cat_ids else list(range(len(self.classes)))
        data = self.config.get("data") or {}
        self.pipeline = build_transforms((data.get("val") or {}).get("transforms", []))
        refuse_mixing(self.pipeline, "data.val")
        self.size_divisor = int(data.get("size_divisor", 32))

    def prepare(self, images: Sequence[ImageInput]) -> dict[str, Any]:
        """Images -> a collated, transformed, padded batch (see :func:`collate_detection`)."""
        items = []
        for index, image in enumerate(images):
            pixels = to_uint8_chw(image)
            h, w = pixels.shape[-2:]
            target = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
                      "labels": torch.zeros(0, dtype=torch.int64), "image_id": index, "orig_size": (h, w)}
            items.append(self.pipeline(tv_tensors.Image(pixels), target))
        return collate_detection(items, self.size_divisor)

    @torch.no_grad()
    def predict(self, images: ImageInput | Sequence[ImageInput], score_thr: float = 0.3, batch_size: int = 8,
                tiles: Mapping[str, Any] | None = None) -> list[dict[str, Tensor]]:
        """Detections for ``images`` (one image or a list; a folder is refused: give its files), keeping
        those scoring ``>= score_thr`` (a number in [0, 1]); ``batch_size`` images (an integer >= 1) per forward.

        ``tiles={"size": 512, "overlap": 0.2, "full_image": True, "merge": "nms"}`` predicts each image sliced
        (:class:`~detkit.ops.tiles.TileSettings`): the model on every tile of the image as ``data.val.transforms``
        give it, batched, and on the whole image (``full_image``: as given, ``"fit"`` resized to one tile, or
        not at all), merged in the image's pixels."""
        if isinstance(score_thr, bool) or not isinstance(score_thr, numbers.Real) or not 0.0 <= score_thr <= 1.0:
            raise ValueError(f"score_thr must lie in [0, 1] (a number), got {score_thr!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        sliced = TileSettings.parse(tiles, "tiles")
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        out: list[dict[str, Tensor]] = []
        for start in range(0, len(images), batch_size):
            batch = self.prepare(images[start:start + batch_size])
            images_nhwc = batch["images"].to(self.device, non_blocking=True).contiguous(
                memory_format=torch.channels_last)
            if sliced is None:
                dets = self.model.predict(images_nhwc, batch["image_sizes"])
            else:
                dets = [sliced_predict(self._forward, images_nhwc[i, :, :h, :w], sliced, self.size_divisor)
                        for i, (h, w) in enumerate(batch["image_sizes"].tolist())]
            for i, det in enumerate(dets):
                pred = to_original_coords(det, batch["scale_factors"][i], batch["orig_sizes"][i])
                keep = pred["scores"] >= score_thr
                out.append({k: v[keep] for k, v in pred.items()})
        return out

    def _forward(self, images: Tensor, image_sizes: Tensor) -> list[dict[str, Tensor]]:
        """``model.predict`` of a batch ``(B, 3, h, w)`` in ``channels_last``, as the folded model runs fastest."""
        # a Detector's method (nn.Module types unknown attributes as Tensor | Module)
        return self.model.predict(images.contiguous(memory_format=torch.channels_last),  # type: ignore[operator]
                                  image_sizes)

    def __repr__(self) -> str:
        return (f"DetectorModel({self.config['model'].get('type')}, {len(self.classes)} classes, "
                f"device={self.device})")


def build_model_from_config(config: Mapping[str, Any], where: str) -> nn.Module:
    """``build_detector(config['model'])``; a type from a module the config imports is named, not imported:
    a checkpoint must not run code, so such modules are imported by the user (``import x``) first."""
    try:
        return build_detector(config["model"])
    except UnknownTypeError as err:
        imports = config.get("imports") or []
        if not imports:
            raise
        raise ConfigError(f"{where}: {err}. Its config imports {list(imports)}, which detkit does not import from a "
                          f"checkpoint (that would run code from a file); import them yourself first, or give "
                          f"--config") from None


def load_detector(checkpoint: str | os.PathLike, device: str | torch.device = "auto",
                  config: Mapping[str, Any] | None = None) -> DetectorModel:
    """A :class:`DetectorModel` from a detkit checkpoint (``best.pth``, ``model_final.pth``, ``latest.pth``...).

    The config and class names come from the checkpoint unless ``config`` is given; the weights
    are the ones training evaluated (EMA when there was one). Loading is weights-only.
    """
    state = load_checkpoint(checkpoint)
    cfg = dict(config if config is not None else state.get("config") or {})
    if "model" not in cfg:
        raise ConfigError(f"{checkpoint}: the checkpoint stores no config; pass config=load_config(...)")
    model = build_model_from_config(cfg, str(checkpoint))
    load_model_weights(model, evaluation_weights(state), checkpoint)
    num_classes = getattr(model, "num_classes", None)
    classes = state.get("classes") or [str(i) for i in range(num_classes or 0)]
    return DetectorModel(model, cfg, classes, pick_device(device), state.get("cat_ids"))
