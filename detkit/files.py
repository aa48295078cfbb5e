"""Writing outputs without harming inputs: whether a path lies under a folder, and a file replaced only once
its new content is complete (``export``, ``convert``, ``eval --show-dir``, ``analyze curves``)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies under it, links resolved (neither needs to exist)."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


@contextmanager
def replaced_on_success(path: str | os.PathLike) -> Iterator[Path]:
    """A temp file beside ``path`` to write to, moved over ``path`` (``os.replace``) when the block ends without
    an error and removed when it raises: a failed write or check leaves a previous ``path`` as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; the result should read like any file
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
