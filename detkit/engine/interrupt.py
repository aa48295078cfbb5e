"""Clean stops on SIGINT / SIGTERM: stop at the next safe point (after a step, between evaluation batches),
save, exit 130 / 143; a second signal exits at once."""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

import torch

from detkit.distributed import any_rank

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        self.reason = signal.Signals(signum).name
        self.resume_command = ""
        super().__init__(f"training interrupted by {self.reason}")


class InterruptWatch:
    """Within ``with``: the first SIGINT/SIGTERM only sets a flag (``check()`` reads it, all ranks
    agreeing under DDP); a second one exits the process immediately. Handlers are restored on exit.
    Outside the main thread (signals cannot be caught there) it watches nothing."""

    def __init__(self) -> None:
        self.signum: int = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:
            sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting now without saving\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after this step or evaluation batch, then "
                         "saving latest.pth (send it again to exit at once)\n")
        sys.stderr.flush()

    def __enter__(self) -> "InterruptWatch":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def check(self) -> bool:
        """True once a signal arrived on any rank; the same signal number is then set on every rank."""
        if not any_rank(torch.tensor(self.signum > 0)):
            return False
        self.signum = self.signum or signal.SIGTERM
        return True
