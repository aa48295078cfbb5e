"""The trainer end to end through the real CLI on tiny configs: files, resume, safety nets, DDP."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detkit.config import load_config
from detkit.engine import (
    CheckpointError,
    Hook,
    NonFiniteLossError,
    build_trainer,
    load_checkpoint,
    save_checkpoint,
)
from detkit.engine.settings import TrainSettings
from detkit.losses import WeightedLoss
from detkit.registry import LOSSES
from tests.cli_runner import run_main

ROOT = Path(__file__).resolve().parents[1]
FCOS_CFG = ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"
CENTERNET_CFG = ROOT / "configs/centernet/centernet_r18_shapes.yaml"


def tiny(data_root: Path, epochs: int = 2, images: int = 8) -> list[str]:
    """Overrides that shrink a shapes config to seconds per epoch."""
    return [f"data.train.root={data_root}", f"data.val.root={data_root}", f"data.train.num_images={images}",
            "data.val.num_images=4", "data.train.image_size=64", "data.val.image_size=64", "data.batch_size=4",
            "data.num_workers=0", f"train.epochs={epochs}", "train.log_interval=1", "train.eval_interval=1",
            "scheduler.warmup_iters=2", "model.backbone.depth=18", "eval.diagnostics=false",
            "train.amp=null"]  # fp32: bf16 CPU kernels are not run-to-run deterministic (exact-resume tests)


def tiny_fcos(data_root: Path, **kw) -> list[str]:
    return tiny(data_root, **kw) + ["model.neck.out_channels=16", "model.head.feat_channels=16",
                                    "model.head.num_convs=1"]


def cli(*args: str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.slow
def test_cli_train_eval_infer_end_to_end(tmp_path):
    work = tmp_path / "work"
    # in process (tools/*.py are these commands: test_cli; the README test runs the files themselves)
    trained = run_main("train", "--config", str(FCOS_CFG), "--work-dir", str(work), "--device", "cpu",
                       "--set", *tiny_fcos(tmp_path / "data"), "train.keep_checkpoints=1", "train.ema={decay: 0.9}")
    assert trained.returncode == 0, trained.stderr
    names = {p.name for p in work.iterdir()}
    assert {"config.yaml", "log.txt", "metrics.jsonl", "tb", "latest.pth", "best.pth", "epoch_2.pth",
            "model_final.pth", "results"} <= names
    assert "epoch_1.pth" not in names  # keep_checkpoints=1
    assert any(p.name.startswith("events.out.tfevents") for p in (work / "tb").iterdir())
    assert load_config(work / "config.yaml")["train"]["epochs"] == 2  # resolved config, reloadable
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert len(train) == 4 and len(evals) == 2  # 2 iterations x 2 epochs, logged every step; 2 evaluations
    for key in ("epoch", "iter", "cls", "bbox", "centerness", "total", "lr", "grad_norm"):
        assert key in train[-1]
    assert set(train[0]["term_grad_norm"]) == {"cls", "bbox", "centerness"}
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"):
        assert key in evals[-1]
    assert set(evals[-1]["per_class"]) == {"circle", "square", "triangle", "star"}
    ckpt = load_checkpoint(work / "latest.pth")
    assert {"model", "optimizer", "scaler", "hooks", "epoch", "iter", "inner", "rng", "config"} <= set(ckpt)
    assert "ema" in ckpt["hooks"]["EMAHook"] and ckpt["hooks"]["BestCheckpointHook"]["best_epoch"] >= 1
    assert (ckpt["epoch"], ckpt["iter"], ckpt["inner"]) == (2, 4, 0)
    slim = load_checkpoint(work / "model_final.pth")
    assert set(slim) == {"model", "config", "classes", "cat_ids", "epoch", "iter", "inference_only"}
    assert "bbox:" in (work / "log.txt").read_text()

    out = run_main("eval", "--config", str(work / "config.yaml"), "--checkpoint", str(work / "latest.pth"),
                   "--work-dir", str(tmp_path / "eval"), "--device", "cpu")
    assert out.returncode == 0 and "AP50" in out.stderr, out.stderr
    assert {"tide.md", "tide.json", "tide.png"} <= {p.name for p in (tmp_path / "eval").iterdir()}

    images = sorted((Path(ckpt["config"]["data"]["val"]["root"])).glob("*/images/*.png"))[:2]
    inferred = run_main("infer", "--config", str(work / "config.yaml"), "--checkpoint", str(work / "best.pth"),
                        "--images", *map(str, images), "--out", str(tmp_path / "infer"), "--score-thr", "0.0")
    assert inferred.returncode == 0, inferred.stderr
    written = {p.name for p in (tmp_path / "infer").iterdir()}
    assert {images[0].stem + ".png", images[1].stem + ".png", "results.json"} <= written
    results = json.loads((tmp_path / "infer/results.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score"} <= set(results[0])


def test_centernet_trains_through_the_cli(tmp_path):
    work = tmp_path / "work"
    proc = run_main("train", "--config", str(CENTERNET_CFG), "--work-dir", str(work), "--device", "cpu", "--set",
                    *tiny(tmp_path / "data", epochs=1), "model.neck.channels=[32,16,16]", "model.head.feat_channels=16")
    assert proc.returncode == 0, proc.stderr
    evals = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(evals) == 1 and (work / "latest.pth").is_file()


@pytest.mark.slow
def test_loss_swap_through_set(tmp_path):
    work = tmp_path / "work"
    assert run_main("train", "--config", str(FCOS_CFG), "--work-dir", str(work), "--device", "cpu",
        "--set", *tiny_fcos(tmp_path / "data", epochs=1), "model.head.losses.bbox.type=CIoULoss").returncode == 0
    assert load_config(work / "config.yaml")["model"]["head"]["losses"]["bbox"]["type"] == "CIoULoss"
    train = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert all(r["bbox"] > 0 for r in train)


def test_bad_override_fails_with_a_clear_message(tmp_path):
    proc = run_main("train", "--config", str(FCOS_CFG), "--set", "train.epocs=1")
    assert proc.returncode == 2 and "unknown key 'train.epocs'. Did you mean 'epochs'" in proc.stderr


class StopAfterFirstEpoch(Hook):
    """Test-only: ends this process's training cleanly after epoch 1, as a shorter ``train.epochs`` run would
    (the checkpoint hook saves epoch 1; the saved run is unfinished, so ``--resume`` continues it)."""

    priority = 1

    def after_epoch(self, trainer):
        trainer.max_epochs = trainer.epoch


@pytest.mark.parametrize("ema", [None, 0.99])
@pytest.mark.slow
def test_exact_resume_after_a_clean_stop_is_bit_identical(tmp_path, ema):
    torch.set_num_threads(1)
    cfg = load_config(FCOS_CFG, tiny_fcos(tmp_path / "data") + [f"train.ema={ema or 'null'}"])
    build_trainer(cfg, tmp_path / "straight", device="cpu").train()
    first = build_trainer(cfg, tmp_path / "split", device="cpu")
    first.hooks.insert(0, StopAfterFirstEpoch())
    first.train()
    del first
    torch.manual_seed(1234)  # disturb the global RNG: resume must restore it
    resumed = build_trainer(cfg, tmp_path / "split", device="cpu", resume="auto")
    resumed.train()
    assert resumed.epoch == 2
    assert_same_weights(tmp_path / "straight/latest.pth", tmp_path / "split/latest.pth")
    if ema:
        a, b = (load_checkpoint(tmp_path / f"{w}/latest.pth")["hooks"]["EMAHook"]["ema"] for w in ("straight", "split"))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    args = [str(ROOT / "tools/train.py"), "--config", str(FCOS_CFG), "--device", "cpu", "--set",
            *tiny_fcos(tmp_path / "data", epochs=3), "train.eval_interval=10"]
    cli(*args, "--work-dir", str(tmp_path / "straight"), cwd=tmp_path)
    work = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *args, "--work-dir", str(work)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (work / "epoch_1.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (work / "epoch_1.pth").exists()
    cli(*args, "--work-dir", str(work), "--resume", cwd=tmp_path)
    assert_same_weights(tmp_path / "straight/latest.pth", work / "latest.pth")


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="cannot write .*latest.pth: disk full"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]  # no temp file left behind


@pytest.mark.slow
def test_corrupt_checkpoint_is_named_and_auto_resume_falls_back(tmp_path):
    work = tmp_path / "work"
    args = ["train", "--config", str(FCOS_CFG), "--work-dir", str(work), "--device", "cpu",
            "--set", *tiny_fcos(tmp_path / "data", epochs=1), "train.eval_interval=10"]
    assert run_main(*args).returncode == 0
    data = (work / "latest.pth").read_bytes()
    (work / "latest.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"latest\.pth is corrupt or truncated"):
        load_checkpoint(work / "latest.pth")
    proc = run_main(*args, "--resume", str(work / "latest.pth"))
    assert proc.returncode == 1 and "latest.pth is corrupt or truncated" in proc.stderr
    proc = run_main(*args[:-1], "train.eval_interval=10", "train.epochs=2", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "falling back to" in proc.stderr and "epoch_1.pth" in proc.stderr
    assert load_checkpoint(work / "latest.pth")["epoch"] == 2


@LOSSES.register()
class FlakyLoss(WeightedLoss):
    """Test-only: an L1 loss that is NaN on the calls listed in ``nan_calls`` (all calls: -1)."""

    def __init__(self, nan_calls: tuple = (-1,), reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.nan_calls, self.calls = set(nan_calls), 0

    def elementwise(self, pred, target):
        self.calls += 1
        loss = (pred - target).abs()
        return loss * float("nan") if -1 in self.nan_calls or self.calls in self.nan_calls else loss


def test_nan_guard_skips_bad_steps_and_aborts_after_patience(tmp_path):
    cfg = load_config(FCOS_CFG, tiny_fcos(tmp_path / "data", images=16, epochs=1) + [
        "model.head.losses.bbox.type=FlakyLoss", "model.head.losses.bbox.nan_calls=[2, 3]", "train.nan_patience=3"])
    cfg["model"]["head"]["losses"]["bbox"].pop("loss_weight", None)
    trainer = build_trainer(cfg, tmp_path / "transient", device="cpu")
    trainer.train()
    assert trainer.iter == 2  # 4 batches, 2 skipped
    skipped = [json.loads(x) for x in (tmp_path / "transient/metrics.jsonl").read_text().splitlines()
               if '"skipped_step"' in x]
    assert len(skipped) == 2 and skipped[0]["non_finite"] == ["bbox"]
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "transient/latest.pth").values()
               if v.is_floating_point())

    cfg["model"]["head"]["losses"]["bbox"]["nan_calls"] = [-1]
    trainer = build_trainer(cfg, tmp_path / "always", device="cpu")
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive training steps had a non-finite loss \(terms: bbox\)"):
        trainer.train()
    assert not (tmp_path / "always/latest.pth").exists()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_ddp_two_gloo_processes(tmp_path):
    work = tmp_path / "work"
    proc = cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
               str(ROOT / "tools/train.py"), "--config", str(FCOS_CFG), "--work-dir", str(work), "--device", "cpu",
               "--set", *tiny_fcos(tmp_path / "data", images=16, epochs=1), cwd=tmp_path)
    ckpt = load_checkpoint(work / "latest.pth")
    assert ckpt["iter"] == 2  # 16 images / (2 processes x 4) per step
    evals = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(evals) == 1  # rank 0 alone writes
    assert "2 process(es)" in proc.stderr
    assert "evaluation after epoch 1 on 4 images" in proc.stderr  # predictions gathered from both ranks


def test_eval_only_needs_weights(tmp_path):
    proc = run_main("train", "--config", str(FCOS_CFG), "--work-dir", str(tmp_path / "w"), "--eval-only", "--device",
                    "cpu", "--set", *tiny_fcos(tmp_path / "data"))
    assert proc.returncode == 2 and "--eval-only needs weights" in proc.stderr
    shutil.rmtree(tmp_path / "w", ignore_errors=True)


def test_resume_with_more_epochs_follows_the_new_schedule(tmp_path):
    short = load_config(FCOS_CFG, tiny_fcos(tmp_path / "data", epochs=1) + ["train.eval_interval=10"])
    build_trainer(short, tmp_path / "w", device="cpu").train()
    longer = load_config(FCOS_CFG, tiny_fcos(tmp_path / "data", epochs=3) + ["train.eval_interval=10",
                                                                               "optimizer.lr=0.004"])
    resumed = build_trainer(longer, tmp_path / "w", device="cpu", resume="auto")
    seen = []

    class RecordLR(Hook):
        priority = 30  # after the LR hook

        def before_step(self, trainer):
            seen.append((trainer.iter, trainer.optimizer.param_groups[0]["lr"]))

    resumed.hooks.append(RecordLR())
    resumed.train()
    schedule = next(h for h in resumed.hooks if h.name == "LRScheduleHook").factor
    assert schedule.total == 6 and seen[0][0] == 2
    assert seen[0][1] == pytest.approx(0.004 * schedule(2)) and seen[0][1] > 0  # the new lr and length win
    assert load_checkpoint(tmp_path / "w/latest.pth")["epoch"] == 3


@pytest.mark.parametrize("value, ok", [(None, True), (0.999, True), ({"decay": 0.99}, True), (True, False),
                                       ({"decay": 0.99, "warmup_iters": 10}, True), (1.0, False),
                                       ({"decay": 0}, False), ({"decay": 0.9, "warmup": 5}, False)])
def test_ema_setting_is_validated(value, ok):
    from detkit.registry import ConfigError

    if ok:
        TrainSettings.from_config({"train": {"ema": value}})
    else:
        with pytest.raises(ConfigError, match="train.ema must be null, a decay in"):
            TrainSettings.from_config({"train": {"ema": value}})


def test_bad_intervals_fail_before_training():
    from detkit.registry import ConfigError

    with pytest.raises(ConfigError, match="train.eval_interval must be a positive integer, got 0"):
        TrainSettings.from_config({"train": {"eval_interval": 0}})


def test_ema_warmup_ramps_the_decay():
    from detkit.engine.hooks import WarmupEMA

    ema = WarmupEMA(0.9998, warmup_iters=100)
    avg, cur = [torch.zeros(3)], [torch.ones(3)]
    ema.iter = 1  # decay 0.9998 * (1 - e^-0.01) ~ 0.01: the average moves almost all the way
    ema(avg, cur, torch.tensor(1))
    assert avg[0][0].item() == pytest.approx(1 - 0.9998 * (1 - math.exp(-0.01)), rel=1e-5)
    counters = [torch.tensor([3])]
    ema(counters, [torch.tensor([7])], torch.tensor(2))
    assert counters[0].item() == 7


def docs_hook_module(folder: Path) -> None:
    """docs/engine.md's custom hook example, saved as ``my_hooks.py`` in ``folder``, exactly as written."""
    text = (ROOT / "docs/engine.md").read_text()
    (folder / "my_hooks.py").write_text(text.split("```python\n", 1)[1].split("```", 1)[0])


