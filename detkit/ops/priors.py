"""Point priors of dense heads: the centre of every cell of every feature level, and the values of a
map at chosen cells."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor


class Priors(NamedTuple):
    """Every level's cell centres, levels concatenated finest first, each level row-major ``(H_l, W_l)``.

    ``points (P, 2)`` (x, y) input pixels; ``strides (P,)`` the nominal stride of each point's
    level; ``levels (P,)`` int64 level index; ``sizes`` the ``(H_l, W_l)`` of each level.
    """

    points: Tensor
    strides: Tensor
    levels: Tensor
    sizes: tuple[tuple[int, int], ...]

    def level_slices(self) -> list[slice]:
        """The range of ``P`` that each level occupies."""
        slices, start = [], 0
        for h, w in self.sizes:
            slices.append(slice(start, start + h * w))
            start += h * w
        return slices


def grid_steps(sizes: Sequence[tuple[int, int]], strides: Sequence[int], input_size: tuple[int, int] | None = None
               ) -> list[tuple[int, int]]:
    """Per level ``(step_y, step_x)`` between point centres: the stride, or with ``input_size``
    ``(H // h_l, W // w_l)`` as torchvision's ``AnchorGenerator`` (not the stride on P6/P7 unless
    the padded input is a multiple of 128)."""
    if input_size is None:
        return [(s, s) for s in strides]
    return [(input_size[0] // h, input_size[1] // w) for h, w in sizes]


def dense_points(sizes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device,
                 offset: float = 0.5, input_size: tuple[int, int] | None = None) -> Priors:
    """Centres ``(index + offset) * step`` of every cell of every level (see :class:`Priors`).

    ``offset`` 0.5 (cell centres, mmdetection) or 0 (torchvision); ``step`` is the stride, or see
    :func:`grid_steps` for ``input_size``.
    """
    pts, strd, lvl = [], [], []
    for level, ((h, w), s, (sy, sx)) in enumerate(zip(sizes, strides, grid_steps(sizes, strides, input_size))):
        ys = (torch.arange(h, device=device, dtype=torch.float32) + offset) * sy
        xs = (torch.arange(w, device=device, dtype=torch.float32) + offset) * sx
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        pts.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
        strd.append(torch.full((h * w,), float(s), device=device))
        lvl.append(torch.full((h * w,), level, device=device, dtype=torch.int64))
    return Priors(torch.cat(pts), torch.cat(strd), torch.cat(lvl), tuple((int(h), int(w)) for h, w in sizes))


def gather_cells(maps: Tensor, index: Tensor) -> Tensor:
    """``maps (B, K, H, W)`` at flat cells ``index (B, N)`` (``row * W + col``) -> ``(B, N, K)`` float32: the
    values of the chosen cells only, without reordering the whole map, upcast after the gather (the
    sizes and distances a bf16 map holds under autocast need float32; the few gathered values are cheap)."""
    flat = maps.flatten(2)  # (B, K, HW)
    return flat.gather(2, index.unsqueeze(1).expand(-1, maps.shape[1], -1)).transpose(1, 2).float()
