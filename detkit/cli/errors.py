"""The one map from errors to exit codes of every command: 2 for a bad config or argument, 1 for bad data, a bad
checkpoint, a failed export or a failed write. The user sees one ``error:`` line, never a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from detkit.analysis import AnalysisError, RunDataError
from detkit.data.annotations import DatasetError
from detkit.engine.checkpoint import CheckpointError
from detkit.engine.hooks.nan_guard import NonFiniteLossError
from detkit.engine.watchdog import stopping_the_run
from detkit.export import ExportError
from detkit.registry import ConfigError

#: First match wins: the subclasses (RunDataError of AnalysisError, FileNotFoundError of OSError) come first.
EXIT_CODES: tuple[tuple[tuple[type[BaseException], ...], int], ...] = (
    ((RunDataError, DatasetError, CheckpointError, NonFiniteLossError, ExportError), 1),
    ((ConfigError, AnalysisError, FileNotFoundError), 2),
    ((OSError,), 1),  # disk full, read-only folder, permissions
)


def exit_code(err: BaseException) -> int | None:
    """The exit code of ``err``, None for an error that is a bug (its traceback is wanted)."""
    return next((code for kinds, code in EXIT_CODES if isinstance(err, kinds)), None)


def message(err: BaseException) -> str:
    """One line: for an OSError its path and reason (``strerror`` without Python's ``[Errno N]``)."""
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
        return f"{err.filename}: {err.strerror or err}" if err.filename else str(err.strerror or err)
    return str(err)


def run_guarded(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``func(args)``, its user errors reported as one ``error:`` line on stderr with their exit code."""
    try:
        return func(args)
    except Exception as err:
        if stopping_the_run():  # a collective broken by the stall stop: the watchdog reported it and exits;
            print(f"error: {message(err)}", file=sys.stderr)  # here only if it has not within EXIT_WAIT
            return 1
        code = exit_code(err)
        if code is None:
            raise
        print(f"error: {message(err)}", file=sys.stderr)
        return code
