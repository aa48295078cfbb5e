"""The training loop's mechanics on a toy model: hook order, accumulation, interrupts, resume, early
stopping, loss-weight schedules and uncertainty balancing, fp16 skipped steps. Each runs in well
under a second (the variants with DataLoader workers are marked slow)."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from detkit.data.sampler import EpochSampler, SeededDataset
from detkit.engine import Hook, Trainer, TrainingInterrupted, load_checkpoint
from detkit.engine.evaluator import EvalSettings, Evaluation
from detkit.engine.hooks import (
    HOOKS,
    AssignerHealthHook,
    BestCheckpointHook,
    CheckpointHook,
    EarlyStopHook,
    EMAHook,
    EvalHook,
    EvalRecord,
    LoggerHook,
    LossWeightScheduleHook,
    LRScheduleHook,
)
from detkit.engine.hooks.balance import Uncertainty
from detkit.losses import L1Loss
from detkit.registry import ConfigError


class ToyData(Dataset):
    """Item i: a 3x4x4 image of value i plus random noise (an 'augmentation' drawn from torch's RNG)."""

    def __init__(self, n: int = 16) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((3, 4, 4), float(i)) + torch.rand(3, 4, 4), {"y": torch.tensor([float(i % 3)])}


def collate(items):
    return {"images": torch.stack([x for x, _ in items]), "targets": [t for _, t in items]}


class ToyModel(nn.Module):
    """A linear regressor with two loss terms (no batch statistics: accumulation must be exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(48, 1)
        self.l1 = L1Loss(loss_weight=0.1)

    def forward(self, images, targets):
        pred = self.lin(images.flatten(1) / 16).squeeze(1)
        y = torch.cat([t["y"] for t in targets])
        return {"mse": ((pred - y) ** 2).mean(), "l1": self.l1(pred, y)}

    def loss_names(self):
        return ["mse", "l1"]

    def weight_schedules(self):  # as Detector's
        return [m.weight_schedule for m in self.modules() if isinstance(m, L1Loss) and m.weight_schedule is not None]


def toy_trainer(work, hooks=(), batch=4, accumulate=1, epochs=2, workers=0, state=None, n=16, model=None):
    torch.manual_seed(0)
    model = model or ToyModel()
    loader = DataLoader(SeededDataset(ToyData(n)), batch_size=batch, sampler=EpochSampler(n, True, seed=3),
                        num_workers=workers, collate_fn=collate, generator=torch.Generator())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hooks = [LRScheduleHook({"type": "WarmupCosine", "warmup_iters": 2}), CheckpointHook(keep=0), *hooks]
    return Trainer(model, optimizer, loader, hooks, work_dir=work, device=torch.device("cpu"), epochs=epochs,
                   accumulate=accumulate, state=state, cfg={"toy": True})


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


class Recorder(Hook):
    def __init__(self) -> None:
        self.calls = []

    def before_train(self, t):
        self.calls.append("before_train")

    def before_epoch(self, t):
        self.calls.append(f"before_epoch {t.epoch}")

    def before_step(self, t):
        self.calls.append(f"before_step {t.inner}")

    def after_forward(self, t, losses):
        self.calls.append(f"after_forward {sorted(losses)}")
        return losses

    def after_step(self, t):
        self.calls.append(f"after_step {t.inner}")

    def after_epoch(self, t):
        self.calls.append(f"after_epoch {t.epoch}")

    def after_train(self, t):
        self.calls.append("after_train")


def test_hooks_run_in_order_and_by_priority(tmp_path):
    rec = Recorder()
    early, late = Recorder(), Recorder()
    early.priority, late.priority = 5, 95
    trainer = toy_trainer(tmp_path, [late, rec, early], n=8, epochs=2)
    assert [h.priority for h in trainer.hooks] == sorted(h.priority for h in trainer.hooks)
    trainer.train()
    step = ["before_step 0", "after_forward ['l1', 'mse']", "after_step 1",
            "before_step 1", "after_forward ['l1', 'mse']", "after_step 2"]
    assert rec.calls == ["before_train", "before_epoch 0", *step, "after_epoch 1",
                         "before_epoch 1", *step, "after_epoch 2", "after_train"]
    assert early.calls == rec.calls == late.calls
    assert trainer.iter == 4 and (tmp_path / "epoch_2.pth").is_file() and (tmp_path / "model_final.pth").is_file()


def test_evaluation_hooks_run_after_each_other_in_a_fixed_order():
    import detkit.build  # noqa: F401  (registers detkit.analysis's DiagnosticsHook, as the CLI does)

    # evaluate, save best.pth, queue the pictures, maybe stop, save the epoch, measure the assigner, log
    order = [EvalHook, BestCheckpointHook, HOOKS.get("DiagnosticsHook"), EarlyStopHook, CheckpointHook,
             AssignerHealthHook, LoggerHook]
    assert [h.priority for h in order] == [60, 61, 62, 65, 70, 75, 80]


def test_val_pictures_come_from_the_registered_diagnostics_hook_or_a_warning(monkeypatch):
    import detkit.build  # noqa: F401  (registers detkit.analysis's DiagnosticsHook, as the CLI does)
    from detkit.engine import hooks

    assert hooks.picture_hooks("val set", 0, EvalSettings(diagnostics=False), None) == []  # nothing to draw
    assert [h.name for h in hooks.picture_hooks("val set", 4, EvalSettings(), None)] == ["DiagnosticsHook"]
    said = []
    monkeypatch.setattr(hooks.logger, "warning", lambda msg, *args: said.append(msg % args))
    monkeypatch.delitem(HOOKS._entries, "DiagnosticsHook")  # the engine used without detkit.build
    assert hooks.picture_hooks("val set", 4, EvalSettings(), None) == []
    assert len(said) == 1 and "no val pictures nor eval_epoch_N/" in said[0] and "import detkit.build" in said[0]


def test_best_value_resumes_from_a_checkpoint_saved_before_the_split(tmp_path):
    best = BestCheckpointHook("AP")
    trainer = toy_trainer(tmp_path, [best], n=4, epochs=1)
    state = {**trainer.state_dict(), "hooks": {"EvalHook": {"best": 0.25, "best_epoch": 3}}}  # EvalHook kept it
    trainer.load_state_dict(state)
    assert (best.best, best.best_epoch) == (0.25, 3)
    assert "EvalHook" not in trainer.state_dict()["hooks"]  # saved under its own name from now on


def test_accumulation_equals_the_large_batch(tmp_path):
    big = toy_trainer(tmp_path / "big", batch=8, epochs=3)
    big.train()
    small = toy_trainer(tmp_path / "small", batch=4, accumulate=2, epochs=3)
    small.train()
    assert big.iter == small.iter == 6  # schedules, EMA and logs count optimizer steps
    for x, y in zip(big.model.parameters(), small.model.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


class SignalAt(Hook):
    """Sends ``signum`` to this process after optimizer step ``at`` (as a user's Ctrl-C would)."""

    def __init__(self, at: int, signum: int) -> None:
        self.at, self.signum = at, signum

    def after_step(self, t):
        if t.iter == self.at:
            os.kill(os.getpid(), self.signum)


def interrupted_then_resumed(tmp_path, signum, workers=0, accumulate=1):
    straight = toy_trainer(tmp_path / "straight", [EMAHook(0.9, 2)], epochs=3, workers=workers, accumulate=accumulate)
    straight.train()
    first = toy_trainer(tmp_path / "split", [EMAHook(0.9, 2), SignalAt(5, signum)], epochs=3, workers=workers,
                        accumulate=accumulate)
    with pytest.raises(TrainingInterrupted) as stop:
        first.train()
    assert stop.value.exit_code == 128 + signum
    state = load_checkpoint(tmp_path / "split/latest.pth")
    assert (state["iter"], state["epoch"]) == (5, 5 // first.steps_per_epoch) and state["inner"] > 0  # mid-epoch
    torch.manual_seed(99)  # disturb the global RNG: the resume must restore it
    resumed = toy_trainer(tmp_path / "split", [EMAHook(0.9, 2)], epochs=3, workers=workers, accumulate=accumulate,
                          state=state)
    resumed.train()
    assert resumed.iter == straight.iter
    assert same_weights(straight.model, resumed.model)
    assert same_weights(straight.ema_model, resumed.ema_model)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_epoch_saves_and_resumes_bit_identically(tmp_path, signum):
    interrupted_then_resumed(tmp_path, signum)


@pytest.mark.slow
def test_mid_epoch_resume_is_bit_identical_with_workers_and_accumulation(tmp_path):
    interrupted_then_resumed(tmp_path, signal.SIGINT, workers=2, accumulate=2)


def test_signal_handlers_are_restored(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    toy_trainer(tmp_path, n=4, epochs=1).train()
    assert signal.getsignal(signal.SIGINT) is before


class FakeEval(Hook):
    priority = 60  # where EvalHook runs

    def __init__(self, values):
        self.values = values

    def after_epoch(self, t):
        t.last_eval = EvalRecord(t.epoch, t.iter, {"AP": self.values[t.epoch - 1]}, {}, Evaluation({}))


def test_early_stopping_stops_after_patience_and_still_writes_final_files(tmp_path):
    stop = EarlyStopHook(metric="AP", patience=2, min_delta=0.01)
    trainer = toy_trainer(tmp_path, [FakeEval([0.1, 0.3, 0.305, 0.29, 0.5, 0.6]), stop], n=4, epochs=6)
    trainer.train()
    assert trainer.epoch == 4
    assert "best 0.3000 at epoch 2" in trainer.stop_reason
    assert (tmp_path / "epoch_4.pth").is_file() and (tmp_path / "model_final.pth").is_file()
    assert load_checkpoint(tmp_path / "latest.pth")["hooks"]["EarlyStopHook"] == {"best": 0.3, "best_epoch": 2,
                                                                                  "bad": 2}


def test_loss_weight_schedules_give_the_stated_weight():
    from detkit.losses import build_loss

    linear = build_loss({"type": "L1Loss", "loss_weight": {"type": "LinearWeight", "start": 0.0, "end": 2.0,
                                                            "iters": 10, "begin": 5}})
    cosine = build_loss({"type": "L1Loss", "loss_weight": {"type": "CosineWeight", "start": 1.0, "end": 0.0,
                                                            "iters": 4}})
    expected = {0: (0.0, 1.0), 5: (0.0, 0.0), 7: (0.4, 0.0), 10: (1.0, 0.0), 15: (2.0, 0.0), 99: (2.0, 0.0)}
    for it, (lin, _) in expected.items():
        linear.weight_schedule.iter = it
        assert linear.loss_weight == pytest.approx(lin)
    for it, value in {0: 1.0, 1: 0.5 * (1 + math.cos(math.pi / 4)), 2: 0.5, 4: 0.0}.items():
        cosine.weight_schedule.iter = it
        assert cosine.loss_weight == pytest.approx(value)
    pred, target = torch.ones(3), torch.zeros(3)
    linear.weight_schedule.iter = 10
    assert float(linear(pred, target)) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="loss_weight must be a number or a schedule"):
        build_loss({"type": "L1Loss", "loss_weight": "1"})


class WeightSeen(Hook):
    priority = 30

    def __init__(self):
        self.seen = {}

    def before_step(self, t):
        self.seen[t.iter] = t.model.l1.loss_weight


def test_scheduled_weight_follows_the_iteration_across_a_resume(tmp_path):
    def model():
        m = ToyModel()
        m.l1 = L1Loss(loss_weight={"type": "LinearWeight", "start": 0.0, "end": 1.0, "iters": 6})
        return m

    straight_seen, split_seen = WeightSeen(), WeightSeen()
    toy_trainer(tmp_path / "a", [LossWeightScheduleHook(), straight_seen], model=model(), n=8, epochs=4).train()
    first = toy_trainer(tmp_path / "b", [LossWeightScheduleHook(), split_seen, SignalAt(3, signal.SIGINT)],
                        model=model(), n=8, epochs=4)
    with pytest.raises(TrainingInterrupted):
        first.train()
    toy_trainer(tmp_path / "b", [LossWeightScheduleHook(), split_seen], model=model(), n=8, epochs=4,
                state=load_checkpoint(tmp_path / "b/latest.pth")).train()
    assert split_seen.seen == straight_seen.seen
    assert straight_seen.seen[3] == pytest.approx(0.5) and straight_seen.seen[7] == 1.0


class ScaledTerms(ToyModel):
    def forward(self, images, targets):
        pred = self.lin(images.flatten(1) / 16).squeeze(1)
        return {"big": 10.0 + 0 * pred.sum(), "small": 0.1 + 0 * pred.sum()}

    def loss_names(self):
        return ["big", "small"]


def test_uncertainty_balancing_moves_weights_as_the_formula_says(tmp_path):
    balance = Uncertainty()
    trainer = toy_trainer(tmp_path, [balance], model=ScaledTerms(), n=8, epochs=3)
    trainer.train()
    weights = trainer.result.extras["loss_weight"]
    # d/ds (exp(-s) L + s) = 1 - exp(-s) L: s rises for L > 1 (weight falls), falls for L < 1
    assert weights["big"] < 1.0 < weights["small"]
    saved = load_checkpoint(tmp_path / "latest.pth")["hooks"]["Uncertainty"]["log_vars"]
    assert float(saved["big"]) > 0 > float(saved["small"])
    assert len(trainer.optimizer.param_groups) == 2  # the log-variances are optimizer parameters


def test_fp16_overflow_step_advances_neither_schedule_nor_ema(tmp_path):
    seen = WeightSeen()
    ema = EMAHook(0.5, 1)
    trainer = toy_trainer(tmp_path, [ema, seen], n=8, epochs=1)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # the first steps overflow
    lrs = []

    class LR(Hook):
        priority = 30

        def before_step(self, t):
            lrs.append(t.optimizer.param_groups[0]["lr"])

        def after_step(self, t):
            lrs.append(t.result.applied)

    trainer.hooks.append(LR())
    trainer.train()
    assert lrs[1] is False and lrs[2] == lrs[0]  # skipped: the next step keeps the LR of iteration 0
    assert trainer.iter < 2 and int(ema.averaged.n_averaged) == trainer.iter


def test_unknown_writer_package_is_named(tmp_path, monkeypatch):
    import builtins

    from detkit.engine.writers import build_writers

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match=r"WandbWriter needs the 'wandb' package: pip install wandb"):
        build_writers([{"type": "WandbWriter"}], tmp_path, None, True)


def test_dataloader_workers_leave_signals_to_the_main_process():
    from detkit.data.loader import ignore_interrupts

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ignore_interrupts(0)  # what every worker runs first: a terminal's Ctrl-C reaches the whole group
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in before)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
