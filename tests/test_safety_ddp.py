"""Multi-process runs never hang silently: the stall watchdog (train.ddp_timeout) and the per-epoch
step-count check, in one process (fast) and through torchrun with 2 gloo processes (slow)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist
from torch import nn

from detkit.cli.errors import run_guarded
from detkit.engine import watchdog
from detkit.engine.hooks import StallWatchdogHook, build_hooks
from detkit.engine.hooks import watchdog as watchdog_hook
from detkit.engine.settings import TrainSettings
from detkit.engine.watchdog import StallWatchdog, stall_report
from detkit.registry import ConfigError
from tests.cli_runner import run_main, tiny_shapes

ROOT = Path(__file__).resolve().parents[1]
FCOS_CFG = ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"


def with_ddp_timeout(folder: Path, value: str) -> Path:
    """The default config with ``train.ddp_timeout: value`` (YAML text), as a user's config file sets it."""
    path = folder / "cfg.yaml"
    path.write_text(f"_base_: {FCOS_CFG}\ntrain: {{ddp_timeout: {value}}}\n")
    return path


def blocked(event: threading.Event, filename: str | None = None) -> None:
    """Wait for ``event``; with ``filename``, in a frame of that file (a collective's, for the watchdog)."""
    if filename is None:
        event.wait()
    else:
        exec(compile("event.wait()", filename, "exec"), {"event": event})


def test_watchdog_names_the_rank_that_is_not_in_a_collective(tmp_path):
    """Two ranks as threads on one store: rank 0 waits in a collective, rank 1 is stuck elsewhere."""
    store, release, exits = dist.HashStore(), threading.Event(), []
    waiting = os.path.join("site-packages", "torch", "distributed", "distributed_c10d.py")
    ranks = [threading.Thread(target=blocked, args=(release, waiting), daemon=True),
             threading.Thread(target=blocked, args=(release,), daemon=True)]
    def exit(code: int) -> None:
        exits.append((code, watchdog.STOPPING.is_set()))

    dogs = [StallWatchdog(store, r, 2, 1.0, tmp_path, watched=t, exit=exit) for r, t in enumerate(ranks)]
    start = time.monotonic()
    for dog, thread in zip(dogs, ranks):
        dog.progress(1, "in step 2")
        thread.start()
        dog.start()
    while len(exits) < 2 and time.monotonic() - start < 10:
        time.sleep(0.02)
    elapsed = time.monotonic() - start
    release.set()
    for dog in dogs:
        dog.stop()
    assert [code for code, _ in exits] == [1, 1] and elapsed < 1.0 + 0.5  # within ddp_timeout, plus scheduling slack
    assert exits[0][1]  # set while stopping (one event per process: these two threads share it)
    for r in (0, 1):
        text = (tmp_path / f"stall_rank{r}.txt").read_text()
        assert text.startswith("rank 1 stalled: no progress for")
        assert "rank 1: in step 2, not in a collective, last finished step 1" in text
        assert "rank 0: in step 2, waiting in a collective, last finished step 1" in text
        assert f"Python stacks of rank {r}" in text and "in blocked" in text  # faulthandler's dump
    assert not watchdog.STOPPING.is_set()  # cleared when the (test's) exit returns


def test_an_error_from_a_collective_the_stall_stop_broke_prints_no_traceback(monkeypatch, capsys):
    """The first rank to leave breaks the others' collective ("Connection closed by peer") before their
    watchdog exits: the CLI leaves the exit to the watchdog instead of printing that error's traceback."""
    def broken_collective(args):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer")

    monkeypatch.setattr(watchdog, "EXIT_WAIT", 0.01)
    monkeypatch.setattr(watchdog, "STOP_GRACE", 0.5)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):  # no watchdog: a bug's traceback
        run_guarded(broken_collective, argparse.Namespace())
    watchdog.RUNNING.set()
    try:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="Connection closed by peer"):  # a watchdog that stops nothing
            run_guarded(broken_collective, argparse.Namespace())
        assert time.monotonic() - start >= 0.5  # after its grace
        declares = threading.Timer(0.1, watchdog.STOPPING.set)  # the decision read a moment after the break
        declares.start()
        assert run_guarded(broken_collective, argparse.Namespace()) == 1
        declares.join()
    finally:
        watchdog.STOPPING.clear()
        watchdog.RUNNING.clear()
    # one line, and only because the (real) watchdog's exit did not come within EXIT_WAIT
    assert capsys.readouterr().err == "error: [gloo/transport/tcp/pair.cc:561] Connection closed by peer\n"


