"""Benchmarks and the fast training paths: the config time split, train.compile: full, channels_last, amp auto."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from detkit.bench.peers import bench_assigners
from detkit.bench.split import PartTimer
from detkit.config import load_config
from detkit.engine.compiled_step import CompiledLoss, bucket_images, bucket_targets
from detkit.engine.precision import resolve_amp
from detkit.engine.settings import TrainSettings
from detkit.models import build_detector
from detkit.registry import BACKBONES
from tests.cli_runner import tiny_shapes

ROOT = Path(__file__).resolve().parents[1]
FCOS_CFG = ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"


def benchmark_main():
    spec = importlib.util.spec_from_file_location("benchmark_tool", ROOT / "tools/benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@BACKBONES.register()
class BenchToyBackbone(nn.Module):
    """Three strided 3x3 convs with BN (strides 8, 16, 32): a backbone that compiles in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.out_channels, self.strides = [8, 8, 8], [8, 16, 32]
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.ModuleList([nn.Conv2d(8, 8, 3, 2, 1) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(x)]
        for conv in self.down:
            feats.append(conv(feats[-1]))
        return feats


#: ``--set`` overrides that make the default FCOS config's model tiny.
TOY_MODEL = ["model.backbone={type: BenchToyBackbone}", "model.neck.out_channels=8", "model.head.feat_channels=8",
             "model.head.num_convs=1"]


def toy_detector() -> nn.Module:
    torch.manual_seed(0)
    return build_detector(load_config(FCOS_CFG, TOY_MODEL)["model"])


def toy_batch(size: int = 64, gts: int = 3):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=g)
    xy = torch.rand(2, gts, 2, generator=g) * size / 2
    boxes = torch.cat([xy, xy + 8 + torch.rand(2, gts, 2, generator=g) * size / 2], -1)
    return images, [{"boxes": b, "labels": torch.tensor([0, 3, 1][:gts])} for b in boxes]


def test_quick_config_benchmark_splits_the_step(tmp_path, capsys):
    """The --config split on toy overrides: every part present, the rows sum, the check printed, json written."""
    out = tmp_path / "out"
    assert benchmark_main()(["--config", str(FCOS_CFG), "--quick", "--device", "cpu", "--out", str(out),
                             "--set", *tiny_shapes(tmp_path / "data"), *TOY_MODEL, "train.writers=[]"]) == 0
    printed = capsys.readouterr().out
    assert "### where the training step goes" in printed and "check: sum of parts" in printed
    results = json.loads((out / "benchmark.json").read_text())
    parts = {row["part"]: row["ms_per_step"] for row in results["split"]}
    assert {"data wait", "normalise", "backbone+neck", "head", "targets (pad)", "assigner", "losses", "backward",
            "optimizer (clip + step)", "hooks (LR, logging)"} <= set(parts)
    assert all(v >= 0 for v in parts.values())
    named = sum(v for k, v in parts.items() if k not in ("sum of parts", "split steps (wall)", "measured step (plain)"))
    assert named == pytest.approx(parts["sum of parts"])
    assert 0.9 * parts["split steps (wall)"] <= named <= parts["split steps (wall)"]  # the parts cover the step
    summary = results["config"][0]
    assert summary["batch_size"] == 2 and summary["train_img_s"] > 0 and summary["inference_img_s"] > 0


def test_part_timer_counts_nested_parts_exclusively():
    """Against known sleeps: a parent's time excludes its timed child; nothing counts while disabled."""
    class Work:
        def child(self):
            time.sleep(0.01)

        def parent(self):
            time.sleep(0.02)
            self.child()

    work, timer = Work(), PartTimer(torch.device("cpu"))
    timer.wrap(work, "child", "child")
    timer.wrap(work, "parent", "parent")
    work.parent()
    assert not timer.seconds
    timer.enabled = True
    work.parent()
    timer.restore()
    assert 0.02 <= timer.seconds["parent"] < 0.035 and 0.01 <= timer.seconds["child"] < 0.025
    assert "child" not in vars(work) and "parent" not in vars(work)


def test_bucketing_pads_to_static_shapes_without_changing_eager_losses():
    model = toy_detector()
    images, targets = toy_batch(size=64)
    assert bucket_images(images).shape[-2:] == (128, 128)
    from detkit.models.detector import pad_targets

    boxes, labels, mask = pad_targets(targets, torch.device("cpu"), 4)
    padded = bucket_targets(boxes, labels, mask)
    assert padded[0].shape[1] == 8 and padded[2].sum() == mask.sum()
    nine = bucket_targets(torch.zeros(2, 9, 4), torch.zeros(2, 9, dtype=torch.int64), torch.ones(2, 9, dtype=torch.bool))
    assert [t.shape[1] for t in nine] == [16, 16, 16] and nine[2].sum() == 18
    plain = model.head.loss(model.head(model.features(images)), boxes, labels, mask)
    bucketed = model.head.loss(model.head(model.features(images)), *padded)
    for k in plain:
        torch.testing.assert_close(bucketed[k], plain[k], rtol=0, atol=0)


