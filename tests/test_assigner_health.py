"""Assigner health: positives per GT on hand-made boxes (FCOS, ATSS, CenterNet), the summary, the hook's
``eval_epoch_N/assigner_health.json`` in a tiny run, and ``tools/analyze.py dataset``'s health output."""

from __future__ import annotations

import io
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
import torch
from PIL import Image

from detkit.assigners import ATSSAssigner, CenterNetAssigner, DenseAssigner, FCOSAssigner
from detkit.assigners.health import HealthAccumulator, assigner_health, centernet_health
from detkit.cli import main
from detkit.config import load_config
from detkit.data.loader import build_dataloader
from detkit.engine.evaluator import Evaluation
from detkit.engine.hooks import EvalRecord, build_hooks
from detkit.engine.hooks.assigner_health import AssignerHealthHook, HealthProbe, unsupported_reason
from detkit.engine.settings import TrainSettings
from detkit.models import build_detector
from detkit.models.fcos import default_ranges
from detkit.ops.priors import dense_points
from detkit.registry import ConfigError
from tests.cli_runner import tiny_shapes

ROOT = Path(__file__).resolve().parents[1]
STRIDES = [8, 16, 32, 64, 128]
# points of a 64x64 input at (i + 0.5) * stride: 4, 12, 20, ... on stride 8
PRIORS = dense_points([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], STRIDES, torch.device("cpu"))
# image 0: a 2x2 box between the stride-8 points 4 and 12 (no point of any level inside it), a 30x30
# box, an exact copy of the 30x30 box, and a padding row holding a box that would have positives
BOXES = torch.tensor([[[6.0, 6.0, 8.0, 8.0], [10.0, 10.0, 40.0, 40.0], [10.0, 10.0, 40.0, 40.0],
                       [0.0, 0.0, 60.0, 60.0]]])
LABELS = torch.tensor([[0, 1, 1, 1]])
MASK = torch.tensor([[True, True, True, False]])


class NeedsPredictions(DenseAssigner):
    """Refuses a call without predictions, as the dynamic assigners do."""

    def __call__(self, priors, gt_boxes, gt_labels, gt_mask, num_classes, preds=None):  # noqa: ANN001
        raise ConfigError("NeedsPredictions assigns from the predictions: pass preds")


@contextmanager
def capture_log() -> Iterator[io.StringIO]:
    """The detkit logger's messages while inside."""
    text, handler = io.StringIO(), logging.StreamHandler()
    handler.stream = text
    logger = logging.getLogger("detkit")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield text
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.mark.parametrize("assigner", [FCOSAssigner(STRIDES, default_ranges(STRIDES)), ATSSAssigner(STRIDES)],
                         ids=["fcos", "atss"])
def test_a_box_no_point_can_take_has_zero_positives(assigner):
    stats = assigner_health(assigner, PRIORS, BOXES, LABELS, MASK, num_classes=2)
    assigned = assigner(PRIORS, BOXES, LABELS, MASK, 2)
    assert stats.positives[0, 0] == 0 and stats.positives[0, 1] > 0  # the tiny box none, the normal one some
    assert stats.counted.tolist() == [[True, True, False, False]]  # the copy shares its twin's; padding ignored
    assert stats.positives.sum() == stats.level_positives.sum() == assigned.positive.sum()  # levels add up
    acc = HealthAccumulator(["a", "b"], STRIDES, type(assigner).__name__)
    acc.add(stats, [7])
    acc.add(stats, [7])  # an image seen twice (DDP padding) counts once
    s = acc.summary()
    assert (s["gts"], s["exact_duplicate_gts"], s["positives_per_gt"]["min"]) == (2, 1, 0)
    assert s["gts_without_positives"] == {"total": 1, "small": 1, "medium": 0, "large": 0,
                                          "by_class": {"a": 1, "b": 0}}
    assert sum(s["positives_per_gt"]["histogram"].values()) == 2
    assert sum(s["positives_per_level"].values()) == s["positives"] == int(stats.positives.sum())
    assert acc.log_line().startswith(f"assigner health: {s['positives_per_gt']['mean']:.1f} positives/GT (min 0), "
                                     "1 of 2 GTs without positives (small 1, medium 0, large 0; a 1)")


def test_centernet_collisions_and_dropped_objects_have_no_positive():
    boxes = torch.tensor([[[8.0, 8.0, 16.0, 16.0], [9.0, 9.0, 15.0, 15.0], [9.0, 9.0, 15.0, 15.0],
                           [100.0, 100.0, 120.0, 120.0], [30.0, 30.0, 40.0, 40.0]]])
    labels = torch.tensor([[0, 0, 1, 0, 0]])  # box 1: box 0's centre cell and class; box 2: another class
    mask = torch.tensor([[True, True, True, True, False]])  # box 3: centre off a 16x16 map (stride 4)
    stats = centernet_health(CenterNetAssigner(stride=4), boxes, labels, mask, 2, (16, 16))
    assert stats.positives.tolist() == [[1, 0, 1, 0, 0]] and stats.level_positives.tolist() == [[2]]


