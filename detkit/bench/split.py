"""Where a config's training step goes: throughput, peak memory and a time split by part.

The trainer, model, loader and optimizer are the ones ``engine/runner.py`` builds for the config.
Steps alternate between *plain* (nothing timed inside; their wall time is the measured step) and
*split* (each part timed, with a device synchronisation around it on CUDA); the parts' means over the
split steps are then checked against the plain steps' mean.
"""

from __future__ import annotations

import inspect
import resource
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

import detkit.models.detector as detector
from detkit.bench.common import sync
from detkit.config import load_config
from detkit.data import build_dataloader
from detkit.engine.precision import autocast
from detkit.engine.runner import build_trainer

#: Parts outside the network proper (what the issue's "overhead" is).
OVERHEAD_PARTS = ("data wait", "normalise", "targets (pad)", "assigner", "losses", "hooks (LR, logging)",
                  "step glue", "forward glue")


class _Proxy:
    """A callable object's stand-in: calls go through ``timed``, attribute reads to the object."""

    def __init__(self, target: Any, timed: Any) -> None:
        self._target, self._timed = target, timed

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class PartTimer:
    """Exclusive seconds per named part: wraps callables on objects; a part nested in another is
    subtracted from its parent. Only counts while ``enabled`` (otherwise the wrappers just call through)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.enabled = device, False
        self.seconds: dict[str, float] = defaultdict(float)
        self._children: list[float] = []
        self._patches: list[tuple[Any, str, Any, bool]] = []

    def wrap(self, owner: Any, attr: str, part: str) -> None:
        """Time every call of ``owner.attr``: a module's ``forward``, a method, a module-level function or a
        callable object (replaced by a proxy that forwards attribute reads)."""
        original = getattr(owner, attr)
        if isinstance(original, torch.nn.Module):
            return self.wrap(original, "forward", part)
        own = attr in vars(owner) if hasattr(owner, "__dict__") else True

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return original(*args, **kwargs)
            sync(self.device)
            self._children.append(0.0)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync(self.device)
                elapsed = time.perf_counter() - start
                self.seconds[part] += elapsed - self._children.pop()
                if self._children:
                    self._children[-1] += elapsed

        self._patches.append((owner, attr, original, own))
        setattr(owner, attr, timed if inspect.isroutine(original) else _Proxy(original, timed))

    def restore(self) -> None:
        for owner, attr, original, own in reversed(self._patches):
            if own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)
        self._patches.clear()


def instrument(timer: PartTimer, trainer: Any, compiled: bool) -> None:
    """Wrap the trainer's phases and, unless compiled (a wrapper would break the graph), the model's parts."""
    timer.wrap(trainer, "run_step", "step glue")
    timer.wrap(trainer, "forward", "forward (compiled)" if compiled else "forward glue")
    timer.wrap(trainer, "backward", "backward")
    timer.wrap(trainer, "update", "optimizer (clip + step)")
    timer.wrap(trainer, "call", "hooks (LR, logging)")
    if compiled:
        return
    model = trainer.model
    # what the parts below leave of the model's forward (all of it for a model without them)
    timer.wrap(trainer.train_model, "forward", "model forward (not split)")
    for owner, attr, part in ((model, "normalize", "normalise"), (detector, "pad_targets", "targets (pad)"),
                              (model, "backbone", "backbone+neck"), (model, "neck", "backbone+neck"),
                              (model, "head", "head"), (getattr(model, "head", None), "assigner", "assigner"),
                              (getattr(model, "head", None), "loss", "losses")):
        if owner is not None and hasattr(owner, attr):
            timer.wrap(owner, attr, part)


def run_steps(trainer: Any, timer: PartTimer, steps: int, warmup: int) -> tuple[list[float], list[float], list[int]]:
    """``warmup + 2 * steps`` training steps through the trainer's own loop pieces; odd steps are split
    (timer on), even ones plain. Returns the plain and the split steps (wall) seconds and the plain steps'
    image counts."""
    plain, walls, images = [], [], []
    trainer.call("before_train")
    trainer.call("before_epoch")
    batches: Iterator = iter(trainer.epoch_batches())
    for i in range(warmup + 2 * steps):
        split = i >= warmup and (i - warmup) % 2 == 1
        timer.enabled = split
        start = time.perf_counter()
        try:
            group = next(batches)
        except StopIteration:  # short epoch: start the next one
            trainer.epoch, trainer.inner = trainer.epoch + 1, 0
            batches = iter(trainer.epoch_batches())
            group = next(batches)
        if split:
            timer.seconds["data wait"] += time.perf_counter() - start
        trainer.call("before_step")
        trainer.run_step(group)
        trainer.inner += 1
        trainer.call("after_step")
        sync(trainer.device)
        timer.enabled = False
        if split:
            walls.append(time.perf_counter() - start)
        elif i >= warmup:
            plain.append(time.perf_counter() - start)
            images.append(sum(len(b["targets"]) for b in group))
    return plain, walls, images


def loader_work(loader: Any, batches: int) -> float:
    """Seconds per batch of what the loader's workers do (read, transforms, collate), in this process."""
    dataset, size = loader.dataset, loader.batch_size
    start = time.perf_counter()
    for b in range(batches):
        loader.collate_fn([dataset[(b * size + i) % len(dataset)] for i in range(size)])
    return (time.perf_counter() - start) / batches


