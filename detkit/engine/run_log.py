"""Console + ``log.txt`` logging and tqdm bars (rank 0 only)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

logger = logging.getLogger("detkit")
_ACTIVE_BARS: list[tqdm] = []


def bar_active() -> bool:
    """Whether a tqdm bar is drawn on the console right now (its numbers replace the log lines there)."""
    return any(not bar.disable for bar in _ACTIVE_BARS)


class _ConsoleFilter(logging.Filter):
    """Drop records marked ``file_only`` from the console (they still reach ``log.txt``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def setup_logging(work_dir: Path | None, rank: int) -> None:
    """Console + ``work_dir/log.txt`` for rank 0; warnings only from other ranks."""
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.addFilter(_ConsoleFilter())
    logger.addHandler(console)
    if work_dir is not None and rank == 0:
        work_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(work_dir / "log.txt")
        file.setFormatter(fmt)
        logger.addHandler(file)


class progress:
    """A tqdm bar on a terminal (kept on screen when ``leave``); no bar on a pipe (CI), where the
    log lines say the same. Usable as an iterable wrapper or, with ``iterable=None``, by ``update()``."""

    def __init__(self, iterable: Iterable | None, total: int, desc: str, enabled: bool, leave: bool = False,
                 initial: int = 0) -> None:
        self.bar = tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=leave, initial=initial,
                        disable=not (enabled and sys.stderr.isatty()))
        _ACTIVE_BARS.append(self.bar)

    def __iter__(self) -> Any:
        try:
            yield from self.bar
        finally:
            self.close()

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        if postfix is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar in _ACTIVE_BARS:
            _ACTIVE_BARS.remove(self.bar)
        self.bar.close()
