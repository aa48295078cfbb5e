"""Sliced inference: a grid of overlapping tiles, the model run on each tile (batched), and the merge of the
tiles' detections into one set per image.

Tiles are cut from the image the model sees (after ``data.val.transforms``; with no Resize there, the
original pixels). The last tile of a row or column is shifted to end at the image border (sahi does the
same), so every tile has the same size and a batch of tiles needs no padding between them. Detections
of all tiles (and of the whole image, with ``full_image``) are moved to image pixels and merged:

* ``nms`` (default): class-aware NMS (``torchvision.ops.batched_nms``) at IoU ``iou_thr``. It keeps
  the model's own boxes. With ``overlap`` at least the largest object, each object lies whole in one tile;
  a neighbouring tile's cut view of it either covers less than ``min_visible`` of it (trained as
  background by :class:`~detkit.data.tiled.TiledDataset`) or overlaps the whole view by IoU >= that
  fraction and is suppressed when ``iou_thr <= min_visible``.
* ``nmm``: greedy non-maximum merging (sahi's GREEDYNMM): the best box absorbs every box of its class
  whose intersection over the smaller box is >= ``iou_thr`` and becomes their union, with the best score.
  It recovers objects larger than the overlap, which no tile sees whole; but the union also grows a
  precise small box to any sloppier larger box around it (the whole-image pass), and two touching objects
  of one class can become one, so it is not the default.

With ``full_image_first`` the whole-image pass is not merged with the tiles on equal terms: its detections are
kept as they are, the tiles' (merged among themselves) only add objects it did not find (no whole-image box of
their class at IoU >= ``iou_thr``). For a model trained on whole images, sliced inference is then the
whole-image prediction plus what the tiles see in addition: a tile's view of an object the whole pass found
(often scoring higher, its box no better) cannot replace the whole-image box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

from detkit.registry import ConfigError, check_keys

#: ``(images (B, 3, h, w), image_sizes (B, 2)) -> per image {"boxes" (n, 4), "scores" (n,), "labels" (n,)}``
PredictFn = Callable[[Tensor, Tensor], list[dict[str, Tensor]]]
MERGE_MODES = ("nms", "nmm")


def overlap_pixels(size: int, overlap: Any, key: str = "overlap") -> int:
    """``overlap`` as pixels: a float in [0, 1) is a fraction of ``size``, an int is pixels; < ``size``."""
    if isinstance(overlap, float) and 0.0 <= overlap < 1.0:
        pixels = round(overlap * size)
    elif isinstance(overlap, int) and not isinstance(overlap, bool) and 0 <= overlap < size:
        pixels = overlap
    else:
        raise ConfigError(f"{key} must be a fraction of the tile in [0, 1) (e.g. 0.2) or whole pixels in "
                          f"[0, {size}) (e.g. 64), got {overlap!r}")
    return pixels


def tile_size(size: Any, key: str = "size") -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"{key} must be a tile side in pixels (an integer >= 1), got {size!r}")
    return size


def _starts(length: int, size: int, stride: int) -> list[int]:
    """Tile offsets along one axis: every ``stride`` pixels, the last one ending at ``length``."""
    if length <= size:
        return [0]
    return [*range(0, length - size, stride), length - size]


def tile_grid(height: int, width: int, size: int, overlap: int | float) -> Tensor:
    """Tiles ``(T, 4)`` int64 x1y1x2y2 covering a ``height x width`` image, row by row: ``size x size``
    (clipped to the image when it is smaller), neighbours sharing ``overlap`` (pixels, or a fraction of
    ``size``) or more, the last of each row and column ending at the border."""
    stride = size - overlap_pixels(size, overlap)
    th, tw = min(size, height), min(size, width)
    tiles = [[x, y, x + tw, y + th] for y in _starts(height, size, stride) for x in _starts(width, size, stride)]
    return torch.tensor(tiles, dtype=torch.int64)


def _intersection(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise intersection areas of boxes ``a (N, 4)`` and ``b (M, 4)`` -> ``(N, M)``."""
    wh = (torch.min(a[:, None, 2:], b[None, :, 2:]) - torch.max(a[:, None, :2], b[None, :, :2])).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def greedy_merge(boxes: Tensor, scores: Tensor, labels: Tensor, thr: float) -> tuple[Tensor, Tensor]:
    """Greedy non-maximum merging: ``(indices of the kept boxes (K,) by score, their merged boxes (K, 4))``.
    Best first, a box takes every unclaimed box of its label with intersection over the smaller area
    >= ``thr`` and becomes the union of them."""
    order = scores.argsort(descending=True, stable=True)
    boxes, labels = boxes[order], labels[order]
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(1)
    ios = _intersection(boxes, boxes) / torch.min(area[:, None], area[None, :]).clamp(min=1e-6)
    match = (ios >= thr) & (labels[:, None] == labels[None, :])
    free = torch.ones(len(boxes), dtype=torch.bool)
    kept, merged = [], []
    for i in range(len(boxes)):
        if not free[i]:
            continue
        group = match[i] & free
        free &= ~group
        members = boxes[group]
        kept.append(i)
        merged.append(torch.cat([members[:, :2].min(0).values, members[:, 2:].max(0).values]))
    index = torch.tensor(kept, dtype=torch.int64)
    return order[index], torch.stack(merged) if merged else boxes.new_zeros(0, 4)