def inference_rate(model: torch.nn.Module, loader: Any, device: torch.device, amp: str | None, channels_last: bool,
                   batches: int) -> tuple[float, float | None]:
    """Images/s of ``model.predict`` on ``batches`` loader batches (fetched beforehand; after one warm-up
    batch), and peak CUDA memory (MiB) during it."""
    fetched: list = []
    while len(fetched) <= batches:  # a small val set is gone through again
        fetched += [b for _, b in zip(range(batches + 1 - len(fetched)), loader)]
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, seen = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(fetched):
            images = batch["images"].to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            sync(device)
            start = time.perf_counter()
            with autocast(device, amp):
                model.predict(images, batch["image_sizes"])  # type: ignore[operator]  # a Detector's method
            sync(device)
            if i:
                seconds, seen = seconds + time.perf_counter() - start, seen + len(batch["image_ids"])
    model.train()
    memory = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return seen / seconds, memory


def bench_config(config: str | Path, overrides: Sequence[str], device: str, steps: int = 10, warmup: int = 3,
                 infer_batches: int = 5) -> dict[str, Any]:
    """Train-step and inference throughput, peak memory and the step's time split for ``config``."""
    cfg = load_config(config, list(overrides))
    data = cfg["data"]
    with tempfile.TemporaryDirectory() as work:
        trainer = build_trainer({**cfg, "data": {k: v for k, v in data.items() if k != "val"}}, Path(work),
                                device=device, overwrite=True)
        assert trainer is not None, "None only for a finished resumed run"
        dev = trainer.device
        timer = PartTimer(dev)
        compiled = bool(trainer.cfg.get("train", {}).get("compile"))
        instrument(timer, trainer, compiled)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            plain, walls, images = run_steps(trainer, timer, steps, warmup)
        finally:
            timer.restore()
            trainer.writers.close()
            if trainer.lock is not None:
                trainer.lock.release()
        train_memory = torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == "cuda" else None
        work_per_batch = loader_work(trainer.loader, 2)
        val = build_dataloader(data, "val" if "val" in data else "train", seed=0)
        infer_rate, infer_memory = inference_rate(trainer.eval_model(), val, dev, trainer.amp, trainer.channels_last,
                                                  infer_batches)
    return summarize(cfg, str(dev), trainer, timer.seconds, plain, walls, images, train_memory, infer_rate,
                     infer_memory, work_per_batch)


def summarize(cfg: Mapping[str, Any], device: str, trainer: Any, seconds: Mapping[str, float], plain: list[float],
              walls: list[float], images: list[int], train_memory: float | None, infer_rate: float,
              infer_memory: float | None, work_per_batch: float) -> dict[str, Any]:
    """The split as rows (ms per step, % of the measured step) plus the headline figures and the check."""
    step, split_wall = sum(plain) / len(plain), sum(walls) / len(walls)
    parts = {k: v / len(walls) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}
    total = sum(parts.values())
    overhead = sum(v for k, v in parts.items() if k in OVERHEAD_PARTS)
    rows = [{"part": k, "ms_per_step": v * 1e3, "percent_of_step": 100 * v / step} for k, v in parts.items()]
    rows.append({"part": "sum of parts", "ms_per_step": total * 1e3, "percent_of_step": 100 * total / step})
    rows.append({"part": "split steps (wall)", "ms_per_step": split_wall * 1e3,
                 "percent_of_step": 100 * split_wall / step})
    rows.append({"part": "measured step (plain)", "ms_per_step": step * 1e3, "percent_of_step": 100.0})
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    settings = cfg.get("train", {})
    summary = {
        "device": device, "batch_size": trainer.loader.batch_size, "num_workers": trainer.loader.num_workers,
        "amp": trainer.amp or "fp32", "channels_last": trainer.channels_last, "compile": settings.get("compile", False),
        "steps_timed": f"{len(plain)} plain + {len(walls)} split", "train_img_s": sum(images) / sum(plain),
        "inference_img_s": infer_rate, "train_peak_mem_mib": train_memory, "inference_peak_mem_mib": infer_memory,
        "peak_rss_mib": peak_rss, "outside_network_percent": 100 * overhead / step,
        "loader_work_ms_per_batch (in workers)": work_per_batch * 1e3,
        "sum_vs_step_percent": 100 * (total - step) / step,
    }
    return {"summary": [summary], "split": rows}


def check_line(result: Mapping[str, Any]) -> str:
    """The printed check: does the split add up to the measured (plain) step within 5%?"""
    s = result["summary"][0]
    rows = {r["part"]: r["ms_per_step"] for r in result["split"]}
    ok = abs(s["sum_vs_step_percent"]) <= 5
    return (f"check: sum of parts {rows['sum of parts']:.1f} ms vs measured step "
            f"{rows['measured step (plain)']:.1f} ms "
            f"({s['sum_vs_step_percent']:+.1f}%): {'within' if ok else 'NOT within'} 5% (the split steps' own wall: "
            f"{rows['split steps (wall)']:.1f} ms)")
