"""``train.compile: full``: the detector's forward + loss at fixed shapes under one ``torch.compile``.

AOTAutograd compiles the backward of the same graph, so forward, loss and backward run as compiled
code; the optimizer step is the fused kernel (``fused=True``, set by the runner) rather than a compiled
one, because the LR schedule changes ``lr`` every step and a compiled step would recompile for each
value. Shapes are made static so that one compiled graph (and one CUDA graph) serves a whole run:
images are zero-padded at the bottom/right to a multiple of :data:`SIZE_BUCKET` pixels, GT lists to
a power of two (at least :data:`MIN_GTS`) with masked-out rows. The GT rows change no loss term; the
image padding does add priors over the padded area (more classification negatives, as any larger
padded batch does in eager), so losses equal eager's on the same bucketed batch, not on the
unpadded one. Loss-weight schedules are refused: their value would be a guard (a recompile per step).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.models.detector import Detector, pad_targets
from detkit.ops.tiles import pad_to_multiple
from detkit.registry import ConfigError

#: Padded image sides are multiples of this (the coarsest FCOS stride; 128 px buckets keep the number
#: of distinct shapes, hence of compilations, small on datasets of varying image size).
SIZE_BUCKET = 128
#: GT lists are padded to a power of two, at least this long.
MIN_GTS = 8


def bucket_images(images: Tensor, bucket: int = SIZE_BUCKET) -> Tensor:
    """``(B, 3, H, W)`` -> ``(B, 3, H', W')`` zero-padded at the bottom/right to multiples of ``bucket``."""
    return pad_to_multiple(images, bucket)


def bucket_targets(boxes: Tensor, labels: Tensor, mask: Tensor, minimum: int = MIN_GTS
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Padded GT ``(B, G, ...)`` -> ``(B, G', ...)`` with ``G'`` the next power of two >= max(G, minimum);
    the new rows are masked out."""
    g = boxes.shape[1]
    extra = max(minimum, 1 << max(g - 1, 0).bit_length()) - g
    if extra <= 0:
        return boxes, labels, mask
    return F.pad(boxes, (0, 0, 0, extra)), F.pad(labels, (0, extra)), F.pad(mask, (0, extra))


def compile_mode(device: torch.device) -> str | None:
    """CUDA graphs on the GPU (launch overhead is what a detector step has most of); inductor's default
    on the CPU (``max-autotune-no-cudagraphs`` benchmarks GEMM templates for minutes and gains nothing
    on convolutions, which stay oneDNN calls)."""
    return "reduce-overhead" if device.type == "cuda" else None


class CompiledLoss(nn.Module):
    """``model(images, targets) -> {term: weighted loss}`` at static shapes, compiled once per shape.

    Wraps a :class:`Detector` (its ``features``, ``head`` and ``head.loss``); the wrapped model's
    parameters are the ones trained. ``mode``: ``torch.compile`` mode (default: :func:`compile_mode`);
    ``channels_last``: the bucketed batch goes in in channels_last memory format; ``backend``:
    ``torch.compile`` backend (``aot_eager`` traces and splits forward/backward without generating code).
    """

    def __init__(self, model: nn.Module, mode: str | None = None, channels_last: bool = False,
                 backend: str = "inductor") -> None:
        super().__init__()
        if not isinstance(model, Detector):
            raise ConfigError(f"train.compile: full needs a detkit detector (backbone, neck, head with a loss); "
                              f"{type(model).__name__} is not one: use train.compile: true")
        if model.teacher is not None:  # losses() below calls the head's loss without the teacher's outputs
            raise ConfigError("train.compile: full does not run model.teacher; use train.compile: true")
        self.model, self.channels_last = model, channels_last
        if backend != "inductor":
            mode = None
        elif mode is None:
            mode = compile_mode(model.pixel_mean.device)
        self.compiled = torch.compile(self.losses, dynamic=False, mode=mode, backend=backend)

    def losses(self, images: Tensor, boxes: Tensor, labels: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """The compiled region: normalise -> backbone -> neck -> head -> assigner + losses."""
        return self.model.head.loss(self.model.head(self.model.features(images)), boxes, labels, mask)

    def forward(self, images: Tensor, targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        device = self.model.pixel_mean.device
        boxes, labels, mask = bucket_targets(*pad_targets(targets, device, self.model.num_classes))
        images = bucket_images(images.to(device, non_blocking=True))
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # CUDA graphs reuse their output buffers on the next replay: hand out copies
        return {k: v.clone() for k, v in self.compiled(images, boxes, labels, mask).items()}