def merge_tiles(boxes: Tensor, scores: Tensor, labels: Tensor, iou_thr: float = 0.5, merge: str = "nms",
                max_det: int = 100) -> dict[str, Tensor]:
    """One image's detections from overlapping views, ``boxes (N, 4)`` x1y1x2y2 in image pixels,
    ``scores (N,)``, ``labels (N,)`` -> ``{"boxes" (n, 4), "scores" (n,), "labels" (n,)}``, the best
    ``max_det`` by score after class-aware ``nms`` or ``nmm`` (see the module docstring)."""
    if merge == "nms":
        keep = batched_nms(boxes.float(), scores.float(), labels, iou_thr)[:max_det]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
    keep, merged = greedy_merge(boxes.float(), scores, labels, iou_thr)
    keep, merged = keep[:max_det], merged[:max_det]
    return {"boxes": merged.to(boxes.dtype), "scores": scores[keep], "labels": labels[keep]}


def add_new_objects(first: dict[str, Tensor], extra: dict[str, Tensor], iou_thr: float, max_det: int
                    ) -> dict[str, Tensor]:
    """``first``'s detections as they are, plus those of ``extra`` that overlap no box of ``first`` with their label
    at IoU >= ``iou_thr``; the best ``max_det`` by score. Both ``{"boxes" (n, 4), "scores" (n,), "labels" (n,)}``."""
    same = box_iou(extra["boxes"].float(), first["boxes"].float()) >= iou_thr
    seen = (same & (extra["labels"][:, None] == first["labels"][None, :])).any(dim=1)
    joined = {k: torch.cat([first[k], extra[k][~seen]]) for k in ("boxes", "scores", "labels")}
    best = joined["scores"].argsort(descending=True, stable=True)[:max_det]
    return {k: v[best] for k, v in joined.items()}


@dataclass
class TileSettings:
    """Sliced inference: ``size`` tile side (pixels), ``overlap`` (fraction of ``size`` or pixels),
    ``full_image`` (also run the whole image: ``true`` as given, the whole-image prediction, as sahi's standard
    prediction; ``"fit"`` resized to fit one tile, for a model trained on tiles; ``false`` tiles only),
    ``merge`` (``nms`` | ``nmm``) at ``iou_thr``, ``max_det`` detections per image (COCO scores 100),
    ``batch_size`` tiles per forward, ``cut_margin``: a tile's box within that many pixels of a tile edge
    inside the image is a cut view of a larger object and is dropped (0: kept); ``full_image_first``: the
    whole-image pass's boxes are kept and the tiles only add objects it did not find (see the module docstring)."""

    size: int
    overlap: int | float = 0.2
    full_image: bool | str = True
    merge: str = "nms"
    iou_thr: float = 0.5
    max_det: int = 100
    batch_size: int = 16
    cut_margin: int = 0
    full_image_first: bool = False

    @classmethod
    def parse(cls, value: Any, key: str = "tiles") -> "TileSettings | None":
        """``None`` (no slicing), or a mapping ``{size, overlap, ...}``, checked: a :class:`ConfigError`
        naming ``key.<field>`` for an unknown key or a value out of range."""
        if value is None:
            return None
        if not isinstance(value, Mapping) or "size" not in value:
            raise ConfigError(f"{key} must be null or a mapping like {{size: 512, overlap: 0.2, full_image: true}}, "
                              f"got {value!r}")
        check_keys(value, [f for f in cls.__dataclass_fields__], key)
        s = cls(**value)
        tile_size(s.size, f"{key}.size")
        overlap_pixels(s.size, s.overlap, f"{key}.overlap")
        if not isinstance(s.full_image, bool) and s.full_image != "fit":
            raise ConfigError(f"{key}.full_image must be true (the whole image as given), fit (resized to one tile) "
                              f"or false, got {s.full_image!r}")
        if not isinstance(s.full_image_first, bool) or (s.full_image_first and not s.full_image):
            raise ConfigError(f"{key}.full_image_first must be true or false, and true only with full_image (true or "
                              f"fit), got {s.full_image_first!r} with full_image {s.full_image!r}")
        if s.merge not in MERGE_MODES:
            raise ConfigError(f"{key}.merge must be one of {', '.join(MERGE_MODES)}, got {s.merge!r}")
        if isinstance(s.iou_thr, bool) or not isinstance(s.iou_thr, (int, float)) or not 0.0 < s.iou_thr <= 1.0:
            raise ConfigError(f"{key}.iou_thr must be a number in (0, 1], got {s.iou_thr!r}")
        for name, least in (("max_det", 1), ("batch_size", 1), ("cut_margin", 0)):
            number = getattr(s, name)
            if isinstance(number, bool) or not isinstance(number, int) or number < least:
                raise ConfigError(f"{key}.{name} must be an integer >= {least}, got {number!r}")
        return s


