"""Whole training epochs through the real trainer, for several configs on the same data, alternated.

Micro-benchmarks of one step miss what happens between the loader and the model (collation, target
padding, logging, hooks, synchronisation); this times what a user's wall clock sees. Used by
``tools/benchmark.py --sections epochs``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from detkit.bench.common import sync
from detkit.config import load_config
from detkit.engine.hooks import Hook
from detkit.engine.runner import build_trainer


class EpochTimer(Hook):
    """Seconds of each epoch's steps and data loading (measured before evaluation and checkpoints run)."""

    priority = 0

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def before_epoch(self, trainer: Any) -> None:
        self.start = time.perf_counter()

    def after_epoch(self, trainer: Any) -> None:
        sync(trainer.device)
        self.seconds.append(time.perf_counter() - self.start)


def epoch_seconds(config: str | Path, overrides: Sequence[str], device: str, epochs: int) -> list[float]:
    """Per-epoch seconds of ``epochs`` epochs of ``config`` (no evaluation, no writers) in a scratch work dir."""
    cfg = load_config(config, [*overrides, f"train.epochs={epochs}", "train.writers=[]",
                               f"train.log_interval={10 ** 9}"])
    cfg["data"].pop("val", None)
    with tempfile.TemporaryDirectory() as work:
        trainer = build_trainer(cfg, Path(work), device=device)
        assert trainer is not None, "None only for a finished resumed run"
        timer = EpochTimer()
        trainer.hooks.insert(0, timer)
        trainer.train()
    return timer.seconds


def bench_epochs(configs: dict[str, str | Path], overrides: Sequence[str], device: str, epochs: int = 2,
                 rounds: int = 2) -> list[dict[str, Any]]:
    """Median epoch time of each config over ``rounds`` alternated runs of ``epochs`` epochs (the first
    epoch of each run is warm-up and dropped), with the ratio to the first config."""
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, config in configs.items():
            times[name] += epoch_seconds(config, overrides, device, epochs)[1:]
    reference = statistics.median(times[next(iter(configs))])
    return [{"config": name, "epoch_s": round(statistics.median(t), 2), "epochs_timed": len(t),
             f"speed_vs_{next(iter(configs))}": round(reference / statistics.median(t), 3)}
            for name, t in times.items()]
