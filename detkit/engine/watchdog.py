"""A stall watchdog for multi-process runs: when the run stops making progress, every rank writes its
Python stacks to the work dir and the run exits 1 within ``train.ddp_timeout``, naming the rank that
stalled, instead of hanging until the collective times out (or forever).

Each rank runs one daemon thread. The training loop only records its progress in a tuple (no I/O);
the thread publishes it every ``interval`` seconds in the process group's key-value store, which
still answers while the ranks are blocked in a collective. A rank whose own progress is older than
``limit`` elects one decider (an atomic counter in the store); the decider reads every rank's record,
names the ranks that are not waiting in a collective (the ones the others wait for) and publishes
the message; every rank then dumps its stacks with :mod:`faulthandler` and leaves with
``os._exit(1)``: a thread blocked inside a collective cannot be interrupted any other way.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable

logger = logging.getLogger("detkit")

#: A frame of these files in a thread's stack means it waits for the other ranks: a collective, DDP's
#: buffer broadcast (forward) and gradient all-reduce (inside backward), or detkit's helpers, where a
#: rank on NCCL (whose collectives return at once) blocks: ``any_rank`` reads its flag back to the host.
COLLECTIVE_FILES = ("torch/distributed/", "torch/nn/parallel/distributed.py", "torch/autograd/",
                    "detkit/distributed.py")
#: The stall is declared at this fraction of ``train.ddp_timeout``, so that the stacks are written and
#: every rank has left before the process group's own timeout raises inside the blocked collective.
LIMIT_FRACTION = 0.8
#: A rank whose record has not changed for this many intervals is not responding (dead, or a
#: C call holding the GIL so that its watchdog thread cannot run).
SILENT_INTERVALS = 4
#: Set in a process whose watchdog is stopping the run. The first rank to leave closes its sockets, so a
#: collective the others are blocked in raises ("Connection closed by peer") before their own watchdog
#: exits: that error is a consequence of the stall, not a second fault, and must not print a traceback.
STOPPING = threading.Event()
#: Set while a watchdog thread watches in this process.
RUNNING = threading.Event()
#: How long a running watchdog gets to declare the stop: the first rank to leave may break this rank's
#: collective before this rank's watchdog (one store poll per interval, at most 1 s) has read the decision.
STOP_GRACE = 3.0
#: How long :func:`stopping_the_run` leaves the watchdog to end the process (it needs a few seconds at most).
EXIT_WAIT = 30.0


def stopping_the_run() -> bool:
    """Whether a watchdog is stopping this process (a running one gets :data:`STOP_GRACE` seconds to say
    so). If it is, leave the exit to it: block up to :data:`EXIT_WAIT` seconds (its ``os._exit`` ends the
    process first) and return True."""
    if not STOPPING.wait(STOP_GRACE if RUNNING.is_set() else 0.0):
        return False
    time.sleep(EXIT_WAIT)
    return True


def in_collective(frame: FrameType | None) -> bool:
    """Whether the stack ending at ``frame`` is inside a collective (see :data:`COLLECTIVE_FILES`)."""
    while frame is not None:
        name = frame.f_code.co_filename.replace(os.sep, "/")
        if any(part in name for part in COLLECTIVE_FILES):
            return True
        frame = frame.f_back
    return False


def stall_report(records: dict[int, dict[str, Any]], world: int, timeout: float, stacks: str) -> str:
    """The message naming who stalled, from every rank's record (``step``: steps finished, ``phase``,
    ``idle`` seconds, ``waiting``: in a collective, ``silent``: not responding); ``stacks`` is where
    the stack dumps are."""
    silent = [r for r in range(world) if r not in records or records[r]["silent"]]
    busy = [r for r in range(world) if r not in silent and not records[r]["waiting"]]
    stalled = silent + busy
    idle = max((rec["idle"] for rec in records.values()), default=0.0)
    head = (f"rank{'s' if len(stalled) > 1 else ''} {', '.join(map(str, stalled))} stalled" if stalled else
            "every rank waits in a collective (the ranks called different collectives, or in another order)")

    def state(r: int) -> str:
        if r not in records:
            return f"rank {r}: no report from its watchdog (not started, or the process is gone)"
        rec = records[r]
        what = ("not responding (dead, or blocked holding the GIL)" if r in silent else
                "waiting in a collective" if rec["waiting"] else "not in a collective")
        return f"rank {r}: {rec['phase']}, {what}, last finished step {rec['step']}"

    return (f"{head}: no progress for {idle:.1f} s (train.ddp_timeout {timeout:g} s). "
            f"{'; '.join(state(r) for r in stalled + [r for r in range(world) if r not in stalled])}. "
            f"Python stacks of every rank: {stacks}. Stopping the run; if that work is legitimately this slow, "
            f"raise train.ddp_timeout")


class StallWatchdog:
    """One rank's watchdog thread.

    Args:
        store: a ``torch.distributed`` Store shared by all ranks (a ``PrefixStore`` of the run's).
        rank, world: this rank and the number of ranks.
        timeout: ``train.ddp_timeout`` in seconds; the stall is declared at ``LIMIT_FRACTION`` of it.
        work_dir: where ``stall_rank{rank}.txt`` (the message and this rank's stacks) is written.
        watched: the thread whose progress is recorded (the training loop's; default the main thread).
        exit: called with 1 after the dump (``os._exit``: the watched thread may be blocked in C++).
    """

    def __init__(self, store: Any, rank: int, world: int, timeout: float, work_dir: Path,
                 watched: threading.Thread | None = None, exit: Callable[[int], Any] = os._exit) -> None:
        self.store, self.rank, self.world, self.timeout = store, rank, world, float(timeout)
        self.work_dir, self.exit = Path(work_dir), exit
        self.watched = watched or threading.main_thread()
        self.limit = LIMIT_FRACTION * self.timeout
        self.interval = min(1.0, self.timeout / 20)
        self._progress: tuple[int, str, float] = (0, "starting training", time.monotonic())
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (record number, when it last changed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"detkit-stall-watchdog-{rank}", daemon=True)

    def progress(self, step: int, phase: str) -> None:
        """The watched thread finished ``step`` steps and now does ``phase``; one tuple assignment (atomic)."""
        self._progress = (step, phase, time.monotonic())

    def start(self) -> "StallWatchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self.interval)

    # ----------------------------------------------------------------------------- thread
    def _run(self) -> None:
        RUNNING.set()
        try:
            self._watch()
        finally:  # reached when stopped, when the store is gone, and when a (test's) exit returns
            RUNNING.clear()

    def _watch(self) -> None:
        number = 0
        while not self._stop.wait(self.interval):
            number += 1
            try:
                idle = self._publish(number)
                if self.store.check(["stall"]):
                    return self._abort(self.store.get("stall").decode(), decider=False)
                if idle >= self.limit / 2:  # suspicious: watch whose records still change
                    records = self._records()
                    if idle >= self.limit and self.store.add("deciders", 1) == 1:
                        message = stall_report(records, self.world, self.timeout,
                                               str(self.work_dir / "stall_rank<R>.txt"))
                        self.store.set("stall", message)
                        return self._abort(message, decider=True)
            except RuntimeError as err:  # the store is gone (torch's DistError is a RuntimeError)
                if not self._stop.is_set():
                    logger.warning("stall watchdog of rank %d stopped: the process group's store does not "
                                   "answer (%s)", self.rank, err)
                return

    def _publish(self, number: int) -> float:
        """Write this rank's record; returns the seconds since its last progress."""
        step, phase, since = self._progress
        idle = time.monotonic() - since
        ident = self.watched.ident  # None only before the thread starts
        waiting = ident is not None and in_collective(sys._current_frames().get(ident))
        self.store.set(f"rank{self.rank}", json.dumps({"number": number, "step": step, "phase": phase,
                                                       "idle": round(idle, 1), "waiting": waiting}))
        return idle

    def _records(self) -> dict[int, dict[str, Any]]:
        """Every rank's last record, with ``silent``: it has not changed for ``SILENT_INTERVALS``."""
        now, records = time.monotonic(), {}
        for r in range(self.world):
            if not self.store.check([f"rank{r}"]):
                continue
            record = json.loads(self.store.get(f"rank{r}"))
            if r not in self._seen or self._seen[r][0] != record["number"]:
                self._seen[r] = (record["number"], now)
            record["silent"] = r != self.rank and now - self._seen[r][1] >= SILENT_INTERVALS * self.interval
            records[r] = record
        return records

    def _abort(self, message: str, decider: bool) -> None:
        """Write this rank's stacks, say why, wait (briefly) for the other ranks' dumps, exit 1."""
        STOPPING.set()
        try:
            self._dump_and_exit(message, decider)
        finally:  # reached only when the exit returns (the tests') or the dump raised
            STOPPING.clear()

    def _dump_and_exit(self, message: str, decider: bool) -> None:
        # armed first: a hung file system or a logging lock held by the stalled main thread must not
        # keep this thread from ending the process (faulthandler's timer dumps the stacks to stderr)
        faulthandler.dump_traceback_later(max(10.0, 4 * SILENT_INTERVALS * self.interval), exit=True)
        path = self.work_dir / f"stall_rank{self.rank}.txt"
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(f"{message}\n\nPython stacks of rank {self.rank} (pid {os.getpid()}):\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
        except OSError as err:
            sys.stderr.write(f"rank {self.rank}: cannot write {path} ({err.strerror}); its stacks:\n")
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
        if decider:
            logger.error("%s", message)
        elif self.rank == 0:  # rank 0 keeps log.txt: the message goes there too
            logger.error("%s", message, extra={"file_only": True})
        # torchrun stops the other ranks once one exits: leave only after every rank has written its dump
        deadline = time.monotonic() + max(2.0, SILENT_INTERVALS * self.interval)
        try:
            self.store.add("dumped", 1)
            while self.store.add("dumped", 0) < self.world and time.monotonic() < deadline:
                time.sleep(self.interval / 4)
        except RuntimeError:  # the store went away with another rank: nobody left to wait for
            pass
        for stream in [*logger.handlers, sys.stderr]:
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed stream must not keep a stalled run alive
                pass
        self.exit(1)
        faulthandler.cancel_dump_traceback_later()  # reached only with an exit that returns (the tests')
