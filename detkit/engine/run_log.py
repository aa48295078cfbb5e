"""Where a run reports: log.txt + console, metrics.jsonl, tensorboard, tqdm (rank 0 only)."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

logger = logging.getLogger("detkit")


def setup_logging(work_dir: Path | None, rank: int) -> None:
    """Console + ``work_dir/log.txt`` for rank 0; warnings only from other ranks."""
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if work_dir is not None and rank == 0:
        work_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(work_dir / "log.txt")
        file.setFormatter(fmt)
        logger.addHandler(file)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


class RunLog:
    """Scalars to ``metrics.jsonl`` and tensorboard; images to tensorboard. No-ops off rank 0."""

    def __init__(self, work_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.metrics_path = work_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(work_dir / "tb"))

    def record(self, kind: str, step: int, values: dict[str, Any], tb_prefix: str) -> None:
        """Append ``{"type": kind, **values}`` to metrics.jsonl and every number to tensorboard."""
        if not self.enabled:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(_jsonable({"type": kind, **values})) + "\n")
        for key, value in _flatten(values):
            if isinstance(value, (int, float)) and key not in ("epoch", "iter"):
                self.writer.add_scalar(f"{tb_prefix}/{key}", value, step)

    def image(self, tag: str, image: Any, step: int) -> None:
        if self.enabled:
            self.writer.add_image(tag, image, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _flatten(values: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on a terminal; on a pipe (CI) no bar: the trainer logs periodic lines instead."""
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False,
                disable=not (enabled and sys.stderr.isatty()))
