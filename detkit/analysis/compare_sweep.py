"""Running the training runs of a comparison: one after another, or one per GPU in parallel; progress
with an ETA; each run's wall time kept next to its console output in ``OUT/logs/``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from detkit.analysis.compare_report import format_duration
from detkit.engine.checkpoint import EPOCH_FILE

#: ``launcher(argv, env, log_path) -> exit code`` runs ``python -m detkit <argv>`` with ``env`` added to the
#: environment and its console output appended to ``log_path``.
Launcher = Callable[[list[str], dict[str, str], Path], int]
#: Exit codes of a run stopped by Ctrl-C (SIGINT) or SIGTERM after saving ``latest.pth``.
INTERRUPTED = (130, 143)
#: How a run is started: the ``python -m detkit`` of this interpreter.
DETKIT = [sys.executable, "-m", "detkit"]


@dataclass(frozen=True)
class Run:
    """One training run of the sweep: ``config`` with ``overrides`` and ``train.seed=seed`` into ``work_dir``."""

    label: str
    config: str
    overrides: tuple[str, ...]
    seed: int
    work_dir: Path

    @property
    def name(self) -> str:
        return f"{self.label}/seed{self.seed}"

    def argv(self) -> list[str]:
        """The ``train`` command line: ``--resume`` where the work dir holds a training checkpoint (an
        interrupted run continues), ``--overwrite`` where it holds only what a run wrote before its first
        checkpoint (nothing to continue: it starts again), neither for a new run."""
        names = [p.name for p in self.work_dir.iterdir()] if self.work_dir.is_dir() else []
        if "latest.pth" in names or any(EPOCH_FILE.match(n) for n in names):
            start = ["--resume"]
        else:
            start = ["--overwrite"] if names else []
        return ["train", "--config", self.config, "--work-dir", str(self.work_dir), *start,
                "--set", *self.overrides, f"train.seed={self.seed}"]


def subprocess_launcher(argv: list[str], env: dict[str, str], log_path: Path) -> int:
    """``python -m detkit <argv>`` as a child process. On Ctrl-C the child (same process group) gets the
    signal too: it saves ``latest.pth`` and exits, and we wait for it rather than kill it."""
    with open(log_path, "a") as log:
        child = subprocess.Popen([*DETKIT, *argv], env={**os.environ, **env},
                                 stdout=log, stderr=subprocess.STDOUT)
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                continue


def _wall_file(log_dir: Path, run: Run) -> Path:
    return log_dir / f"{run.label}-seed{run.seed}.json"


def recorded_wall(log_dir: Path, run: Run) -> float | None:
    """Seconds the run's training processes took (every launch summed), None when not launched by compare."""
    path = _wall_file(log_dir, run)
    return float(json.loads(path.read_text())["wall_s"]) if path.is_file() else None


class Sweep:
    """Launches ``runs`` (``devices``: one run per device at a time, ``CUDA_VISIBLE_DEVICES`` set; none: one
    at a time in this thread) and prints ``[done/total] run: ... ETA``; the ETA is the mean wall time of
    the runs finished so far times the runs left, over the parallel slots."""

    def __init__(self, runs: Sequence[Run], log_dir: Path, launcher: Launcher, devices: Sequence[str] = (),
                 total: int | None = None, done: int = 0) -> None:
        self.runs, self.log_dir, self.launcher, self.devices = list(runs), log_dir, launcher, list(devices)
        self.total, self.done = total or len(runs), done
        self.walls: list[float] = []
        self.failed: list[tuple[Run, int]] = []
        self.lock = threading.Lock()

    def _launch(self, run: Run, device: str | None) -> int:
        env = {} if device is None else {"CUDA_VISIBLE_DEVICES": device}
        log = self.log_dir / f"{run.label}-seed{run.seed}.txt"
        start = time.time()
        code = self.launcher(run.argv(), env, log)
        wall = time.time() - start
        with self.lock:
            previous = recorded_wall(self.log_dir, run) or 0.0
            _wall_file(self.log_dir, run).write_text(json.dumps({"wall_s": previous + wall}) + "\n")
            self.done += code == 0
            self.walls.append(wall)
            left = self.total - self.done
            slots = max(1, len(self.devices))
            stopped = code in INTERRUPTED
            eta = sum(self.walls) / len(self.walls) * left / slots
            eta_text = f"; ETA {format_duration(eta)}" if left and not stopped else ""
            status = ("finished" if code == 0 else "interrupted (latest.pth saved)" if stopped
                      else f"FAILED (exit {code}; output: {log})")
            print(f"[{self.done}/{self.total}] {run.name} {status} in {format_duration(wall)}"
                  f"{'' if device is None else f' on GPU {device}'}{eta_text}", flush=True)
            if code != 0 and not stopped:
                self.failed.append((run, code))
                tail = log.read_text(errors="replace").splitlines()[-8:] if log.is_file() else []
                print("\n".join(f"    {line}" for line in tail), flush=True)
        return code

    def run(self) -> bool:
        """Run everything (stopping at an interrupt: Ctrl-C exits 130 in a run); False when interrupted."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not self.devices:
            for run in self.runs:
                if self._launch(run, None) in INTERRUPTED:
                    return False
            return True
        return self._parallel()

    def _parallel(self) -> bool:
        queue, free = list(self.runs), list(self.devices)
        running: dict[Future, str] = {}
        stopped = False
        with ThreadPoolExecutor(max_workers=len(self.devices)) as pool:
            while queue or running:
                while queue and free and not stopped:
                    device = free.pop(0)
                    running[pool.submit(self._launch, queue.pop(0), device)] = device
                if not running:
                    break
                try:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                except KeyboardInterrupt:  # the children got it too and are saving: wait for them
                    stopped = True
                    continue
                for future in finished:
                    free.append(running.pop(future))
                    stopped |= future.result() in INTERRUPTED
        return not stopped
