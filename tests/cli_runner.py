"""Running the real CLI entry point (``detkit.cli.main``) in this process: the same code path as
``tools/*.py`` without a new interpreter and torch import for every call."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

from detkit.cli import main


def run_main(*args: str) -> SimpleNamespace:
    """``main(args)`` -> ``returncode``, ``stdout``, ``stderr`` (the log goes to stderr, as in a terminal)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
