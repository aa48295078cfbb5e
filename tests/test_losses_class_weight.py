"""Per-class loss weights (detkit.losses.weights): ``class_weight`` on FocalLoss, FocalLossStar,
QualityFocalLoss, VarifocalLoss and CrossEntropyLoss, ``auto`` from the training set's box counts,
and the checks, through the Python API and the real CLI.

References: torchvision's ``sigmoid_focal_loss`` and mmdetection's QFL / VFL formulas (reimplemented
in tests/test_losses_mmdet_formulas.py) times ``class_weight[c]`` on column ``c``; ``F.cross_entropy(weight=)``.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from detkit.config import load_config
from detkit.data import CocoDataset
from detkit.engine import build_trainer
from detkit.losses import build_loss, class_weights_from_counts, resolve_class_weights
from detkit.registry import ConfigError
from tests.cli_runner import run_main, tiny_shapes
from tests.test_losses import VAL_TOL, one_hot_ref
from tests.test_losses_mmdet_formulas import mmdet_varifocal_loss, quality_inputs

ROOT = Path(__file__).resolve().parents[1]
FCOS_CFG = ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"
CW = [0.5, 2.0, 1.0, 3.0, 0.25]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_auto_formula_hand_values():
    # N = 126 boxes over C = 4 classes: raw (N / (C n_c))^0.5, capped at 10 (no boxes: 10), over the mean
    raw = [math.sqrt(126 / 400), math.sqrt(126 / 100), 10.0, math.sqrt(126 / 4)]
    expected = [r / (sum(raw) / 4) for r in raw]
    weights = class_weights_from_counts([100, 25, 0, 1])
    assert weights == pytest.approx(expected) and sum(weights) / 4 == pytest.approx(1.0)
    assert class_weights_from_counts([7, 7, 7]) == pytest.approx([1.0, 1.0, 1.0])
    # power 1: raw N / (C n_c) = 500000.5 (capped at 3) and 0.5000005; mean 1.75
    assert class_weights_from_counts([1, 10 ** 6], power=1.0, cap=3.0) == pytest.approx([3 / 1.75, 0.5 / 1.75],
                                                                                         rel=1e-5)


def _column_ref(name, x, labels, scores):
    """Unweighted elementwise (N, C) reference of each sigmoid loss."""
    dense = one_hot_ref(labels, x.shape[-1]) * (scores[:, None] if name in ("QualityFocalLoss", "VarifocalLoss") else 1)
    if name == "FocalLoss":
        return sigmoid_focal_loss(x, dense, alpha=0.25, gamma=2.0, reduction="none")
    if name == "FocalLossStar":
        return -F.logsigmoid(x * (2 * dense - 1)) * (0.25 * dense + 0.75 * (1 - dense))
    if name == "QualityFocalLoss":  # per element, before mmdetection's sum over classes
        return F.binary_cross_entropy_with_logits(x, dense, reduction="none") * (dense - x.sigmoid()).abs() ** 2
    if name == "VarifocalLoss":
        return mmdet_varifocal_loss(x, dense)
    return F.binary_cross_entropy_with_logits(x, dense, reduction="none")  # CrossEntropyLoss, use_sigmoid


@pytest.mark.parametrize("name", ["FocalLoss", "FocalLossStar", "QualityFocalLoss", "VarifocalLoss", "CrossEntropyLoss"])
def test_sigmoid_losses_scale_column_c_by_class_weight_c(name):
    x, labels, scores = quality_inputs(9, 5)
    spec = {"type": name, "class_weight": CW, "reduction": "none"}
    if name == "CrossEntropyLoss":
        spec["use_sigmoid"] = True
    target = (labels, scores) if name in ("QualityFocalLoss", "VarifocalLoss") else labels
    weighted = _column_ref(name, x, labels, scores) * torch.tensor(CW)
    expected = weighted.sum(-1) if name == "QualityFocalLoss" else weighted
    torch.testing.assert_close(build_loss(spec)(x, target), expected, **VAL_TOL)
    # a weight of 1 everywhere is the unweighted loss
    torch.testing.assert_close(build_loss({**spec, "class_weight": [1.0] * 5})(x, target),
                               build_loss({k: v for k, v in spec.items() if k != "class_weight"})(x, target))


def test_softmax_ce_weights_the_target_class():
    x, labels = torch.randn(9, 5), torch.randint(0, 5, (9,))
    out = build_loss({"type": "CrossEntropyLoss", "class_weight": CW})(x, labels)
    torch.testing.assert_close(out, F.cross_entropy(x, labels, weight=torch.tensor(CW)), **VAL_TOL)


@pytest.mark.parametrize("value, message", [
    ([1.0, -1.0], "must be a list of numbers >= 0"),
    ([], "must be a list of numbers >= 0"),
    ("inverse", "or auto (from the training set's box counts), got 'inverse'"),
    ([1.0, float("nan")], "must be a list of numbers >= 0"),
])
def test_bad_class_weight_is_a_config_error_at_build(value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_loss({"type": "FocalLoss", "class_weight": value})


def test_length_and_unresolved_auto_are_config_errors_at_the_first_call():
    x = torch.randn(4, 5)
    with pytest.raises(ConfigError, match="class_weight has 3 entries but the logits have 5 classes"):
        build_loss({"type": "VarifocalLoss", "class_weight": [1, 2, 3]})(x, torch.rand(4, 5))
    with pytest.raises(ConfigError, match="class_weight: auto is computed from the training set"):
        build_loss({"type": "CrossEntropyLoss", "class_weight": "auto"})(x, torch.zeros(4, dtype=torch.long))


def test_resolve_replaces_auto_checks_lengths_and_leaves_the_input(coco_fixture, caplog):
    dataset = CocoDataset(str(coco_fixture), str(coco_fixture.parent / "images"))
    spec = {"type": "FCOS", "head": {"num_classes": 3, "losses": {
        "cls": {"type": "FocalLoss", "class_weight": "auto"},
        "centerness": [{"type": "CrossEntropyLoss", "use_sigmoid": True}]}}}
    with caplog.at_level("INFO", logger="detkit"):
        out = resolve_class_weights(spec, dataset)
    # classes by category id 3, 5, 7: one box each (the crowd box of class 3 is not counted)
    assert out["head"]["losses"]["cls"]["class_weight"] == pytest.approx([1.0, 1.0, 1.0])
    assert spec["head"]["losses"]["cls"]["class_weight"] == "auto"
    assert "model.head.losses.cls.class_weight: auto" in caplog.text and "boxes" in caplog.text
    # a model with a 4th class the data lacks: count 0, the cap, logged as such
    spec["head"]["num_classes"] = 4
    weights = resolve_class_weights(spec, dataset)["head"]["losses"]["cls"]["class_weight"]
    r = math.sqrt(3 / 4)  # N = 3 boxes, C = 4: (N / (C n_c))^0.5 for one box; the empty class gets the cap
    assert weights == pytest.approx([w / ((3 * r + 10) / 4) for w in (r, r, r, 10)])
    spec["head"]["losses"]["cls"]["class_weight"] = [1.0, 2.0]
    with pytest.raises(ConfigError, match=r"model.head.losses.cls.class_weight has 2 entries but the model has 4 "
                                          r"classes \(num_classes\)"):
        resolve_class_weights(spec, dataset)
    with pytest.raises(ConfigError, match="class_weight: auto needs the training set's annotation index"):
        resolve_class_weights({"head": {"losses": {"cls": {"type": "FocalLoss", "class_weight": "auto"}}}},
                              SimpleNamespace(classes=["a"]))


def test_auto_in_build_trainer_logs_the_table_and_keeps_the_numbers(tmp_path, caplog):
    """The engine resolves auto before it builds the model: the table is logged, config.yaml (and so
    every checkpoint's config) holds the numbers. A GHMR bbox term with momentum in the same model:
    its acc_sum is in the state dict that checkpoints save."""
    work = tmp_path / "work"
    cfg = load_config(FCOS_CFG, [*tiny_shapes(tmp_path / "data"), "model.head.losses.cls.class_weight=auto",
                                 "model.head.losses.bbox={type: GHMR, momentum: 0.7}"])
    with caplog.at_level("INFO", logger="detkit"):
        trainer = build_trainer(cfg, work, device="cpu")
    trainer.lock.release()
    assert "model.head.losses.cls.class_weight: auto = min(10, (N / (C n_c))^0.5) / mean" in caplog.text
    for name in ("circle", "square", "triangle", "star"):  # one row per class, by name
        assert any(line.strip().startswith(name) for line in caplog.text.splitlines())
    saved = load_config(work / "config.yaml")["model"]["head"]["losses"]["cls"]["class_weight"]
    assert len(saved) == 4 and sum(saved) / 4 == pytest.approx(1.0)
    cls_loss = next(m for m in trainer.model.modules() if type(m).__name__ == "FocalLoss")
    assert cls_loss.class_weight.tolist() == pytest.approx(saved)
    assert [k for k in trainer.model.state_dict() if k.endswith("acc_sum")] == ["head.losses.terms.bbox.0.acc_sum"]


def test_wrong_length_through_the_cli_exits_2_and_writes_nothing(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("unchanged")
    proc = run_main("train", "--config", str(FCOS_CFG), "--work-dir", str(work), "--device", "cpu", "--set",
                    *tiny_shapes(tmp_path / "data"), "model.head.losses.cls.class_weight=[1, 2, 3]")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.head.losses.cls.class_weight has 3 entries but the model has 4 classes" \
        in errors[0], proc.stderr[-2000:]
    assert [p.name for p in work.iterdir()] == ["keep.txt"] and (work / "keep.txt").read_text() == "unchanged"
