"""Finding dataset files on disk as people store them: extensions in any case (``A.JPG``, ``a.TXT``
from Windows tools and some exporters) and sub-folders that are links (a shared image folder linked
into each split), which ``Path.rglob`` before Python 3.13 does not enter."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


def find_files(root: Path, suffixes: Iterable[str]) -> list[Path]:
    """Every file under ``root`` (recursively) whose lower-cased suffix is one of ``suffixes``
    (lower case, with the dot), sorted. Linked folders are entered, each real folder once, so a link
    loop ends and a folder linked twice is not read twice; paths are the ones under ``root``."""
    wanted, seen, found = set(suffixes), set(), []
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()  # the first path to a real folder wins: the same one on every machine
        found += [Path(folder, f) for f in files if os.path.splitext(f)[1].lower() in wanted]
    return sorted(p for p in found if p.is_file())
