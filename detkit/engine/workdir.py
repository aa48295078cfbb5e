"""Work-dir safety: one live run per folder, and a new run never silently mixes with an old one."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path
from typing import IO

from detkit.engine.checkpoint import EPOCH_FILE
from detkit.registry import ConfigError

logger = logging.getLogger("detkit")
RUN_FILES = ("latest.pth", "best.pth", "model_final.pth", "metrics.jsonl", "log.txt", "load_from.txt", "config.yaml")
RUN_FOLDERS = ("tb", "results")


def previous_run(work_dir: Path) -> list[str]:
    """Names of the checkpoints of an earlier run in ``work_dir`` (empty when there is none)."""
    if not work_dir.is_dir():
        return []
    return sorted(p.name for p in work_dir.iterdir()
                  if p.name in ("latest.pth", "best.pth", "model_final.pth") or EPOCH_FILE.match(p.name))


def check_new_run(work_dir: Path, overwrite: bool) -> None:
    """A new run (no ``--resume``) refuses a folder holding another run's checkpoints unless ``overwrite``."""
    found = previous_run(work_dir)
    if found and not overwrite:
        raise ConfigError(f"{work_dir} already holds a run ({', '.join(found[:4])}); continue it with --resume, "
                          f"start elsewhere with --work-dir DIR, or pass --overwrite to delete its files first")


def clear_previous_run(work_dir: Path) -> None:
    """``--overwrite``: delete the earlier run's checkpoints, logs, tensorboard and results."""
    removed = [p for p in work_dir.iterdir() if p.name in RUN_FILES or EPOCH_FILE.match(p.name)
               or (p.name in RUN_FOLDERS and p.is_dir())] if work_dir.is_dir() else []
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
