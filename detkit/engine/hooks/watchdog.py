"""Multi-process runs: the same number of steps on every rank each epoch, and a stall watchdog."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch.distributed as dist

from detkit.distributed import all_gather_objects
from detkit.engine.hooks.base import Hook
from detkit.engine.watchdog import StallWatchdog
from detkit.registry import ConfigError

if TYPE_CHECKING:
    from detkit.engine.trainer import Trainer


def check_equal_steps(steps: list[int], epoch: int) -> None:
    """``steps[r]``: the steps rank r is about to run in ``epoch`` (1-based); unequal counts would leave
    the ranks with more steps waiting forever in a collective the others never call."""
    if len(set(steps)) > 1:
        counts = ", ".join(f"rank {r}: {n}" for r, n in enumerate(steps))
        raise ConfigError(f"epoch {epoch}: the ranks would run different numbers of steps ({counts}), and DDP "
                          f"would hang at the end of the epoch; every rank's sampler must yield the same number "
                          f"of batches (detkit's samplers pad each rank's share to the same length)")


class StallWatchdogHook(Hook):
    """Built in under DDP (``torchrun``): checks at each epoch start that every rank runs the same number
    of steps, and runs a :class:`StallWatchdog` from the start of training to its end, so that a rank
    that stops making progress for ``train.ddp_timeout`` seconds stops the run with its stacks dumped.
    Runs first at every stage (priority 0), so that its phase names what the rank does next."""

    priority = 0

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.watchdog: StallWatchdog | None = None

    def _started(self) -> StallWatchdog:
        assert self.watchdog is not None, "before_train starts it"
        return self.watchdog

    @staticmethod
    def done(trainer: "Trainer") -> int:
        """Steps finished in the run so far (resumed ones included)."""
        return trainer.epoch * trainer.steps_per_epoch + trainer.inner

    def before_train(self, trainer: "Trainer") -> None:
        store = dist.PrefixStore("detkit_stall_watchdog/", dist.distributed_c10d._get_default_store())
        self.watchdog = StallWatchdog(store, trainer.rank, trainer.world, self.timeout, trainer.work_dir).start()

    def before_epoch(self, trainer: "Trainer") -> None:
        self._started().progress(self.done(trainer), f"starting epoch {trainer.epoch + 1}")
        steps = math.ceil(len(trainer.loader) / trainer.accumulate) - trainer.inner
        check_equal_steps(all_gather_objects(steps), trainer.epoch + 1)

    def before_step(self, trainer: "Trainer") -> None:
        self._started().progress(self.done(trainer), f"in step {self.done(trainer) + 1}")

    def after_step(self, trainer: "Trainer") -> None:
        self._started().progress(self.done(trainer), f"after step {self.done(trainer)} (hooks, the next batch)")

    def after_epoch(self, trainer: "Trainer") -> None:
        self._started().progress(self.done(trainer), f"end of epoch {trainer.epoch} (evaluation, checkpoints)")

    def after_train(self, trainer: "Trainer") -> None:
        self._started().stop()
