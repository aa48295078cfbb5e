"""Work-dir safety: one live run per folder, and a new run never silently mixes with an old one."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
from pathlib import Path
from typing import IO

from detkit.engine.checkpoint import EPOCH_FILE
from detkit.registry import ConfigError

logger = logging.getLogger("detkit")
RUN_FILES = ("latest.pth", "best.pth", "model_final.pth", "metrics.jsonl", "log.txt", "load_from.txt", "config.yaml",
             "results.png")
RUN_FOLDERS = ("tb", "results")
#: The diagnostics of training's evaluations (``eval_epoch_N/``).
EVAL_EPOCH_FOLDER = re.compile(r"^eval_epoch_\d+$")
#: The stall watchdog's reports (``stall_rank<R>.txt``, :mod:`detkit.engine.watchdog`).
STALL_FILE = re.compile(r"^stall_rank\d+\.txt$")


def previous_run(work_dir: Path) -> list[str]:
    """Names of the checkpoints of an earlier run in ``work_dir`` (empty when there is none)."""
    if not work_dir.is_dir():
        return []
    return sorted(p.name for p in work_dir.iterdir()
                  if p.name in ("latest.pth", "best.pth", "model_final.pth") or EPOCH_FILE.match(p.name))


def run_files(work_dir: Path) -> list[Path]:
    """What a run (and ``eval``/``--eval-only`` into it) wrote in ``work_dir``: checkpoints, logs, ``tb/``,
    ``results/``, ``results.png``, ``stall_rank<R>.txt``, ``eval_epoch_N/`` and ``eval_<checkpoint>/``
    folders (those holding an evaluation's ``results.json``)."""
    if not work_dir.is_dir():
        return []
    return sorted(p for p in work_dir.iterdir() if p.name in RUN_FILES or EPOCH_FILE.match(p.name)
                  or STALL_FILE.match(p.name) or (p.is_dir() and (
        p.name in RUN_FOLDERS or EVAL_EPOCH_FOLDER.match(p.name)
        or (p.name.startswith("eval_") and (p / "results.json").is_file()))))


def check_new_run(work_dir: Path, overwrite: bool, resuming: bool = False) -> None:
    """A new run refuses a folder holding another run's checkpoints unless ``overwrite``. ``resuming``
    (``--resume`` found no readable training checkpoint): any file of an earlier run refuses too, with
    what to do instead of resuming (a new run there would mix with that run's logs)."""
    if overwrite:
        return
    if resuming:
        left = run_files(work_dir)
        if left:
            names = ", ".join(p.name for p in left[:6]) + (", ..." if len(left) > 6 else "")
            raise ConfigError(f"--resume: {work_dir} holds no readable training checkpoint (latest.pth or "
                              f"epoch_N.pth) to continue, only an earlier run's files ({names}). Start the run "
                              f"again with --overwrite (deletes them), or use another --work-dir (with --load-from "
                              f"{work_dir}/best.pth to start from its weights, where it has them)")
        logger.info("--resume: no checkpoint in %s; starting a new run", work_dir)
        return
    found = previous_run(work_dir)
    if found:
        raise ConfigError(f"{work_dir} already holds a run ({', '.join(found[:4])}); continue it with --resume, "
                          f"start elsewhere with --work-dir DIR, or pass --overwrite to delete its files first")


def clear_previous_run(work_dir: Path) -> None:
    """``--overwrite``: delete everything :func:`run_files` names."""
    removed = run_files(work_dir)
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if removed:
        logger.info("--overwrite: removed %s from %s", ", ".join(sorted(p.name for p in removed)), work_dir)


class WorkDirLock:
    """``work_dir/.lock`` held with ``flock`` while a run lives: the kernel releases it when the process
    dies (``kill -9`` included), so a lock left by a killed run is simply taken over. The file holds
    the owner's PID for the message a second run gets."""

    def __init__(self, work_dir: Path) -> None:
        self.path = work_dir / ".lock"
        self.file: IO[str] | None = None

    def acquire(self) -> "WorkDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            owner = file.read().strip() or "unknown"
            file.close()
            raise ConfigError(f"{self.path.parent} is in use by a running detkit (PID {owner}); wait for it to "
                              f"finish or stop it, or use another --work-dir") from None
        file.seek(0)
        file.truncate()
        file.write(str(os.getpid()))
        file.flush()
        self.file = file
        return self

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
            self.file = None
