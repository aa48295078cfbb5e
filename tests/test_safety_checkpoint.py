"""Bad checkpoints and resumes: named errors, exit codes, nothing overwritten; resume semantics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detkit.cli import main
from detkit.config import load_config
from detkit.engine import build_trainer, load_checkpoint, save_checkpoint
from tests.cli_runner import tiny_shapes

ROOT = Path(__file__).resolve().parents[1]
FCOS_CFG = ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 1-epoch run (model_final.pth, latest.pth...)."""
    root = tmp_path_factory.mktemp("run")
    assert main(["train", "--config", str(FCOS_CFG), "--work-dir", str(root / "work"), "--device", "cpu", "--set",
                 *tiny_shapes(root / "data")]) == 0
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("make, code, message", [
    (lambda p: p.write_bytes(b"not a zip"), 1, "is corrupt or truncated"),
    (lambda p: torch.save([1, 2, 3], p), 1, "is not a detkit checkpoint"),
    (lambda p: None, 1, "checkpoint not found"),
])
def test_unreadable_checkpoints_are_named_for_every_command(tmp_path, capsys, make, code, message):
    bad = tmp_path / "bad.pth"
    make(bad)
    commands = [["train", "--config", str(FCOS_CFG), "--work-dir", str(tmp_path / "w"), "--resume", str(bad)],
                ["eval", "--checkpoint", str(bad)],
                ["infer", "--checkpoint", str(bad), "--images", str(tmp_path), "--out", str(tmp_path / "o")],
                ["export", "--checkpoint", str(bad), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]]
    for args in commands:
        assert main(args) == code, args
        err = capsys.readouterr().err
        assert message in err and "bad.pth" in err and "Traceback" not in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["bad.pth"] if bad.exists() else [])


def test_resume_from_an_inference_checkpoint_says_what_to_do(trained, tmp_path, capsys):
    before = snapshot(trained / "work")
    assert main(["train", "--config", str(FCOS_CFG), "--work-dir", str(trained / "work"), "--device", "cpu",
                 "--resume", str(trained / "work/model_final.pth"), "--set", *tiny_shapes(trained / "data"),
                 "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "holds inference weights only" in err and "--load-from" in err
    assert snapshot(trained / "work") == before


def test_eval_only_without_a_checkpoint_is_an_error(tmp_path, capsys):
    assert main(["train", "--config", str(FCOS_CFG), "--work-dir", str(tmp_path / "w"), "--eval-only", "--resume",
                 "--set", *tiny_shapes(tmp_path / "data")]) == 2
    assert "no readable checkpoint in" in capsys.readouterr().err


@pytest.mark.slow
def test_a_resumed_config_wins_and_another_optimizer_starts_fresh(trained, tmp_path, capsys):
    work = tmp_path / "w"
    state = load_checkpoint(trained / "work/latest.pth")
    save_checkpoint(state, work / "latest.pth")
    cfg = load_config(FCOS_CFG, tiny_shapes(trained / "data") + ["train.epochs=2", "optimizer={type: SGD, lr: 0.5}"])
    trainer = build_trainer(cfg, work, device="cpu", resume="auto")
    trainer.train()
    assert "the checkpoint has no SGD state (it holds AdamW); starting a fresh optimizer" in capsys.readouterr().err
    assert type(trainer.optimizer).__name__ == "SGD" and trainer.epoch == 2
    assert trainer.optimizer.param_groups[0]["lr"] <= 0.5


def test_weights_of_another_model_are_named(trained, tmp_path, capsys):
    cfg = ROOT / "configs/centernet/centernet_r18_shapes.yaml"
    assert main(["eval", "--config", str(cfg), "--checkpoint", str(trained / "work/model_final.pth"),
                 "--work-dir", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert "model_final.pth: its weights do not fit this config's model (CenterNet)" in err
    assert not (tmp_path / "e").exists()


def test_resuming_an_early_stopped_run_says_it_finished(trained, tmp_path, capsys):
    state = load_checkpoint(trained / "work/latest.pth")
    state["stop_reason"] = "early stop after epoch 1: AP has not improved"
    save_checkpoint(state, tmp_path / "w/latest.pth")
    assert main(["train", "--config", str(FCOS_CFG), "--work-dir", str(tmp_path / "w"), "--device", "cpu",
                 "--resume", "--set", *tiny_shapes(trained / "data"), "train.epochs=5"]) == 0
    err = capsys.readouterr().err
    assert "this run already finished (early stop after epoch 1" in err and "--load-from" in err


def test_the_printed_resume_command_continues_from_the_work_dir():
    from detkit.engine.runner import resume_command

    for argv in (["tools/train.py", "--config", "a.yaml", "--resume", "w/epoch_2.pth", "--set", "x=1"],
                 ["tools/train.py", "--config", "a.yaml", "--resume=w/epoch_2.pth", "--set", "x=1"],
                 ["tools/train.py", "--config", "a.yaml", "--set", "x=1"]):
        assert resume_command(argv).endswith("tools/train.py --config a.yaml --set x=1 --resume")
