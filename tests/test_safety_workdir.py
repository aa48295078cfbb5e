"""Work-dir safety: one live run per folder, no silent mixing of runs, no leftovers of killed saves,
nothing written before the config is validated, disk errors named with the previous file intact."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detkit.engine.checkpoint import (
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from detkit.engine.workdir import WorkDirLock
from detkit.registry import ConfigError
from tests.cli_runner import run_main, tiny_shapes

ROOT = Path(__file__).resolve().parents[1]
FCOS_CFG = ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"


def train(tmp_path: Path, work: Path, *extra: str):
    return run_main("train", "--config", str(FCOS_CFG), "--work-dir", str(work), "--device", "cpu", "--set",
                    *tiny_shapes(tmp_path / "data"), *extra)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_live_run_locks_its_work_dir_and_a_killed_one_does_not(tmp_path):
    work = tmp_path / "w"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from detkit.engine.workdir import WorkDirLock; lock = WorkDirLock(Path(sys.argv[1])).acquire(); "
                               "print('locked', flush=True); time.sleep(60)", str(work)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match=rf"{work} is in use by a running detkit \(PID {holder.pid}\)"):
        WorkDirLock(work).acquire()
    proc = train(tmp_path, work)
    assert proc.returncode == 2 and f"(PID {holder.pid})" in proc.stderr and "Traceback" not in proc.stderr
    holder.kill()  # like kill -9: the kernel drops the lock with the process
    holder.wait()
    WorkDirLock(work).acquire().release()


@pytest.mark.slow
def test_a_new_run_never_mixes_with_an_old_one(tmp_path):
    work = tmp_path / "w"
    assert train(tmp_path, work).returncode == 0
    before = snapshot(work)
    proc = train(tmp_path, work)
    assert proc.returncode == 2 and "already holds a run (best.pth, epoch_1.pth, latest.pth, model_final.pth)" in proc.stderr
    assert "--resume" in proc.stderr and "--overwrite" in proc.stderr
    assert snapshot(work) == before  # nothing touched, not even config.yaml or log.txt
    proc = train(tmp_path, work, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert "--overwrite: removed" in proc.stderr and load_checkpoint(work / "latest.pth")["epoch"] == 1


def test_leftover_temp_files_are_removed_and_resume_takes_the_most_iterations(tmp_path):
    work = tmp_path / "w"
    save_checkpoint({"model": {}, "epoch": 2, "iter": 20}, work / "epoch_2.pth")
    save_checkpoint({"model": {}, "epoch": 1, "iter": 10}, work / "latest.pth")  # e.g. copied back by hand
    (work / ".latest.pth.abc123.tmp").write_bytes(b"half a checkpoint")  # a kill -9 during a save
    from detkit.engine.checkpoint import remove_stale_temp_files
    from detkit.engine.plan import resume_state

    path, state = resume_state("auto", work)
    assert path.name == "epoch_2.pth" and state["iter"] == 20
    assert [p.name for p in remove_stale_temp_files(work)] == [".latest.pth.abc123.tmp"]  # run at every start,
    assert not list(work.glob(".*.tmp"))  # once the work dir's lock is held
    assert find_resume_checkpoint(work)[0].name == "epoch_2.pth"


@pytest.mark.parametrize("code, meaning", [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only")])
def test_disk_errors_name_the_path_and_keep_the_previous_checkpoint(tmp_path, monkeypatch, code, meaning):
    from detkit.engine.checkpoint import CheckpointError

    path = tmp_path / "latest.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 1}, path)

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=rf"cannot write {path}: .*{meaning}"):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["latest.pth"]