@pytest.fixture(scope="module")
def tiny_atss(tmp_path_factory) -> tuple[dict, torch.nn.Module, Path]:
    """The tiny ATSS shapes config with evaluation diagnostics on (the default), its model, its data folder."""
    data = tmp_path_factory.mktemp("health") / "data"
    overrides = [o for o in tiny_shapes(data) if not o.startswith("eval.")]
    cfg = load_config(ROOT / "configs/atss/atss_r18_fpn_shapes.yaml", overrides)
    return cfg, build_detector(cfg["model"]), data


def test_probe_uses_the_models_own_geometry_and_leaves_it_untouched(tiny_atss):
    model = tiny_atss[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = HealthProbe(model)
    assert probe.map_sizes(64, 96) == [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    stats = probe((64, 96), [{"boxes": torch.tensor([[6.0, 6.0, 8.0, 8.0]]), "labels": torch.tensor([0])}])
    assert stats.positives.tolist() == [[0]]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics included
    assert "no detkit head assigner" in unsupported_reason(torch.nn.Linear(1, 1))


def test_hook_is_built_in_with_diagnostics_and_writes_health_after_an_evaluation(tiny_atss, tmp_path, capsys):
    cfg, model, data = tiny_atss
    loader = build_dataloader(cfg["data"], "val")
    settings = TrainSettings.from_config(cfg)
    hook = next(h for h in build_hooks(cfg, settings, loader, model) if isinstance(h, AssignerHealthHook))
    assert not any(isinstance(h, AssignerHealthHook)
                   for h in build_hooks({**cfg, "eval": {"diagnostics": False}}, settings, loader, model))
    trainer = SimpleNamespace(model=model, epoch=1, is_main=True, work_dir=tmp_path / "work", last_eval=None)
    hook.before_train(trainer)
    hook.after_epoch(trainer)  # no evaluation this epoch: nothing written
    assert not (tmp_path / "work").exists()
    trainer.last_eval = EvalRecord(1, 0, {}, {}, Evaluation({}))
    with capture_log() as log:
        hook.after_epoch(trainer)
    health = json.loads((tmp_path / "work/eval_epoch_1/assigner_health.json").read_text())
    assert health["assigner"] == "ATSSAssigner" and health["images"] == 2 and health["gts"] > 0
    assert sum(health["positives_per_level"].values()) == health["positives"] > 0
    assert log.getvalue().startswith("assigner health: ")

    own, model.head.assigner = model.head.assigner, NeedsPredictions(STRIDES)
    trainer.epoch, trainer.last_eval = 2, EvalRecord(2, 0, {}, {}, Evaluation({}))
    try:
        with capture_log() as log:
            hook.after_epoch(trainer)
    finally:
        model.head.assigner = own
    assert "assigner health: not measured from now on (NeedsPredictions needs the model's predictions" in log.getvalue()
    assert not (tmp_path / "work/eval_epoch_2").exists() and hook.probe is None

    out = tmp_path / "stats"
    args = ["dataset", "--config", str(ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"), "--out", str(out),
            "--set", *tiny_shapes(data)]
    assert main(["analyze", *args]) == 0
    printed = capsys.readouterr().out
    written = json.loads((out / "dataset_train.json").read_text())
    summary = written["assigner_health"]
    assert summary["assigner"] == "FCOSAssigner" and summary["images"] == 4 and summary["gts"] == written["boxes"]
    assert "assigner health (FCOSAssigner, sizes by the box area after the transforms)" in printed
    assert Image.open(out / "dataset_train.png").size == (2000, 420)  # four panels: the health histogram added


def test_health_of_a_val_set_with_classes_the_model_lacks_uses_the_model_labels():
    """A model of [b] evaluated on a val set of [a, b, c] (allowed since classes match by name): the
    health keeps the b boxes as model label 0 and leaves the rest out (before: a ValueError from the
    label check at the first evaluation)."""
    from detkit.engine.evaluator import EvalClasses
    from detkit.engine.hooks.assigner_health import health_hook, to_model_labels

    loader = SimpleNamespace(dataset=SimpleNamespace(cat_ids=[1, 2, 3], classes=["a", "b", "c"]))
    hook = health_hook(loader, EvalClasses({0: 2}, None, ["b"]), num_classes=1)
    assert hook.label_map == {1: 0} and hook.classes == ["b"]
    target = {"boxes": torch.tensor([[0.0, 0, 4, 4], [1, 1, 9, 9], [2, 2, 6, 6]]), "labels": torch.tensor([0, 1, 2])}
    mapped = to_model_labels([target], hook.label_map)[0]
    assert mapped["labels"].tolist() == [0] and mapped["boxes"].tolist() == [[1, 1, 9, 9]]
    same = health_hook(loader, EvalClasses({0: 1, 1: 2, 2: 3}, None, ["a", "b", "c"]), num_classes=3)
    assert same.label_map is None and same.classes == ["a", "b", "c"]
