"""The engine's run set-up: planning writes nothing, the hooks run in their fixed order, the first training
steps of the default config stay bit-identical while the engine is restructured, the engine imports only
the layers below it and keeps its functions short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import detkit.build  # noqa: F401  (registers DiagnosticsHook, as the CLI does)
from detkit.config import load_config
from detkit.engine import Hook
from detkit.engine.hooks.schedule import weight_schedules
from detkit.engine.plan import plan_run
from detkit.engine.runner import start_run
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


class EnoughSteps(Exception):
    pass


class StepLosses(Hook):
    """Test-only: the weighted terms and total of every applied step, as float.hex strings; stops the run
    (before the end-of-epoch evaluation) after ``steps`` steps."""

    priority = 90

    def __init__(self, steps: int) -> None:
        self.stop, self.steps = steps, []

    def after_step(self, trainer) -> None:
        result = trainer.result
        self.steps.append({**{k: float(v).hex() for k, v in result.losses.items()}, "total": float(result.total).hex()})
        if len(self.steps) == self.stop:
            raise EnoughSteps


def test_plan_writes_nothing_and_the_first_steps_are_bit_identical(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recorded sums are of one thread's reduction order
    work = tmp_path / "work"
    try:
        cfg = load_config(DEFAULT_CFG, tiny_shapes(tmp_path / "data") + ["data.train.num_images=6", "train.seed=0"])
        plan = plan_run(cfg, work, device="cpu")
        assert not work.exists()  # every component built and checked, no file written, no lock taken
        trainer = start_run(plan)
        assert (work / ".lock").is_file() and (work / "config.yaml").is_file() and trainer.lock is not None
        # evaluate, save best.pth, queue the pictures (EarlyStopHook 65, AssignerHealthHook 75: not asked for here)
        assert [h.name for h in trainer.hooks][-6:] == ["TermGradNormHook", "EvalHook", "BestCheckpointHook",
                                                      "DiagnosticsHook", "CheckpointHook", "LoggerHook"]
        losses = StepLosses(3)
        trainer.hooks.append(losses)
        try:
            with pytest.raises(EnoughSteps):
                trainer.train()
        finally:
            trainer.writers.close()
    finally:
        torch.set_num_threads(threads)
    assert losses.steps == FIRST_STEPS
    assert trainer.lock.file is None  # released when train() ended


def test_no_engine_function_is_over_60_lines():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted((ROOT / "detkit/engine").rglob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert long == []


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
