"""``export --val``: an exported file's COCO AP on the checkpoint config's ``data.val``, run through its own
runtime, next to the PyTorch model's AP on the same images.

Both are scored as ``detkit eval`` scores a checkpoint: the val loader of the config (its transforms, padding to
``size_divisor``), boxes mapped back to the original pixels, the model's classes matched to the val set's by
name, COCOeval with ``eval.backend``. PyTorch runs the exported weights (BatchNorm folded) in fp32 on the CPU, the
precision of the exported file, so a difference measures the export and not autocast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from detkit.api import DetectorModel
from detkit.data.loader import build_dataloader
from detkit.deploy.parity import Runner
from detkit.engine.evaluator import EvalSettings, eval_classes, evaluate_model
from detkit.registry import ConfigError

VAL_TOL = 0.5  # AP points (0-100 scale) the exported file may lose against PyTorch before --val refuses it
CPU = torch.device("cpu")


class ValidationError(RuntimeError):
    """The exported file's val AP is lower than PyTorch's by more than the tolerance (message: both numbers)."""


class RuntimeDetector(nn.Module):
    """An exported file's runner behind a detector's ``predict(images (B, 3, H, W), image_sizes (B, 2))`` ->
    per image ``{"boxes" (n, 4), "scores" (n,), "labels" (n,)}`` (empty slots dropped), so that
    :func:`~detkit.engine.evaluator.evaluate_model` scores it exactly as it scores a detector."""

    def __init__(self, run: Runner) -> None:
        super().__init__()
        self.run = run

    def predict(self, images: Tensor, image_sizes: Tensor) -> list[dict[str, Tensor]]:
        boxes, scores, labels = self.run(images.cpu(), torch.as_tensor(image_sizes, dtype=torch.int64).reshape(-1, 2))
        keep = labels >= 0
        return [{"boxes": b[k], "scores": s[k], "labels": c[k]} for b, s, c, k in zip(boxes, scores, labels, keep)]


@dataclass
class ValReport:
    """``pytorch`` and ``exported`` COCO metrics (fractions, as the evaluator returns them) on ``num_images``."""

    fmt: str
    pytorch: dict[str, Any]
    exported: dict[str, Any]
    num_images: int
    tol: float

    @property
    def drop(self) -> float:
        """AP points (0-100) the exported file loses against PyTorch (negative: it scores higher)."""
        return 100 * (self.pytorch["AP"] - self.exported["AP"])

    def summary(self) -> str:
        return (f"val AP on {self.num_images} images of data.val: {self.fmt} {100 * self.exported['AP']:.2f}, "
                f"PyTorch fp32 {100 * self.pytorch['AP']:.2f} ({round(-self.drop, 2) + 0.0:+.2f} AP points; tolerance "
                f"{self.tol:g})")


class Validation:
    """What ``--val`` needs before anything is exported (so a missing val set fails first): the val loader,
    the classes it scores and PyTorch's metrics on it; :meth:`check` then scores an exported file's runner."""

    def __init__(self, model: DetectorModel, tol: float = VAL_TOL) -> None:
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
            raise ConfigError(f"--val-tol must be a number of AP points >= 0, got {tol!r}")
        cfg = model.config
        if "val" not in (cfg.get("data") or {}):
            raise ConfigError("--val evaluates on data.val, and the checkpoint's config has none")
        self.tol, self.backend = float(tol), EvalSettings.from_config(cfg).backend
        self.loader = build_dataloader(cfg["data"], "val")
        self.classes = eval_classes(self.loader.dataset, model.classes, len(model.classes), "the checkpoint")
        self.pytorch, self.num_images = self.evaluate(model.model.to(CPU), "eval pytorch")

    def evaluate(self, detector: nn.Module, desc: str) -> tuple[dict[str, Any], int]:
        """COCO metrics of ``detector`` (anything with ``predict(images, image_sizes)``) and images scored."""
        ev = evaluate_model(detector, self.loader, CPU, None, desc=desc, backend=self.backend, classes=self.classes)
        return ev.metrics, ev.num_images

    def check(self, run: Runner, fmt: str) -> ValReport:
        """The exported file's metrics next to PyTorch's; :class:`ValidationError` with both APs when it loses
        more than the tolerance."""
        exported, _ = self.evaluate(RuntimeDetector(run), f"eval {fmt}")
        report = ValReport(fmt, self.pytorch, exported, self.num_images, self.tol)
        if report.drop > self.tol:
            raise ValidationError(f"the exported {fmt} file scores val AP {100 * exported['AP']:.2f} against "
                                  f"PyTorch's {100 * self.pytorch['AP']:.2f} on {self.num_images} images of "
                                  f"data.val: {report.drop:.2f} AP points lower, more than --val-tol {self.tol:g}")
        return report
