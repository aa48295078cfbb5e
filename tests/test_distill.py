"""Distillation: KnowledgeDistillationKLDivLoss against its formula, a GFL student with a frozen GFL teacher
(LD / KD terms, gradients, checkpoints) and a tiny CLI run with a teacher checkpoint."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detkit.config import load_config
from detkit.engine.checkpoint import load_checkpoint, save_checkpoint
from detkit.engine.compiled_step import CompiledLoss
from detkit.engine.teacher import load_teacher, with_teacher
from detkit.losses import build_loss
from detkit.models import build_detector
from detkit.models.gfl import GFL_LOSSES, GFLOutputs
from detkit.registry import HEADS, ConfigError
from tests.cli_runner import run_main, tiny_shapes

TOL = {"rtol": 1e-5, "atol": 1e-6}  # float32 loss against a float64 reference


def kl_by_hand(pred: torch.Tensor, soft: torch.Tensor, T: float) -> torch.Tensor:
    """mmdetection's per-row value written out: ``T^2 / K * sum_k q_k (log q_k - log p_k)``, with
    ``q = softmax(soft / T)``, ``p = softmax(pred / T)``; float64, no torch.nn.functional."""
    p, q = (pred.double() / T).exp(), (soft.double() / T).exp()
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    return T * T * (q * (q.log() - p.log())).sum(-1) / pred.shape[-1]


@pytest.mark.parametrize("T", [1.0, 2.0, 10.0])
def test_kl_loss_matches_formula_and_kl_div(T):
    pred, soft = torch.randn(6, 17) * 3, torch.randn(6, 17) * 3
    weight = torch.rand(6)
    loss = build_loss({"type": "KnowledgeDistillationKLDivLoss", "T": T, "loss_weight": 0.25})
    rows = kl_by_hand(pred, soft, T)
    torch.testing.assert_close(loss(pred, soft, reduction_override="none").double(), 0.25 * rows, **TOL)
    torch.testing.assert_close(loss(pred, soft, weight=weight, avg_factor=4.0).double(),
                               0.25 * (rows * weight.double()).sum() / 4.0, **TOL)
    # torch's own KL of the softened distributions, summed over classes: the loss is its mean times T^2
    by_torch = F.kl_div(F.log_softmax(pred / T, -1), F.softmax(soft / T, -1), reduction="batchmean")
    torch.testing.assert_close(loss(pred, soft, reduction_override="sum") / 0.25, by_torch * 6 * T * T / 17)
    assert float(loss(soft, soft)) == pytest.approx(0.0, abs=1e-6)


def test_kl_loss_gradient_reaches_only_the_student_and_stays_finite():
    pred = (torch.randn(4, 5) * 1e4).requires_grad_()
    soft = (torch.randn(4, 5) * 1e4).requires_grad_()
    out = build_loss({"type": "KnowledgeDistillationKLDivLoss"})(pred.half(), soft.bfloat16())
    out.backward()
    assert out.dtype == torch.float32 and math.isfinite(float(out.detach()))
    assert torch.isfinite(pred.grad).all() and soft.grad is None
    empty = build_loss({"type": "KnowledgeDistillationKLDivLoss"})(torch.zeros(0, 5), torch.zeros(0, 5))
    assert float(empty) == 0.0


@pytest.mark.parametrize("spec, message", [({"T": 0.5}, "T must be a number >= 1"),
                                           ({"reduction": "avg"}, "reduction")])
def test_kl_loss_refuses_bad_arguments(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_loss({"type": "KnowledgeDistillationKLDivLoss", **spec})
    with pytest.raises(ValueError, match="same shape"):
        build_loss({"type": "KnowledgeDistillationKLDivLoss"})(torch.zeros(2, 3), torch.zeros(2, 4))


# ----------------------------------------------------------------------------------------------
# A GFL student with a fixed teacher
# ----------------------------------------------------------------------------------------------

LD = {"type": "KnowledgeDistillationKLDivLoss", "T": 10, "loss_weight": 0.25}
KD = {"type": "KnowledgeDistillationKLDivLoss", "T": 2, "loss_weight": 0.5}
REG_MAX = 4


def tiny_head() -> torch.nn.Module:
    """A GFL head on two levels (strides 8, 16: 4x4 + 2x2 points for a 32x32 input) with LD and KD terms."""
    return HEADS.build({"type": "GFLHead", "num_classes": 3, "in_channels": 8, "feat_channels": 8, "num_convs": 1,
                        "strides": [8, 16], "reg_max": REG_MAX,
                        "assigner": {"type": "ATSSAssigner", "topk": 3, "anchor_scale": 2.0},
                        "losses": {**GFL_LOSSES, "ld": LD, "kd": KD}})


def random_outputs(scale: float = 1.0) -> GFLOutputs:
    maps = [(4, 4), (2, 2)]
    return GFLOutputs([torch.randn(2, 3, h, w) * scale for h, w in maps],
                      [torch.randn(2, 4 * (REG_MAX + 1), h, w) * scale for h, w in maps])


GT = (torch.tensor([[[2.0, 3.0, 20.0, 25.0]], [[8.0, 8.0, 30.0, 30.0]]]), torch.tensor([[1], [2]]),
      torch.tensor([[True], [True]]))


def flat(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per-level ``(B, K, H, W)`` -> ``(B, sum H W, K)``, finest level first, row-major cells."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)


def test_ld_and_kd_equal_their_formulas_on_a_hand_made_batch():
    head, student, teacher = tiny_head(), random_outputs(), random_outputs(2.0)
    losses = head.loss(student, *GT, teacher=teacher)
    # the positives from the head's own assigner; everything else by hand
    positive = head.assigner(head.priors(student.cls), *GT, 3, None).positive  # (B, P)
    s_cls, t_cls = flat(student.cls)[positive], flat(teacher.cls)[positive]  # (N, C) at the N positives
    s_sides, t_sides = (flat(d)[positive].reshape(-1, 4, REG_MAX + 1) for d in (student.distribution,
                                                                              teacher.distribution))
    weight = s_cls.sigmoid().amax(-1).double()  # the student's score at each positive
    ld = 0.25 * (kl_by_hand(s_sides, t_sides, 10.0) * weight[:, None]).sum() / 4
    kd = 0.5 * kl_by_hand(s_cls, t_cls, 2.0).sum() / positive.sum()
    assert positive.sum() > 1
    torch.testing.assert_close(losses["ld"].double(), ld, **TOL)
    torch.testing.assert_close(losses["kd"].double(), kd, **TOL)
    same = head.loss(student, *GT, teacher=student)
    assert float(same["ld"]) == pytest.approx(0.0, abs=1e-6) and float(same["kd"]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="need the teacher's outputs"):
        head.loss(student, *GT)


def tiny_gfl(**head) -> dict:
    return {"type": "GFL", "backbone": {"type": "ResNet", "depth": 18, "out_indices": [1, 2, 3]},
            "neck": {"type": "FPN", "out_channels": 16, "extra_levels": 2},
            "head": {"type": "GFLHead", "num_classes": 3, "feat_channels": 16, "num_convs": 1,
                     "assigner": {"type": "ATSSAssigner", "topk": 9, "anchor_scale": 2.0},
                     "losses": {**GFL_LOSSES, "ld": LD}, **head}}


@pytest.mark.slow
def test_teacher_is_frozen_moved_along_and_outside_the_student(tmp_path):
    torch.manual_seed(0)
    teacher_spec = tiny_gfl(losses=GFL_LOSSES, num_convs=2)  # another architecture than the student's
    weights = build_detector(teacher_spec).state_dict()
    save_checkpoint({"model": weights, "config": {"model": teacher_spec}, "classes": ["a", "b", "c"]},
                    tmp_path / "t.pth")
    student = with_teacher(build_detector({**tiny_gfl(), "teacher": {"checkpoint": str(tmp_path / "t.pth")}}),
                           ["a", "b", "c"])
    teacher = student.teacher.model
    # nothing of the teacher in the student's checkpoints, nor in its parameters (the optimizer's, EMA's, DDP's)
    assert {v.data_ptr() for v in student.state_dict().values()}.isdisjoint(
        v.data_ptr() for v in teacher.state_dict().values())
    assert {id(p) for p in student.parameters()}.isdisjoint(id(p) for p in teacher.parameters())
    assert copy.deepcopy(student).teacher is student.teacher  # EMA's copy shares the frozen teacher
    student.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[10.0, 10.0, 50.0, 44.0]]), "labels": torch.tensor([2])}]
    losses = student.loss(images, targets)
    assert float(losses["ld"].detach()) > 0  # (0 for a teacher equal to the student: the test above)
    sum(losses.values()).backward()
    assert student.head.reg_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    student.double()  # any _apply (.to(device), channels_last) reaches the teacher too
    assert next(teacher.parameters()).dtype == torch.float64
    with pytest.raises(ConfigError, match="train.compile: full does not run model.teacher"):
        CompiledLoss(student)  # its compiled loss calls the head without the teacher's outputs

    # refused, naming the key: no path (the example config's null), a missing file, weights of another
    # architecture, other classes (order matters)
    save_checkpoint({"model": weights, "config": {"model": tiny_gfl(losses=GFL_LOSSES)}}, tmp_path / "bad.pth")
    for spec, classes, message in [({"checkpoint": None}, None, "give the teacher's detkit checkpoint, e.g. --set"),
                                   ({"checkpoint": str(tmp_path / "no.pth")}, None, "file not found"),
                                   ({"checkpoint": str(tmp_path / "bad.pth")}, None, "bad.pth: its weights do not fit"),
                                   ({"checkpoint": str(tmp_path / "t.pth")}, ["c", "b", "a"], "in the same order")]:
        with pytest.raises(ConfigError, match=rf"^model\.teacher\.checkpoint: .*{message}"):
            load_teacher(spec, student, classes)


# ----------------------------------------------------------------------------------------------
# Through the CLI
# ----------------------------------------------------------------------------------------------

LD_CFG = Path(__file__).resolve().parents[1] / "configs" / "gfl" / "gfl_r18_fpn_shapes_ld.yaml"
SHAPES = ["circle", "square", "triangle", "star"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """The files under ``folder`` but the shapes images, which the first run that needs them generates."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "shapes_" not in str(p.relative_to(folder))}


