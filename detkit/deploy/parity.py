"""Does an exported file give ``predict``'s detections? The parity check of ``export``.

PyTorch (the detector as ``DetectorModel.predict`` runs it) and the exported file see the same images at
several sizes (three of four not multiples of 32) and as one zero-padded batch of mixed sizes. Their
detections are compared as sets: pairs of the same class whose boxes are within :data:`BOX_TOL` px and
scores within :data:`SCORE_TOL`. A detection left without a partner is a divergence unless its score lies
within :data:`TIE_EPS` of a cut that float rounding may move it across: the score threshold, or the lowest
score of a side that is full (top-k). A check that compared no detection retries once on a copy exported at
score threshold 0 and otherwise fails: it never passes on nothing.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from detkit.data.shapes import SHAPES, draw_image
from detkit.models.detector import Detector
from detkit.models.head import DetectionHead

if TYPE_CHECKING:
    from detkit.api import DetectorModel

#: ``run(images uint8 (B, 3, H, W), image_sizes int64 (B, 2)) -> boxes (B, M, 4), scores (B, M), labels (B, M)``
Runner = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
Detections = dict[str, Tensor]  # one image's "boxes" (n, 4), "scores" (n,), "labels" (n,)

CHECK_SIZES: tuple[tuple[int, int], ...] = ((128, 128), (100, 130), (90, 110), (70, 83))  # (h, w)
BOX_TOL = 0.5  # px, per coordinate: float rounding moves boxes by ~1e-3 px
SCORE_TOL = 1e-3
TIE_EPS = 1e-3  # a score this close to a cut may land on either side of it in another runtime
NEAR_PX = 32.0  # an unmatched pair of detections this close is one detection that moved (or changed class)
LOWERED_THR = 0.0  # the retry's score threshold: every candidate up to the top-k is compared


class ParityError(RuntimeError):
    """The exported file's detections differ from PyTorch's, or the check had nothing to compare."""


@dataclass
class ParityReport:
    """What the check compared: ``images`` (count), ``sizes`` (h x w of each), ``matched`` detection pairs,
    ``near_cut`` unpaired detections excused as near-ties at a cut, the largest differences of the pairs,
    and the retry's threshold when the file's own compared nothing. ``path``/``mib``: the file written."""

    sizes: list[str] = field(default_factory=list)
    images: int = 0
    matched: int = 0
    near_cut: int = 0
    box_diff: float = 0.0
    score_diff: float = 0.0
    score_thr: float = 0.0
    lowered_thr: float | None = None
    path: Path | None = None
    mib: float = 0.0
    validation: Any = None  # export --val / --int8: a detkit.deploy.validate.ValReport

    def summary(self) -> str:
        """One line: what was written and how it was checked."""
        if not self.images:  # int8: quantization moves boxes and scores beyond float rounding
            return f"wrote {self.path} ({self.mib:.1f} MiB), int8: checked by its {self.validation.summary()}"
        line = (f"wrote {self.path} ({self.mib:.1f} MiB); checked against PyTorch on {self.images} images "
                f"({', '.join(self.sizes)}; the last {len(CHECK_SIZES) - 1} also as one zero-padded batch): "
                f"{self.matched} detections matched, max box difference {self.box_diff:.2g} px, "
                f"max score difference {self.score_diff:.2g}")
        if self.near_cut:
            line += f", {self.near_cut} within {TIE_EPS:g} of a score cut found by one side only"
        if self.lowered_thr is not None:
            line += (f"; nothing scores above the model's score_thr {self.score_thr:g} on these images, so they "
                     f"were compared on a copy exported at score_thr {self.lowered_thr:g}")
        return line + (f"; {self.validation.summary()}" if self.validation else "")


def check_images(seed: int = 0) -> list[np.ndarray]:
    """``uint8 (h, w, 3)`` shapes on textured backgrounds (the default dataset's drawing) at :data:`CHECK_SIZES`."""
    images = []
    for index, (h, w) in enumerate(CHECK_SIZES):
        side = max(h, w)
        image, _ = draw_image(seed, index, side, SHAPES, min_objects=3, max_objects=6, min_size=8.0,
                              max_size=0.6 * side, max_overlap=0.4)
        images.append(np.ascontiguousarray(image[:h, :w]))
    return images


def detector_of(model: DetectorModel) -> Detector:
    """``model``'s network: a detkit :class:`Detector` (``predict`` and ``head.score_thr``), as the exporter needs."""
    if not isinstance(model.model, Detector):
        raise ParityError(f"{type(model.model).__name__} is not a detkit Detector: no exported file to compare")
    return model.model


@contextmanager
def score_threshold(head: DetectionHead, value: float) -> Iterator[None]:
    """``head.score_thr`` set to ``value`` inside the block (the exporter bakes it into the graph)."""
    previous = head.score_thr
    head.score_thr = value
    try:
        yield
    finally:
        head.score_thr = previous


def near_cut(score: float, other: Tensor, score_thr: float, k: int) -> bool:
    """Whether ``score`` lies within :data:`TIE_EPS` of the threshold, or of the lowest score of the other
    side's ``other`` scores when that side is full (``k`` detections): rounding may move it across."""
    return score <= score_thr + TIE_EPS or (len(other) >= k and score <= float(other.min()) + TIE_EPS)


def match_image(ref: Detections, got: Detections, score_thr: float, k: int
                ) -> tuple[list[tuple[float, float]], int, list[str]]:
    """Pairs of ``ref`` and ``got`` detections (same label, boxes within :data:`BOX_TOL`, scores within
    :data:`SCORE_TOL`; greedy, closest first) -> ``[(box diff, score diff)]``, unpaired detections near a
    cut, and one phrase per unexplained one."""
    rb, rs, rl = ref["boxes"].float(), ref["scores"].float(), ref["labels"]
    gb, gs, gl = got["boxes"].float(), got["scores"].float(), got["labels"]
    box = torch.cdist(rb, gb, p=math.inf) if len(rb) and len(gb) else torch.zeros(len(rb), len(gb))
    score = (rs[:, None] - gs[None, :]).abs()
    ok = (rl[:, None] == gl[None, :]) & (box <= BOX_TOL) & (score <= SCORE_TOL)
    pairs, used_r, used_g = [], set(), set()
    for i, j in sorted(ok.nonzero().tolist(), key=lambda ij: (float(score[ij[0], ij[1]]), float(box[ij[0], ij[1]]))):
        if i not in used_r and j not in used_g:
            used_r.add(i)
            used_g.add(j)
            pairs.append((float(box[i, j]), float(score[i, j])))
    lone_r = [i for i in range(len(rb)) if i not in used_r and not near_cut(float(rs[i]), gs, score_thr, k)]
    lone_g = [j for j in range(len(gb)) if j not in used_g and not near_cut(float(gs[j]), rs, score_thr, k)]
    excused = (len(rb) - len(used_r) - len(lone_r)) + (len(gb) - len(used_g) - len(lone_g))
    problems = []
    for i in lone_r:  # described by the unexplained detection of the other side nearest in score, if one is near
        near = [j for j in lone_g if float(box[i, j]) <= NEAR_PX]
        j = min(near, key=lambda j: (float(score[i, j]), float(box[i, j])), default=None)
        what = f"class {int(rl[i])} score {float(rs[i]):.3f}"
        if j is not None:
            lone_g.remove(j)
            change = f"became class {int(gl[j])}, " if int(gl[j]) != int(rl[i]) else ""
            problems.append(f"{what}: {change}box moved {float(box[i, j]):.1f} px, score {float(gs[j]):.3f}")
        else:
            problems.append(f"{what}: missing")
    problems += [f"class {int(gl[j])} score {float(gs[j]):.3f}: extra" for j in lone_g]
    return pairs, excused, problems


def reference(model: DetectorModel, images: Sequence[np.ndarray]) -> tuple[list[Detections], Tensor, Tensor]:
    """PyTorch's detections as ``predict`` computes them (before the mapping back to file pixels), and the
    file's inputs: the transformed images zero-padded only to the largest (h, w), and ``image_sizes (B, 2)``."""
    batch = model.prepare(images)
    sizes = batch["image_sizes"]
    with torch.no_grad():
        dets = detector_of(model).predict(
            batch["images"].to(model.device).contiguous(memory_format=torch.channels_last), sizes)
    h, w = (int(v) for v in sizes.max(0).values)
    return [{k: v.cpu() for k, v in d.items()} for d in dets], batch["images"][..., :h, :w].contiguous(), sizes


def compare(model: DetectorModel, run: Runner, images: Sequence[np.ndarray]) -> ParityReport:
    """Each image alone and the last ones as one padded batch through PyTorch and ``run``; a
    :class:`ParityError` naming the size and the first differences when a detection is unexplained."""
    head = detector_of(model).head
    report = ParityReport(sizes=[f"{im.shape[0]}x{im.shape[1]}" for im in images], images=len(images),
                          score_thr=float(head.score_thr))
    problems: list[str] = []
    for group in [[im] for im in images] + [list(images[1:])]:
        refs, inputs, sizes = reference(model, group)
        boxes, scores, labels = run(inputs, sizes)
        for n, ref in enumerate(refs):
            valid = labels[n] >= 0
            got = {"boxes": boxes[n][valid], "scores": scores[n][valid], "labels": labels[n][valid]}
            pairs, excused, lone = match_image(ref, got, float(head.score_thr), int(labels.shape[1]))
            report.matched, report.near_cut = report.matched + len(pairs), report.near_cut + excused
            report.box_diff = max([report.box_diff] + [b for b, _ in pairs])
            report.score_diff = max([report.score_diff] + [s for _, s in pairs])
            where = f"{int(sizes[n, 0])}x{int(sizes[n, 1])}" + (f" (image {n} of a batch)" if len(refs) > 1 else "")
            problems += [f"{where}: {p}" for p in lone]
    if problems:
        raise ParityError(f"the exported file differs from PyTorch beyond float rounding: {len(problems)} detections "
                          f"without a partner (same class, box within {BOX_TOL} px, score within {SCORE_TOL:g}) and "
                          f"not near a score cut, e.g. {'; '.join(problems[:3])}")
    return report


def check_parity(model: DetectorModel, run: Runner, run_lowered: Callable[[], Runner] | None = None,
                 images: Sequence[np.ndarray] | None = None) -> ParityReport:
    """Compare ``run`` (the exported file) with ``model`` on ``images`` (default :func:`check_images`). When
    neither side detects anything, ``run_lowered()`` (the same export with ``head.score_thr`` at
    :data:`LOWERED_THR`, called while it is lowered) is compared instead; nothing compared is an error."""
    images = check_images() if images is None else images
    report = compare(model, run, images)
    if report.matched + report.near_cut:
        return report
    head = detector_of(model).head
    thr = float(head.score_thr)
    if run_lowered is None or thr <= LOWERED_THR:
        raise ParityError(f"the check compared no detection: neither PyTorch nor the file detects anything above "
                          f"score_thr {thr:g} on {len(images)} images")
    with score_threshold(head, LOWERED_THR):
        report = compare(model, run_lowered(), images)
    if not report.matched + report.near_cut:
        raise ParityError(f"the check compared no detection, even at score_thr {LOWERED_THR:g}")
    report.score_thr, report.lowered_thr = thr, LOWERED_THR
    return report