def test_stall_report_names_silent_ranks_and_mismatched_collectives():
    rec = {"step": 7, "phase": "in step 8", "idle": 4.0, "waiting": True, "silent": False}
    all_waiting = stall_report({0: rec, 1: rec}, 2, 5, "w/stall_rank<R>.txt")
    assert all_waiting.startswith("every rank waits in a collective (the ranks called different collectives")
    one_gone = stall_report({0: rec, 1: {**rec, "silent": True}}, 3, 5, "w/stall_rank<R>.txt")
    assert one_gone.startswith("ranks 1, 2 stalled: no progress for 4.0 s (train.ddp_timeout 5 s)")
    assert "rank 1: in step 8, not responding (dead, or blocked holding the GIL)" in one_gone
    assert "rank 2: no report from its watchdog" in one_gone and "raise train.ddp_timeout" in one_gone


def test_unequal_step_counts_stop_every_rank(tmp_path, monkeypatch):
    hook = StallWatchdogHook(5.0)
    hook.watchdog = StallWatchdog(dist.HashStore(), 0, 2, 5.0, tmp_path)  # not started: progress only
    trainer = SimpleNamespace(epoch=2, inner=0, steps_per_epoch=5, loader=[None] * 5, accumulate=1)
    monkeypatch.setattr(watchdog_hook, "all_gather_objects", lambda steps: [steps, steps - 1])
    with pytest.raises(ConfigError, match=r"epoch 3: the ranks would run different numbers of steps "
                                          r"\(rank 0: 5, rank 1: 4\), and DDP would hang"):
        hook.before_epoch(trainer)
    monkeypatch.setattr(watchdog_hook, "all_gather_objects", lambda steps: [steps, steps])
    hook.before_epoch(trainer)


def test_single_process_runs_have_no_watchdog():
    hooks = build_hooks({}, TrainSettings(), None, nn.Linear(1, 1))
    assert not any(isinstance(h, StallWatchdogHook) for h in hooks)


@pytest.mark.parametrize("value", ["0", "-3", ".inf", "true", "soon"])
def test_bad_ddp_timeout_is_refused_before_anything_is_written(tmp_path, value):
    work = tmp_path / "w"
    proc = run_main("train", "--config", str(with_ddp_timeout(tmp_path, value)), "--work-dir", str(work), "--device",
                    "cpu", "--set", *tiny_shapes(tmp_path / "data"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: train.ddp_timeout must be a number of seconds > 0" in proc.stderr
    assert not work.exists()


SLEEPER = '''
import time
from pathlib import Path

from detkit.engine import HOOKS, Hook


@HOOKS.register()
class SleepOnRank1(Hook):
    """Rank 1 stops inside its second step (before its forward): rank 0 waits for it in a collective."""

    def before_step(self, trainer):
        if trainer.rank == 1 and trainer.inner == 1:
            Path("rank1_sleeps").write_text(str(time.time()))
            time.sleep(300)
'''


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_run_with_a_stalled_rank_exits_within_the_timeout(tmp_path):
    (tmp_path / "stall_hooks.py").write_text(SLEEPER)
    work, timeout = tmp_path / "work", 6.0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tools/train.py"), "--config", str(with_ddp_timeout(tmp_path, str(timeout))), "--work-dir",
         str(work), "--device", "cpu", "--set", *tiny_shapes(tmp_path / "data"), "data.train.num_images=8",
         "imports=[stall_hooks]", "train.hooks=[{type: SleepOnRank1}]"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ended, log = time.time(), proc.stderr[-4000:]
    assert proc.returncode != 0, log
    sleeps = float((tmp_path / "rank1_sleeps").read_text())
    dumped = [(work / f"stall_rank{r}.txt").stat().st_mtime - sleeps for r in (0, 1)]
    assert max(dumped) < timeout and ended - sleeps < timeout + 15, (dumped, ended - sleeps, log)  # + torchrun's exit
    for line in ("rank 1 stalled: no progress for", "rank 1: in step 2, not in a collective, last finished step 1",
                 "rank 0: in step 2, waiting in a collective, last finished step 1"):
        assert line in proc.stderr, log
    # the one traceback is torchrun's own summary of the failed workers (ChildFailedError), not a rank's
    assert all("torch/distributed/run.py" in block[:800] for block in proc.stderr.split("Traceback")[1:]), log
    for r in (0, 1):
        stacks = (work / f"stall_rank{r}.txt").read_text()
        assert "Python stacks of rank" in stacks and 'File "' in stacks
    assert "in before_step" in (work / "stall_rank1.txt").read_text()  # where rank 1 sleeps
    assert "rank 1 stalled" in (work / "log.txt").read_text()