def write_teacher(path: Path, data: Path, *overrides: str, classes: list[str] = SHAPES) -> Path:
    """An untrained teacher checkpoint for the tiny shapes student (two tower convs: another architecture)."""
    cfg = load_config(LD_CFG, [*tiny_shapes(data), "model.head.num_convs=2", *overrides])
    del cfg["model"]["teacher"], cfg["model"]["head"]["losses"]["ld"]
    torch.manual_seed(1)
    save_checkpoint({"model": build_detector(cfg["model"]).state_dict(), "config": cfg, "classes": classes}, path)
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distill")


@pytest.mark.slow
def test_cli_trains_a_gfl_student_with_a_teacher_checkpoint(shapes):
    teacher = write_teacher(shapes / "teacher.pth", shapes / "data")
    work, config = shapes / "work", shapes / "ld_kd.yaml"
    config.write_text(f"_base_: {LD_CFG}\nmodel: {{head: {{losses: {{kd: {{type: KnowledgeDistillationKLDivLoss, "
                      f"T: 2}}}}}}}}\n")  # the optional KD term too
    out = run_main("train", "--config", str(config), "--work-dir", str(work), "--device", "cpu", "--set",
                   *tiny_shapes(shapes / "data"), f"model.teacher.checkpoint={teacher}", "train.log_interval=1",
                   "data.train.num_images=2")  # one step
    assert out.returncode == 0, out.stderr[-3000:]
    logged = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if "ld" in r]
    assert train and all(math.isfinite(r["ld"]) and math.isfinite(r["kd"]) for r in train)
    saved = load_checkpoint(work / "latest.pth")
    student = build_detector({**saved["config"]["model"], "teacher": None,
                              "head": {**saved["config"]["model"]["head"], "losses": GFL_LOSSES}})
    assert set(saved["model"]) == set(student.state_dict())  # no teacher tensor in the student's checkpoint
    assert not any("teacher" in k for k in saved["model"])


@pytest.mark.parametrize("teacher, message", [
    ("classes.pth", "has num_classes 3, the student 4"),
    ("fcos.pth", "with a FCOSHead; the student's head is a GFLHead"),
])
@pytest.mark.slow
def test_cli_refuses_a_bad_teacher_before_writing(shapes, teacher, message):
    data = shapes / "data"
    makers = {"classes.pth": lambda p: write_teacher(p, data, "model.head.num_classes=3"),
              "fcos.pth": lambda p: save_checkpoint({"model": {}, "config": load_config(
                  LD_CFG.parents[1] / "fcos" / "fcos_r18_fpn_shapes.yaml", tiny_shapes(data))}, p)}
    makers[teacher](shapes / teacher)
    before = snapshot(shapes)
    out = run_main("train", "--config", str(LD_CFG), "--work-dir", str(shapes / "refused"), "--device", "cpu",
                   "--set", *tiny_shapes(data), f"model.teacher.checkpoint={shapes / teacher}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert snapshot(shapes) == before and not (shapes / "refused").exists()
