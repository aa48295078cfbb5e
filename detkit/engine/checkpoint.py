"""Atomic checkpoints: a crash or a kill during a save never leaves a truncated file behind."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("detkit")

EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pth$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or holds what a checkpoint must not (names the file)."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to a temp file in the same folder, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint should read like any file
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; unreadable files raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated zip, bad pickle, wrong format: all mean "corrupt"
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated and cannot be loaded "
                              f"({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a detkit checkpoint (expected a dict with 'model', got "
                              f"{type(state).__name__}{' with keys ' + str(sorted(state)) if isinstance(state, dict) else ''})")
    return state


def epoch_checkpoints(work_dir: Path) -> list[Path]:
    """``epoch_N.pth`` files of ``work_dir``, newest epoch first."""
    found = [(int(m.group(1)), p) for p in work_dir.glob("epoch_*.pth") if (m := EPOCH_FILE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_resume_checkpoint(work_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint of ``work_dir``: ``latest.pth``, else the newest ``epoch_N.pth``.

    Unreadable candidates are skipped with a warning that names them; None when there is none.
    """
    work_dir = Path(work_dir)
    for path in [work_dir / "latest.pth", *epoch_checkpoints(work_dir)]:
        if not path.is_file():
            continue
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            logger.warning("auto-resume: skipping %s", err)
            continue
        if path.name != "latest.pth":
            logger.warning("auto-resume: latest.pth unreadable or missing; falling back to %s", path)
        return path, state
    return None


def prune_epoch_checkpoints(work_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` ``epoch_N.pth`` files (``keep <= 0``: keep all)."""
    if keep <= 0:
        return
    for path in epoch_checkpoints(Path(work_dir))[keep:]:
        path.unlink(missing_ok=True)
