"""Bad configs: one short message naming the key, file or value, exit code 2, no traceback, and no
file written or changed (the work dir is not even created)."""

from __future__ import annotations

from pathlib import Path

import pytest

from detkit.cli import main
from tests.cli_runner import tiny_shapes

ROOT = Path(__file__).resolve().parents[1]
FCOS_CFG = ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def fails(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    before = snapshot(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err  # one message
    after = {k: v for k, v in snapshot(tmp_path).items() if "shapes_" not in k}  # generated data may appear
    assert after == {k: v for k, v in before.items() if "shapes_" not in k}
    assert not (tmp_path / "work").exists()


CASES = [
    ("train.epocs=2", "unknown key 'train.epocs'. Did you mean 'epochs'"),
    ("train.grad_clip=-1", "train.grad_clip must be null (no clipping) or a max norm > 0, got -1"),
    ("train.grad_clip=0", "train.grad_clip must be null (no clipping) or a max norm > 0, got 0"),
    ("train.ema=true", "train.ema must be null, a decay in (0, 1)"),
    ("train.amp=fp32", "train.amp must be one of null, bf16, fp16; got 'fp32'"),
    ("train.amp=fp16", "train.amp: fp16 needs CUDA"),
    ("train.accumulate=0", "train.accumulate must be a positive integer, got 0"),
    ("train.best_metric=per_class", "train.best_metric must be one of AP, AP50, AP75, APs, APm, APl"),
    ("train.early_stop={metric: loss}", "train.early_stop.metric must be one of AP, AP50"),
    ("train.early_stop={metric: AP, patience: 0}", "train.early_stop.patience must be a positive integer, got 0"),
    ("train.early_stop={metric: AP, patiense: 3}", "train.early_stop.patiense: unknown key. Did you mean 'patience'"),
    ("train.hooks=[{type: EMAHok}]", "train.hooks.0: unknown hooks type 'EMAHok'. Did you mean 'EMAHook'"),
    ("train.hooks=[{type: LoggerHook}]", "train.hooks: ['LoggerHook'] given twice"),
    ("train.writers=[{type: CSVWriter}]", "train.writers.0: unknown writers type 'CSVWriter'"),
    ("train.checkpoint_interval_iters=-5", "train.checkpoint_interval_iters must be a positive integer or null"),
    ("data.batch_size=0", "data.batch_size must be an integer >= 1, got 0"),
    ("data.batch_size=four", "data.batch_size must be an integer >= 1, got 'four'"),
    ("data.num_workers=-1", "data.num_workers must be an integer >= 0, got -1"),
    ("data.size_divisor=0", "data.size_divisor must be an integer >= 1, got 0"),
    ("data.pin_memory=yes please", "data.pin_memory must be null"),
    ("data.train.image_size=0", "data.train.image_size must be an integer >= 16, got 0"),
    ("train.close_mosaic=2", "data.train.transforms has no mixing transform (Mosaic, MixUp) to turn off"),
    ("train.compile=fast", "train.compile must be false, true (the model's forward) or full"),
    ("eval.backend=cocoapi", "eval.backend must be one of pycocotools, faster_coco_eval"),
    ("eval.score_thr=2", "eval.score_thr must be a number in [0, 1], got 2"),
    ("data.sampler={type: RepeatFactorSampler, repeat_thr: 0}", "data.sampler.repeat_thr must be a number > 0"),
    ("model.head.assigner={type: ATSSAssigner, anchor_scale: -1}", "model.head.assigner.anchor_scale must be a number > 0"),
    ("optimizer.lr=0", "optimizer.lr must be a number > 0, got 0"),
    ("optimizer.lr=fast", "optimizer.lr must be a number > 0, got 'fast'"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay must be a number >= 0, got -0.1"),
    ("model.head.num_classes=0", "model.head.num_classes must be an integer >= 1, got 0"),
    ("model.head.num_classes=3", "the model has 3 classes (model num_classes) but data.train has 4"),
    ("model.head.losses.bbox.type=FocalLoss",
     "model.head.losses.bbox: FocalLoss is a classification loss, but the bbox term takes box losses"),
    ("model.head.losses.cls={type: GIoULoss}",
     "model.head.losses.cls: GIoULoss is a box loss, but the cls term takes classification losses"),
    ("imports=[no_such_module_xyz]", "imports: cannot import 'no_such_module_xyz'"),
    # a constructor's own value check (a ValueError) is named with its config path, not a traceback
    ("model.head.losses.bbox={type: SmoothL1Loss, beta: -1}",
     "model.head.losses.bbox: SmoothL1Loss: beta must be >= 0, got -1"),
    ("model.head.losses.cls={type: GHMC, bins: 0}", "model.head.losses.cls: GHMC: bins must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize("override, message", CASES, ids=[c[0].split("=")[0] for c in CASES])
def test_bad_values_are_named_and_nothing_is_written(tmp_path, capsys, override, message):
    fails(tmp_path, capsys, ["train", "--config", str(FCOS_CFG), "--work-dir", str(tmp_path / "work"), "--device",
                             "cpu", "--set", *tiny_shapes(tmp_path / "data"), override], message)


@pytest.mark.parametrize("text, message", [
    ("", "the config is empty"),
    ("- a\n- b\n", "a config must be a mapping at the top level, got list"),
    ("model: {type: FCOS\n", "c.yaml:2:1: invalid YAML"),
    ("_base_: missing.yaml\n", "missing.yaml"),
    ("optimzer: {type: SGD}\n", "c.yaml: optimzer: unknown top-level section. Did you mean 'optimizer'"),
    ("model: {type: FCOS}\n", "the config has no 'data' section"),
])
def test_bad_config_files_are_named(tmp_path, capsys, text, message):
    (tmp_path / "c.yaml").write_text(text)
    fails(tmp_path, capsys, ["train", "--config", str(tmp_path / "c.yaml"), "--work-dir", str(tmp_path / "work")],
          message)


def test_missing_config_file_is_named(tmp_path, capsys):
    fails(tmp_path, capsys, ["train", "--config", str(tmp_path / "nope.yaml")], "config file not found")
