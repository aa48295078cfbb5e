"""The training loop: epochs of optimizer steps, with hooks doing everything around them."""

from __future__ import annotations

import itertools
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, cast

import torch
from torch import Tensor, nn

from detkit.distributed import all_gather_objects, any_rank, get_rank, get_world_size, is_distributed
from detkit.engine.hooks.base import EvalRecord, Hook
from detkit.engine.interrupt import InterruptWatch, TrainingInterrupted
from detkit.engine.memory import batch_image_ids, name_out_of_memory
from detkit.engine.precision import autocast
from detkit.engine.rng import rng_state, seed_everything, set_rng_state
from detkit.engine.workdir import WorkDirLock
from detkit.engine.writers import WriterGroup

logger = logging.getLogger("detkit")


@dataclass
class StepResult:
    """What one optimizer step did: weighted terms (detached, summed over micro-batches), total,
    gradient norm, and whether the update was applied (``skipped`` says why not)."""

    losses: dict[str, Tensor] = field(default_factory=dict)
    total: Tensor | None = None
    grad_norm: Tensor | None = None
    applied: bool = False
    skipped: str | None = None
    bad_terms: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)


def all_finite(total: Tensor) -> bool:
    """Whether the loss is finite on every rank (all ranks must skip a step together, or DDP hangs)."""
    return not any_rank(~torch.isfinite(total.detach()).all())


