"""Class-aware repeat-factor sampling (LVIS, Gupta et al. 2019; detectron2's RepeatFactorTrainingSampler):
images with rare categories are seen more often per epoch."""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from detkit.data.sampler import EpochSampler
from detkit.registry import SAMPLERS, ConfigError, config_path

logger = logging.getLogger("detkit.data")


def repeat_factors(image_categories: Sequence[Iterable[int]], repeat_thr: float) -> Tensor:
    """Per image ``r(I) = max over its categories c of r(c)``, ``r(c) = max(1, sqrt(repeat_thr / f(c)))``
    with ``f(c)`` the fraction of images containing ``c``; an image without objects gets 1.

    Returns float64 ``(N,)`` for the ``N`` images of ``image_categories`` (each an iterable of category ids).
    """
    sets = [set(cats) for cats in image_categories]
    images_with = Counter(c for cats in sets for c in cats)
    per_category = {c: max(1.0, math.sqrt(repeat_thr * len(sets) / n)) for c, n in images_with.items()}
    return torch.tensor([max((per_category[c] for c in cats), default=1.0) for cats in sets], dtype=torch.float64)


def image_categories(dataset: Any) -> list[list[int]]:
    """Category ids of each item's non-crowd annotations, from the dataset's COCO index (``coco``, ``ids``):
    no image is decoded."""
    coco, ids = getattr(dataset, "coco", None), getattr(dataset, "ids", None)
    if coco is None or ids is None:
        raise ConfigError(f"{config_path()}: RepeatFactorSampler needs per-image categories; "
                          f"{type(dataset).__name__} has no COCO index (coco, ids)")
    return [[a["category_id"] for a in coco.imgToAnns[i] if not a.get("iscrowd", 0)] for i in ids]


@SAMPLERS.register()
class RepeatFactorSampler(EpochSampler):
    """:class:`EpochSampler` over an epoch in which image ``I`` appears ``r(I)`` times on average
    (:func:`repeat_factors`): ``floor(r)`` times, plus once more with probability ``r - floor(r)``
    (stochastic rounding, drawn per epoch from (seed, epoch) like the permutation). An epoch keeps a
    fixed length, ``round(sum r)`` samples (the draw is cycled or cut to it), so that the trainer's
    steps per epoch, the schedule and a mid-epoch resume stay exact; shards, start offsets, grouped
    batches and per-sample seeds are EpochSampler's.

    Args:
        repeat_thr: in (0, 1]: categories in fewer than this fraction of the images are repeated (LVIS: 0.001;
            a few hundred images need 0.1 or more: r(c) > 1 only when f(c) < repeat_thr).
    """

    def __init__(self, dataset: Any, shuffle: bool, repeat_thr: float, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, groups: Sequence[int] | None = None,
                 batch_size: int = 1) -> None:
        if isinstance(repeat_thr, bool) or not isinstance(repeat_thr, (int, float)) or not repeat_thr > 0:
            raise ConfigError(f"{config_path('repeat_thr')} must be a number > 0, got {repeat_thr!r}")
        if not repeat_thr <= 1:  # inf or 1e300 would ask for an endless epoch (OverflowError)
            raise ConfigError(f"{config_path('repeat_thr')} must be at most 1, got {repeat_thr!r}: it is a fraction of "
                              f"the images (categories in fewer images are repeated; LVIS uses 0.001, a few hundred "
                              f"images 0.1-0.3)")
        self.factors = repeat_factors(image_categories(dataset), float(repeat_thr))
        self.whole = self.factors.floor()
        super().__init__(round(float(self.factors.sum())), shuffle, seed, rank, world_size, drop_last, groups,
                         batch_size)
        repeated = self.factors > 1
        logger.info("RepeatFactorSampler (repeat_thr %g): %d of %d images repeated (factor up to %.2f); %d samples "
                    "per epoch", repeat_thr, int(repeated.sum()), len(self.factors),
                    float(self.factors.max()) if len(self.factors) else 1.0, self.size)

    def epoch_order(self) -> list[int]:
        generator = self.epoch_generator()
        extra = torch.rand(len(self.factors), generator=generator, dtype=torch.float64) < self.factors - self.whole
        order = torch.repeat_interleave(torch.arange(len(self.factors)), (self.whole + extra).long())
        if self.shuffle:
            order = order[torch.randperm(len(order), generator=generator)]
        indices: list[int] = order.tolist()
        return (indices * math.ceil(self.size / max(len(indices), 1)))[:self.size]
