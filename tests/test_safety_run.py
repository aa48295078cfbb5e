"""The run lifecycle (issue 25): every failure of a resume, a save, an out-of-memory batch, a NaN metric,
a signal during evaluation or a damaged metrics file ends in one named message, nothing existing changed."""

from __future__ import annotations

import json
import os
import resource
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from detkit.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from detkit.engine.workdir import clear_previous_run
from tests.cli_runner import run_main, tiny_shapes

ROOT = Path(__file__).resolve().parents[1]
FCOS_CFG = ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"


def train(tmp_path: Path, work: Path, *extra: str, sets: tuple[str, ...] = ()):
    return run_main("train", "--config", str(FCOS_CFG), "--work-dir", str(work), "--device", "cpu", *extra, "--set",
                    *tiny_shapes(tmp_path / "data"), *sets)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def one_error(proc, code: int, *parts: str) -> None:
    """Exit ``code``, and stderr holds ``parts`` in one ``error:`` line and no traceback."""
    assert proc.returncode == code, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(p in errors[0] for p in parts), proc.stderr
    assert "Traceback" not in proc.stderr


def old_run(work: Path) -> None:
    """A finished run's files, written without training (epoch 1 of train.epochs 1)."""
    save_checkpoint({"model": {}, "epoch": 1, "iter": 2}, work / "latest.pth")
    (work / "log.txt").write_text("old log\n")
    (work / "eval_epoch_1").mkdir()
    (work / "eval_epoch_1/pr_curves.png").write_bytes(b"png")


def test_resuming_a_finished_run_still_checks_the_whole_config(tmp_path):
    work = tmp_path / "w"
    old_run(work)
    before = snapshot(work)
    one_error(train(tmp_path, work, "--resume", sets=("model.head.num_clases=4",)), 2,
              "model.head", "'num_clases'", "num_classes")
    one_error(train(tmp_path, work, "--resume", sets=("train.writers=[{type: WandbWriter}]",)), 2,
              "WandbWriter needs the 'wandb' package")
    assert snapshot(work) == before


def test_a_missing_writer_package_is_found_before_overwrite_deletes(tmp_path):
    work = tmp_path / "w"
    old_run(work)
    before = snapshot(work)
    for writer in ("WandbWriter", "MLflowWriter"):
        one_error(train(tmp_path, work, "--overwrite", sets=(f"train.writers=[{{type: {writer}}}]",)), 2,
                  f"{writer} needs the", "pip install")
        assert snapshot(work) == before


def test_overwrite_removes_everything_the_old_run_wrote_and_nothing_else(tmp_path):
    work = tmp_path / "w"
    old_run(work)
    for name in ("epoch_1.pth", "best.pth", "model_final.pth", "results.png", "metrics.jsonl", "config.yaml",
                 "stall_rank1.txt"):
        (work / name).write_bytes(b"x")
    for folder in ("tb", "results", "eval_epoch_2", "eval_best"):
        (work / folder).mkdir()
    (work / "eval_best/results.json").write_text("[]")  # what `eval` / --eval-only write there
    (work / "eval_mine").mkdir()  # not detkit's: kept
    (work / "notes.txt").write_text("mine")
    clear_previous_run(work)
    assert sorted(p.name for p in work.iterdir()) == ["eval_mine", "notes.txt"]


@pytest.mark.parametrize("how", ["path", "auto"])
def test_resuming_bare_weights_points_to_load_from(tmp_path, how):
    work = tmp_path / "w"
    weights = work / "latest.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}}, weights)
    before = snapshot(work)
    proc = train(tmp_path, work, "--resume", *([str(weights)] if how == "path" else []))
    one_error(proc, 2, str(weights), "holds weights only", f"--load-from {weights}")
    assert snapshot(work) == before


def test_a_torchscript_file_is_named_as_one(tmp_path):
    module = tmp_path / "model.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Conv2d(3, 4, 1), torch.zeros(1, 3, 4, 4)), str(module))
    before = module.read_bytes()
    proc = train(tmp_path, tmp_path / "w", "--resume", str(module))
    one_error(proc, 1, f"{module} is a TorchScript module", "export --format torchscript", "best.pth")
    assert "weights_only" not in proc.stderr and not (tmp_path / "w").exists()
    from detkit.engine.load_from import source_weights

    with pytest.raises(CheckpointError, match="is a TorchScript module"):
        source_weights(str(module), torch.nn.Linear(1, 1))
    assert module.read_bytes() == before