class Trainer:
    """Runs ``epochs`` over ``loader``; each step is ``accumulate`` micro-batches then one update.

    Args:
        model: the detector (``model(images, targets)`` -> ``{term: weighted loss}``).
        optimizer, loader: built objects; ``loader.sampler`` is an :class:`EpochSampler`.
        hooks: :class:`Hook` objects, called in ``priority`` order.
        train_model: what the step calls (DDP / compiled wrapper of ``model``; default ``model``).
        epochs, accumulate, grad_clip (max norm or None), amp (None | bf16 | fp16), seed: settings.
        channels_last: give the model its input batch in channels_last memory format.
        state: a checkpoint to resume from (loaded after ``before_train``).
        writers: where hooks write records and pictures; lock: the work dir's, released when ``train`` ends.
    Counters: ``epoch`` (finished epochs), ``iter`` (optimizer updates applied), ``inner`` (steps
    consumed in the current epoch, the mid-epoch resume position).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any, hooks: Sequence[Hook], *,
                 work_dir: Path, device: torch.device, epochs: int, train_model: nn.Module | None = None,
                 accumulate: int = 1, grad_clip: float | None = None, amp: str | None = None, seed: int = 0,
                 channels_last: bool = False, cfg: Mapping[str, Any] | None = None,
                 state: Mapping[str, Any] | None = None, writers: WriterGroup | None = None,
                 lock: WorkDirLock | None = None) -> None:
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.train_model = train_model or model
        self.hooks = sorted(hooks, key=lambda h: h.priority)
        self.work_dir, self.device, self.cfg = Path(work_dir), device, dict(cfg or {})
        self.max_epochs, self.accumulate, self.grad_clip, self.amp, self.seed = epochs, accumulate, grad_clip, amp, seed
        self.channels_last = channels_last
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.rank, self.world = get_rank(), get_world_size()
        self.is_main = self.rank == 0
        self.epoch = self.iter = self.inner = 0
        self.steps_per_epoch = math.ceil(len(loader) / accumulate)
        self.result = StepResult()
        self.ema_model: nn.Module | None = None  # set by the EMA hook; evaluation uses it
        self.stop_reason: str | None = None  # set by a hook (early stop) to end training after this epoch
        self.last_eval: EvalRecord | None = None  # set by EvalHook after each evaluation
        self.summary: dict[str, Any] = {}  # run facts for the final report: wall_time, interrupted, files
        self.writers = writers or WriterGroup([])  # the run's writers (rank 0; none on the other ranks)
        self.lock = lock  # the work dir's lock (rank 0), released when training ends
        self.watch: InterruptWatch | None = None  # SIGINT / SIGTERM while training
        self._state = state

    @property
    def total_steps(self) -> int:
        return self.max_epochs * self.steps_per_epoch

    def eval_model(self) -> nn.Module:
        """The weights evaluation and ``best.pth`` use: the EMA model when there is one."""
        return self.ema_model if self.ema_model is not None else self.model

    def call(self, stage: str) -> None:
        for hook in self.hooks:
            getattr(hook, stage)(self)

    # ----------------------------------------------------------------------------- loop
    def train(self) -> None:
        """Train from the current (or resumed) position to ``epochs``; hooks save, log and evaluate."""
        start = time.time()
        self.call("before_train")
        if self._state is not None:
            self.load_state_dict(self._state)
            self._state = None
        try:
            with InterruptWatch() as self.watch:
                try:
                    while self.epoch < self.max_epochs and self.stop_reason is None:
                        self.call("before_epoch")
                        for batches in self.epoch_batches():
                            self.call("before_step")
                            self.run_step(batches)
                            self.inner += 1
                            self.call("after_step")
                            self.stop_if_interrupted()
                        self.end_epoch()
                except TrainingInterrupted as stop:
                    self.stop_reason = stop.reason
                    self.summary["interrupted"] = stop
                    self.call("after_train")  # saves; still watched: a second signal exits at once
                    raise
                self.summary["wall_time"] = time.time() - start
                self.call("after_train")
                if self.watch.check():  # after the last safe point: the run is complete; still exit as stopped
                    late = TrainingInterrupted(self.watch.signum)
                    logger.info("%s arrived as the run ended: it is complete, its files are written", late.reason)
                    raise late
        finally:
            self.watch = None
            if self.lock is not None:  # the work dir is free for the next run
                self.lock.release()

    def stop_if_interrupted(self) -> None:
        """At a safe point (after a step, between evaluation batches): raise :class:`TrainingInterrupted`
        once SIGINT / SIGTERM arrived on any rank."""
        if self.watch is not None and self.watch.check():
            raise TrainingInterrupted(self.watch.signum)

    def end_epoch(self) -> None:
        """Count the epoch, run ``after_epoch``. Interrupted there (in the evaluation), the counters go back
        to "all steps done, epoch not ended": ``latest.pth`` resumes with this epoch's evaluation and save."""
        self.epoch, self.inner = self.epoch + 1, 0
        try:
            self.call("after_epoch")
        except TrainingInterrupted:
            self.epoch, self.inner = self.epoch - 1, self.steps_per_epoch
            raise

    def epoch_batches(self) -> Iterator[list[dict[str, Any]]]:
        """This epoch's batches in groups of ``accumulate``, from step ``inner`` on (mid-epoch resume)."""
        self.loader.sampler.set_epoch(self.epoch, start=self.inner * self.accumulate * self.loader.batch_size)
        # worker seeds follow (seed, epoch, rank); sample transforms are seeded per sample by the sampler
        self.loader.generator.manual_seed((self.seed * 1_000_003 + self.epoch) * 1024 + self.rank)
        group: list[dict[str, Any]] = []
        batches = iter(self.loader)
        for position in itertools.count():  # decoding and collating run in here (or in the loader's workers)
            with name_out_of_memory(self.loader.dataset, "loading", lambda: batch_image_ids(self.loader, position)):
                batch = next(batches, None)
            if batch is None:
                break
            group.append(batch)
            if len(group) == self.accumulate:
                yield group
                group = []
        if group:
            yield group

    def run_step(self, batches: Sequence[Mapping[str, Any]]) -> None:
        """Forward + backward every micro-batch (loss / len(batches)), then clip and step once."""
        self.result = result = StepResult()
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            no_sync = getattr(self.train_model, "no_sync", None)
            oom = name_out_of_memory(getattr(self.loader, "dataset", None), "in the forward/backward pass on",
                                     lambda: list(batch.get("image_ids", [])))  # the benchmark steps a plain list
            with nullcontext() if last or no_sync is None else no_sync(), oom:
                losses = self.forward(batch)
                for hook in self.hooks:
                    losses = hook.after_forward(self, losses)
                total = cast(Tensor, sum(losses.values()))  # a detector returns at least one term
                if not all_finite(total):
                    result.skipped = "non-finite loss"
                    result.bad_terms = [k for k, v in losses.items() if not torch.isfinite(v).all()] or [
                        "(on another rank)"]
                    result.losses = {k: v.detach() for k, v in losses.items()}
                    self.optimizer.zero_grad(set_to_none=True)
                    return
                self.backward(total / len(batches))
            for k, v in losses.items():
                result.losses[k] = result.losses.get(k, 0) + v.detach() / len(batches)
            result.total = (result.total if result.total is not None else 0) + total.detach() / len(batches)
        self.update(result)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Weighted loss terms of one micro-batch, under ``amp`` autocast."""
        images = batch["images"].to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp):
            return self.train_model(images, batch["targets"])

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()

    def update(self, result: StepResult) -> None:
        """Gradients of the step -> clipped (norm in ``result``), checked, applied (``result.applied``)."""
        self.sync_extra_grads()
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        result.grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or math.inf)
        if not self.scaler.is_enabled() and not all_finite(result.grad_norm):
            result.skipped, result.bad_terms = "non-finite gradient", ["(gradients)"]
            self.optimizer.zero_grad(set_to_none=True)
            return
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale is not None and self.scaler.get_scale() < scale:  # GradScaler found inf/NaN: no update
            result.skipped = "fp16 overflow (GradScaler lowered the scale)"
            return
        result.applied = True
        self.iter += 1

    def sync_extra_grads(self) -> None:
        """Average over ranks the gradients of optimizer parameters outside the DDP model (e.g. learned
        loss weights), so that every rank takes the same step."""
        if not is_distributed():
            return
        own = {id(p) for p in self.model.parameters()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in own and p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.world

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-identical resume needs; tensors and plain types only."""
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "optimizer_type": type(self.optimizer).__name__,
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "iter": self.iter, "inner": self.inner,
            "steps_per_epoch": self.steps_per_epoch, "accumulate": self.accumulate,
            "rng": all_gather_objects(rng_state()) if is_distributed() else [rng_state()],
            "hooks": {name: state for name, state in ((h.name, h.state_dict()) for h in self.hooks) if state},
            "stop_reason": self.stop_reason if "interrupted" not in self.summary else None,
            "config": self.cfg, "classes": list(getattr(self.loader.dataset, "classes", [])),
            "cat_ids": list(getattr(self.loader.dataset, "cat_ids", [])),
        }

    def _load_optimizer(self, state: Mapping[str, Any]) -> None:
        """Optimizer moments from the checkpoint, hyperparameters (lr, weight decay...) from this config."""
        saved, kind = state.get("optimizer"), type(self.optimizer).__name__
        if not saved or state.get("optimizer_type", kind) != kind:
            logger.warning("resume: the checkpoint has no %s state (it holds %s); starting a fresh optimizer with "
                           "the resumed weights", kind, state.get("optimizer_type") or "no optimizer state")
            return
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(saved)
        except ValueError as err:  # another parameter grouping
            logger.warning("resume: optimizer state does not fit this model (%s); starting a fresh optimizer", err)
            return
        for group, hyper in zip(self.optimizer.param_groups, configured):
            group.update(hyper)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: weights, optimizer, counters, every rank's RNG and every hook's state."""
        self.model.load_state_dict(state["model"])
        self.epoch, self.iter, self.inner = int(state["epoch"]), int(state["iter"]), int(state.get("inner", 0))
        if self.inner and (state.get("steps_per_epoch"), state.get("accumulate")) != (self.steps_per_epoch,
                                                                                       self.accumulate):
            logger.warning("resume: the epoch length or accumulate changed since the checkpoint; restarting "
                           "epoch %d from its first batch", self.epoch + 1)
            self.inner = 0
        self._load_optimizer(state)
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        saved = state.get("hooks", {})
        for hook in self.hooks:
            name = next((n for n in (hook.name, *hook.former_names) if n in saved), None)
            if name is not None:
                hook.load_state_dict(saved[name])
        rngs = state.get("rng") or []
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank])
        else:  # another world size: give every rank its own stream
            seed_everything(self.seed + 7919 * self.rank + self.epoch)