def compiled_matches_eager(backend: str) -> None:
    """``CompiledLoss`` on a fixed batch: the losses and the gradients of eager at the bucketed shape."""
    model = toy_detector()
    images, targets = toy_batch(size=64)
    compiled = CompiledLoss(model, backend=backend)
    eager = model.loss(bucket_images(images), targets)
    grads = torch.autograd.grad(sum(eager.values()), list(model.parameters()), allow_unused=True)
    out = compiled(images, targets)
    assert out.keys() == eager.keys()
    for k in eager:
        torch.testing.assert_close(out[k], eager[k], rtol=1e-5, atol=1e-6)
    sum(out.values()).backward()
    for p, g in zip(model.parameters(), grads):
        if g is not None:
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_step_traces_to_eager_losses_and_gradients():
    # dynamo + AOTAutograd's forward/backward split without inductor's code generation, which takes 1.5 min
    # on 2 cores for this toy (compiled_matches_eager("inductor") passes too; docs/benchmarks.md)
    compiled_matches_eager("aot_eager")


def test_fast_path_settings_and_runner_wiring(tmp_path):
    """amp auto, channels_last and compile: full are validated, resolved and wired by the runner."""
    from detkit.engine.hooks import TermGradNormHook
    from detkit.engine.runner import build_trainer
    from detkit.registry import ConfigError

    cpu = torch.device("cpu")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_amp("auto", cpu) == ("bf16" if native else None) and resolve_amp(None, cpu) is None
    for bad in ({"channels_last": "yes"}, {"compile": "max"}, {"amp": "fp32"}):
        with pytest.raises(ConfigError, match=f"train.{next(iter(bad))}"):
            TrainSettings.from_config({"train": bad})
    cfg = load_config(FCOS_CFG, [*tiny_shapes(tmp_path / "data"), "train.compile=full", "train.channels_last=true",
                                 "train.amp=auto", "train.writers=[]"])
    cfg["data"].pop("val")
    trainer = build_trainer(cfg, tmp_path / "work", device="cpu")
    trainer.lock.release()
    assert isinstance(trainer.train_model, CompiledLoss) and trainer.train_model.model is trainer.model
    assert trainer.optimizer.defaults["fused"] is True and trainer.amp == resolve_amp("auto", cpu)
    assert not any(isinstance(h, TermGradNormHook) for h in trainer.hooks)
    conv = trainer.model.backbone.stem[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_channels_last_step_gives_the_contiguous_losses(tmp_path):
    """One trainer step in channels_last memory format: the same losses and update as the default layout."""
    from detkit.engine.trainer import Trainer

    images, targets = toy_batch()
    results = []
    for channels_last in (False, True):
        model = toy_detector()
        model = model.to(memory_format=torch.channels_last) if channels_last else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        trainer = Trainer(model, opt, [], [], work_dir=tmp_path, device=torch.device("cpu"), epochs=1,
                          channels_last=channels_last)
        trainer.run_step([{"images": images, "targets": targets}])
        assert trainer.result.applied
        results.append((trainer.result.losses, model.backbone.stem[0].weight.detach().clone()))
    assert results[1][1].is_contiguous(memory_format=torch.channels_last)
    for k, v in results[0][0].items():
        torch.testing.assert_close(results[1][0][k], v, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_quick_benchmark_prints_all_tables(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/benchmark.py"), "--quick", "--device", "cpu",
                           "--out", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, check=True)
    for title in ("### losses", "### assigners", "### train step", "### data loading"):
        assert title in proc.stdout
    results = json.loads((tmp_path / "out/benchmark.json").read_text())
    assert {"machine", "losses", "assigners", "train_step", "loading"} <= set(results)
    assert {row["loss"] for row in results["losses"]} >= {"FocalLoss", "GIoULoss", "GaussianFocalLoss"}
    assert all(row["speedup"] > 0 for row in results["losses"] + results["assigners"])
    assert results["train_step"][0]["ratio"] > 0


def test_fused_optimizer_is_default_but_not_with_foreach():
    from detkit.engine.plan import fused_optimizer_spec

    assert fused_optimizer_spec({"type": "AdamW", "lr": 1e-3})["fused"] is True
    assert fused_optimizer_spec({"type": "AdamW", "fused": False})["fused"] is False
    assert "fused" not in fused_optimizer_spec({"type": "AdamW", "foreach": True})  # torch refuses both
    assert "fused" not in fused_optimizer_spec({"type": "RMSprop"})


NO_CUDA = not torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(NO_CUDA, reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_assigner_benchmark_agrees_with_references_on_each_device(device):
    """Every batched assigner equals its per-image reference on the device's tensors, and is timed against it
    (the ATSS reference built its indices on the CPU: the first GPU run of the section stopped there)."""
    rows = bench_assigners(torch.device(device), [(96, 128)], 2, 3, 1)
    assert [r["assigner"] for r in rows] == ["FCOS", "ATSS", "TaskAligned", "SimOTA", "CenterNet"]
    assert all(r["detkit"] > 0 and r["reference"] > 0 for r in rows)