def test_a_save_failing_inside_torch_save_names_the_path_and_reason(tmp_path):
    """A real EFBIG: the file-size limit makes torch's zip writer fail ("unexpected pos")."""
    path = tmp_path / "latest.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 1}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        with pytest.raises(CheckpointError, match=rf"cannot write {path}: File too large \(the previous latest.pth"):
            save_checkpoint({"model": {"w": torch.zeros(1_000_000)}, "epoch": 2}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert load_checkpoint(path)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["latest.pth"]


@pytest.mark.slow
def test_a_nan_metric_is_no_improvement_and_the_run_saves(tmp_path):
    """APl without large boxes: NaN at every evaluation; early stop and best_metric on it."""
    work = tmp_path / "w"
    proc = train(tmp_path, work, sets=("train.epochs=3", "train.eval_interval=1", "train.best_metric=APl",
                                       "train.early_stop={metric: APl, patience: 2}", "data.train.num_images=2"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    for key in ("train.best_metric", "train.early_stop.metric"):  # two evaluations, said once
        assert proc.stderr.count(f"{key}: APl is NaN") == 1, proc.stderr
    assert "early stop after epoch 2: APl has not improved by more than 0.0 for 2 evaluations (no evaluation gave it " \
           "a value)" in proc.stderr and "best APl: no evaluation gave it a value (NaN), so no best.pth" in proc.stderr
    assert load_checkpoint(work / "latest.pth")["epoch"] == 2 and not (work / "best.pth").exists()


def test_resume_without_a_readable_checkpoint_says_what_to_do(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    (work / "latest.pth").write_bytes(b"half a checkpoint")
    (work / "metrics.jsonl").write_text("{}\n")
    before = snapshot(work)
    proc = train(tmp_path, work, "--resume")
    one_error(proc, 2, "holds no readable training checkpoint", "latest.pth", "--overwrite")
    assert "already holds a run" not in proc.stderr and snapshot(work) == before


@pytest.mark.slow
def test_a_signal_during_evaluation_stops_there_and_resume_evaluates(tmp_path, monkeypatch):
    from detkit.engine.hooks import evaluation

    evaluate = evaluation.evaluate_model

    def interrupted(*args, **kwargs):  # Ctrl-C as the evaluation starts: before its first batch
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_model", interrupted)
    work = tmp_path / "w"
    proc = train(tmp_path, work)  # one epoch: its evaluation is the last
    assert proc.returncode == 130 and "stopped by SIGINT" in proc.stderr, proc.stderr
    assert "evaluation after epoch" not in proc.stderr and not (work / "model_final.pth").exists()
    state = load_checkpoint(work / "latest.pth")
    assert (state["epoch"], state["iter"], state["inner"]) == (0, 2, 2)  # steps done, epoch not ended
    monkeypatch.undo()
    proc = train(tmp_path, work, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "evaluation after epoch 1" in proc.stderr and "epoch 1 [" not in proc.stderr  # no step again
    assert load_checkpoint(work / "model_final.pth")["iter"] == 2


def test_a_truncated_last_metrics_line_is_skipped_once(tmp_path, caplog):
    from detkit.analysis import AnalysisError
    from detkit.analysis.training_curves import read_metrics
    from detkit.engine.writers import JsonlWriter

    lines = [json.dumps({"type": "train", "iter": i, "total": 1.0 / i, "cls": 0.5}) for i in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + '\n{"type": "train", "it')  # killed while writing
    assert [v for _, v in read_metrics(tmp_path).train["total"]] == [1.0, 0.5, 1.0 / 3]
    JsonlWriter(tmp_path, resume_iter=2)  # --resume at iteration 2
    assert path.read_text() == "".join(line + "\n" for line in lines[:2])
    warnings = [r.getMessage() for r in caplog.records if "truncated last line" in r.getMessage()]
    assert len(warnings) == 2 and all(f"{path}:4" in w for w in warnings)
    path.write_text(lines[0] + '\n{"type": "tr\n' + lines[1] + "\n")  # damaged elsewhere: an error naming the line
    with pytest.raises(AnalysisError, match=rf"{path}:2: not a JSON object"):
        read_metrics(tmp_path)


@pytest.fixture
def huge_image_data(tmp_path: Path) -> list[str]:
    """COCO data: a 6000x4000 photo among two small images; the ``--set`` overrides that train on it."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    sizes = {"small_a.png": (64, 48), "huge.jpg": (6000, 4000), "small_b.png": (64, 48)}
    for name, (w, h) in sizes.items():
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(tmp_path / "images" / name)
    ann = {"images": [{"id": i + 1, "file_name": n, "width": w, "height": h} for i, (n, (w, h)) in enumerate(sizes.items())],
           "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400,
                            "iscrowd": 0} for i in range(3)],
           "categories": [{"id": 1, "name": "cell"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    small = {**ann, "images": [i for i in ann["images"] if i["width"] < 100],
             "annotations": [a for a in ann["annotations"] if a["image_id"] != 2]}
    (tmp_path / "small.json").write_text(json.dumps(small))  # a training set without the huge image
    spec = f"{{type: CocoDataset, ann_file: {tmp_path / 'ann.json'}, img_dir: {tmp_path / 'images'}, transforms: []}}"
    return [f"data.train={spec}", f"data.val={spec}", "data.batch_size=3", "data.group_by_aspect_ratio=false",
            "model.head.num_classes=1"]


def huge_allocation(images: torch.Tensor) -> None:
    """What a real out-of-memory looks like: the CPU allocator refusing a batch of big images."""
    if images.shape[-1] * images.shape[-2] > 10_000_000:
        torch.empty(images.numel() * 2**30, dtype=torch.uint8)


def test_out_of_memory_in_the_forward_names_the_image_and_the_fix(tmp_path, huge_image_data, monkeypatch):
    from detkit.engine.trainer import Trainer

    forward = Trainer.forward

    def allocating(self, batch):
        huge_allocation(batch["images"])
        return forward(self, batch)

    monkeypatch.setattr(Trainer, "forward", allocating)
    work = tmp_path / "w"
    proc = train(tmp_path, work, sets=tuple(huge_image_data))
    one_error(proc, 1, "out of memory in the forward/backward pass", f"{tmp_path / 'images/huge.jpg'} (6000x4000)",
              "the largest is 6000x4000 pixels", "add a Resize", "DefaultCPUAllocator: can't allocate memory")


def test_out_of_memory_while_loading_names_the_image(tmp_path, huge_image_data):
    from detkit.config import load_config
    from detkit.data.coco import DatasetError
    from detkit.engine import build_trainer

    cfg = load_config(FCOS_CFG, tiny_shapes(tmp_path / "data") + huge_image_data)
    trainer = build_trainer(cfg, tmp_path / "w", device="cpu")
    collate = trainer.loader.collate_fn

    def allocating(items):  # collate pads every image to the largest: the allocation fails there
        huge_allocation(torch.zeros(1, 3, *max(item[0].shape[-2:] for item in items)))
        return collate(items)

    trainer.loader.collate_fn = allocating
    with pytest.raises(DatasetError, match=r"out of memory loading a batch of data.train holding .*huge.jpg "
                                           r"\(6000x4000\), .*small_a.png \(64x48\)"):
        trainer.train()


def test_out_of_memory_in_an_evaluation_names_the_val_image(tmp_path, huge_image_data, monkeypatch):
    from detkit.models.detector import Detector

    predict = Detector.predict

    def allocating(self, images, image_sizes=None):
        huge_allocation(images)
        return predict(self, images, image_sizes)

    monkeypatch.setattr(Detector, "predict", allocating)
    small_train = huge_image_data[0].replace("ann.json", "small.json")
    proc = train(tmp_path, tmp_path / "w", sets=(*huge_image_data, small_train, "data.batch_size=2",
                                                 "data.val_batch_size=3"))
    one_error(proc, 1, "out of memory evaluating a batch of data.val holding", "huge.jpg (6000x4000)",
              "data.val.transforms", "data.val_batch_size")