@pytest.mark.slow
def test_cli_signal_then_resume_is_bit_identical_with_the_docs_hook(tmp_path, signum=signal.SIGINT):
    """Ctrl-C through the real CLI (SIGTERM takes the same path: tests/test_engine.py checks both)."""
    docs_hook_module(tmp_path)
    args = [str(ROOT / "tools/train.py"), "--config", str(FCOS_CFG), "--device", "cpu", "--set",
            *tiny_fcos(tmp_path / "data", epochs=2, images=16), "train.eval_interval=10", "imports=[my_hooks]",
            "train.hooks=[{type: LossSpikeHook, factor: 1.0}]"]
    cli(*args, "--work-dir", str(tmp_path / "straight"), cwd=tmp_path)
    work = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, *args, "--work-dir", str(work)], cwd=tmp_path, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = work / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().count('"type": "train"') >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and "Continue with:" in err and "--resume" in err.splitlines()[-1]
    stopped_at = load_checkpoint(work / "latest.pth")
    assert 2 <= stopped_at["iter"] < 8 and stopped_at["epoch"] * 4 + stopped_at["inner"] == stopped_at["iter"]
    cli(*args, "--work-dir", str(work), "--resume", cwd=tmp_path)
    assert_same_weights(tmp_path / "straight/latest.pth", work / "latest.pth")
    hooks = [load_checkpoint(w / "latest.pth")["hooks"]["LossSpikeHook"] for w in (tmp_path / "straight", work)]
    assert hooks[0] == hooks[1] and hooks[0]["mean"] is not None
    iters = [json.loads(x)["iter"] for x in (work / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert iters == list(range(1, 9))  # nothing replayed twice, nothing lost


def test_resume_of_a_finished_run_says_so_and_exits_0(tmp_path, capsys):
    from detkit.cli import main

    args = ["train", "--config", str(FCOS_CFG), "--work-dir", str(tmp_path / "w"), "--device", "cpu", "--set",
            *tiny_fcos(tmp_path / "data", epochs=1, images=4), "train.eval_interval=10"]
    assert main(args) == 0
    before = (tmp_path / "w/latest.pth").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "this run already finished (epoch 1 of train.epochs 1)" in capsys.readouterr().err
    assert (tmp_path / "w/latest.pth").stat().st_mtime_ns == before
