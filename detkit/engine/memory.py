"""Out of memory during training, named: which image files the failing batch held, their size, the fix."""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from detkit.data.coco import DatasetError

#: How many of a batch's images a message lists (the largest first).
LISTED = 4


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: ``MemoryError``, ``torch.OutOfMemoryError`` (CUDA) or the
    CPU allocator's ``RuntimeError: DefaultCPUAllocator: can't allocate memory`` (also as re-raised
    from a DataLoader worker)."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def describe_images(dataset: Any, image_ids: Sequence[int]) -> tuple[str, int, int]:
    """``"path (WxH), ..."`` of ``image_ids`` in ``dataset`` (a COCO-style dataset: ``coco.imgs`` and
    ``img_dir``), the largest first, and the largest width and height; ids alone for other datasets."""
    coco, img_dir = getattr(dataset, "coco", None), getattr(dataset, "img_dir", None)
    infos = [coco.imgs.get(i, {}) if coco is not None else {} for i in image_ids]
    sized = sorted(zip(image_ids, infos), key=lambda p: -int(p[1].get("width", 0)) * int(p[1].get("height", 0)))
    names = [f"{Path(img_dir or '') / info['file_name']} ({info.get('width')}x{info.get('height')})"
             if "file_name" in info else f"image id {i}" for i, info in sized]
    more = f" and {len(names) - LISTED} more" if len(names) > LISTED else ""
    width, height = (int(sized[0][1].get("width", 0)), int(sized[0][1].get("height", 0))) if sized else (0, 0)
    return ", ".join(names[:LISTED]) + more, width, height


def batch_image_ids(loader: Any, position: int) -> list[int]:
    """The image ids of batch ``position`` (0-based, counted from where the sampler starts) of ``loader``'s
    current epoch: its batch sampler is deterministic per epoch, and a DataLoader returns batches in
    order, so the batch whose loading failed is the next one after those delivered."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    ids = getattr(loader.dataset, "ids", None)
    if batch_sampler is None or ids is None:
        return []
    batch: list[Any] = next(itertools.islice(iter(batch_sampler), position, None), [])
    return [ids[item[0] if isinstance(item, tuple) else item] for item in batch]  # items: (index, sample seed)


@contextmanager
def name_out_of_memory(dataset: Any, stage: str, image_ids: Callable[[], list[int]], split: str = "data.train"
                       ) -> Iterator[None]:
    """An allocation failure inside becomes one :class:`DatasetError` naming ``stage``, the batch's image
    files (``image_ids()``, called only then) of ``split``, the largest size and the fix (a Resize, a
    smaller batch)."""
    try:
        yield
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        ids = image_ids()
        files, width, height = describe_images(dataset, ids) if ids else ("(images unknown)", 0, 0)
        largest = f"; the largest is {width}x{height} pixels" if width else ""
        batch_size = "data.batch_size" if split == "data.train" else "data.val_batch_size"
        raise DatasetError(f"out of memory {stage} a batch of {split} holding {files}{largest}: add a Resize "
                           f"first in {split}.transforms, e.g. [{{type: Resize, size: 800, max_size: 1333}}, "
                           f"...], or lower {batch_size} ({allocator_line(err)})") from None


def allocator_line(err: BaseException) -> str:
    """The line of ``err`` that says what failed to allocate (a worker's error starts with "Caught ...")."""
    lines = str(err).splitlines() or [type(err).__name__]
    return next((line.strip() for line in lines if "memory" in line.lower()), lines[0])[:200]
