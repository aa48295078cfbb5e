"""The engine's run set-up: the first training steps of the default config stay bit-identical while the
engine is restructured, and the engine imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from detkit.config import load_config
from detkit.engine import Hook, build_trainer
from detkit.engine.hooks.schedule import weight_schedules
from detkit.models import build_detector
from tests.cli_runner import tiny_shapes

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CFG = ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"

# Weighted terms and total of optimizer steps 1-3 (float32, as float.hex), recorded at commit 874e774
# (before the engine was split into plan / start and the EvalHook into three hooks), 1 thread, seed 0.
FIRST_STEPS = [
    {"cls": "0x1.22a8980000000p+0", "bbox": "0x1.fedcda0000000p-1", "centerness": "0x1.64d0180000000p-1",
     "total": "0x1.6a3f880000000p+1"},
    {"cls": "0x1.21045a0000000p+0", "bbox": "0x1.ff8de00000000p-1", "centerness": "0x1.6254c80000000p-1",
     "total": "0x1.68fad60000000p+1"},
    {"cls": "0x1.1f039c0000000p+0", "bbox": "0x1.fe44ce0000000p-1", "centerness": "0x1.58b5f00000000p-1",
     "total": "0x1.65407e0000000p+1"},
]


class StepLosses(Hook):
    """Test-only: the weighted terms and total of every applied step, as float.hex strings."""

    priority = 90

    def __init__(self) -> None:
        self.steps: list[dict[str, str]] = []

    def after_step(self, trainer) -> None:
        result = trainer.result
        self.steps.append({**{k: float(v).hex() for k, v in result.losses.items()}, "total": float(result.total).hex()})


def test_first_steps_of_the_default_config_are_bit_identical(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recorded sums are of one thread's reduction order
    try:
        cfg = load_config(DEFAULT_CFG, tiny_shapes(tmp_path / "data") + ["data.train.num_images=6", "train.seed=0"])
        del cfg["data"]["val"]  # the losses only: no evaluation
        trainer = build_trainer(cfg, tmp_path / "work", device="cpu")
        losses = StepLosses()
        trainer.hooks.append(losses)
        try:
            trainer.train()
        finally:
            trainer.writers.close()
    finally:
        torch.set_num_threads(threads)
    assert losses.steps == FIRST_STEPS


def test_the_engine_imports_no_layer_above_it_nor_the_plotting():
    above = ("detkit.analysis", "detkit.bench", "detkit.api", "detkit.cli", "detkit.export", "detkit.visualize")
    found = []
    for path in sorted((ROOT / "detkit/engine").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.startswith(above)]
    assert found == []


def test_detector_lists_its_scheduled_loss_weights_once():
    small = ["model.neck.out_channels=16", "model.head.feat_channels=16", "model.head.num_convs=1"]
    cfg = load_config(DEFAULT_CFG, [*small, "model.head.losses.bbox.loss_weight={type: LinearWeight, start: 0.0, "
                                            "end: 2.0, iters: 10}"])
    model = build_detector(cfg["model"])
    schedules = model.weight_schedules()
    assert schedules == [model.head.losses.terms["bbox"][0].weight_schedule] and model.weight_schedules() is schedules
    assert weight_schedules(model) is schedules and weight_schedules(torch.nn.Linear(1, 1)) == []
    assert build_detector(load_config(DEFAULT_CFG)["model"]).weight_schedules() == []