def pad_to_multiple(images: Tensor, divisor: int) -> Tensor:
    """``(B, C, h, w)`` -> ``(B, C, h', w')`` zero-padded at the bottom/right to multiples of ``divisor`` (as the
    collate pads); ``images`` itself when both sides already are."""
    h, w = images.shape[-2:]
    pad_h, pad_w = -h % divisor, -w % divisor
    return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images


def drop_cut_views(det: dict[str, Tensor], tile: Sequence[int], height: int, width: int, margin: int
                   ) -> dict[str, Tensor]:
    """One tile's detections (tile pixels) without the boxes within ``margin`` pixels of a tile edge that lies
    inside the ``height`` x ``width`` image: views of objects the tile cuts (seen whole by a neighbouring
    tile when the overlap exceeds them, or by the whole-image pass). ``tile``: ``(x1, y1, x2, y2)``."""
    x1, y1, x2, y2 = tile
    boxes = det["boxes"]
    cut = (((boxes[:, 0] <= margin) & (x1 > 0)) | ((boxes[:, 1] <= margin) & (y1 > 0))
           | ((boxes[:, 2] >= x2 - x1 - margin) & (x2 < width)) | ((boxes[:, 3] >= y2 - y1 - margin) & (y2 < height)))
    return {k: v[~cut] for k, v in det.items()}


def whole_image_pass(predict: PredictFn, image: Tensor, fit: int | None, size_divisor: int = 32
                     ) -> dict[str, Tensor]:
    """Detections of the whole ``image (3, H, W)`` in its pixels: as given (``fit`` None: what ``predict`` gives
    without tiles) or resized (bilinear, antialiased) so that its longer side is ``fit`` pixels."""
    height, width = image.shape[-2:]
    h, w = height, width
    if fit is not None:
        scale = fit / max(height, width)
        h, w = max(round(height * scale), 1), max(round(width * scale), 1)
        image = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", antialias=True,
                              align_corners=False)[0].round().clamp(0, 255).to(image.dtype)
    det = predict(pad_to_multiple(image[None], size_divisor), torch.tensor([[h, w]], dtype=torch.int64))[0]
    return {**det, "boxes": det["boxes"] * det["boxes"].new_tensor([width / w, height / h] * 2)}


def sliced_predict(predict: PredictFn, image: Tensor, tiles: TileSettings, size_divisor: int = 32
                   ) -> dict[str, Tensor]:
    """Detections of ``image (3, H, W)`` (on the model's device) in its pixels: ``predict`` on every tile
    (``tiles.batch_size`` per call) and, with ``full_image``, on the whole image (:func:`whole_image_pass`),
    merged by :func:`merge_tiles`. One pass alone (one tile covers the image, no whole-image pass) is
    returned as the model gave it."""
    height, width = image.shape[-2:]
    grid = tile_grid(height, width, tiles.size, tiles.overlap)
    th, tw = int(grid[0, 3] - grid[0, 1]), int(grid[0, 2] - grid[0, 0])
    parts: list[dict[str, Tensor]] = []
    for start in range(0, len(grid), tiles.batch_size):
        chunk = grid[start:start + tiles.batch_size]
        batch = torch.stack([image[:, y1:y1 + th, x1:x1 + tw] for x1, y1, _, _ in chunk.tolist()])
        sizes = torch.tensor([[th, tw]], dtype=torch.int64).expand(len(chunk), 2)
        for tile, det in zip(chunk.tolist(), predict(pad_to_multiple(batch, size_divisor), sizes)):
            if tiles.cut_margin:
                det = drop_cut_views(det, tile, height, width, tiles.cut_margin)
            parts.append({**det, "boxes": det["boxes"] + det["boxes"].new_tensor([tile[0], tile[1]] * 2)})
    merged = {k: torch.cat([p[k] for p in parts]) for k in ("boxes", "scores", "labels")}
    if tiles.full_image and len(grid) > 1:  # more than one tile: the image is larger than a tile
        whole = whole_image_pass(predict, image, tiles.size if tiles.full_image == "fit" else None, size_divisor)
        if tiles.full_image_first:
            seen = merge_tiles(merged["boxes"], merged["scores"], merged["labels"], tiles.iou_thr, tiles.merge,
                               tiles.max_det)
            return add_new_objects(whole, seen, tiles.iou_thr, tiles.max_det)
        merged = {k: torch.cat([merged[k], whole[k]]) for k in merged}
    elif len(parts) == 1:  # one tile covers the image: the model's own output
        return parts[0]
    return merge_tiles(merged["boxes"], merged["scores"], merged["labels"], tiles.iou_thr, tiles.merge, tiles.max_det)
