"""Training, evaluation and checkpointing of a detector from one resolved config."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from detkit.config import dump_config
from detkit.data import build_dataloader
from detkit.distributed import (
    all_gather_objects,
    barrier,
    get_rank,
    get_world_size,
    is_distributed,
)
from detkit.engine.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    load_checkpoint,
    prune_epoch_checkpoints,
    save_checkpoint,
)
from detkit.engine.evaluator import (
    coco_results,
    evaluate_coco,
    format_metrics,
    to_original_coords,
)
from detkit.engine.optim import build_optimizer, build_scheduler
from detkit.engine.run_log import RunLog, progress, setup_logging
from detkit.models import build_detector
from detkit.registry import ConfigError, suggestion

logger = logging.getLogger("detkit")

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 12, "amp": None, "grad_clip": None, "ema": None, "seed": 0, "device": "auto",
    "log_interval": 20, "eval_interval": 1, "checkpoint_interval": 1, "keep_checkpoints": 3,
    "nan_patience": 10, "compile": False, "sync_bn": False, "grad_norm_interval": None,
    "vis_images": 4,
}
AMP_MODES = (None, "bf16", "fp16")


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses for ``nan_patience`` consecutive steps."""


def train_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg['train']`` over the defaults; unknown keys are an error with a did-you-mean."""
    given = dict(cfg.get("train") or {})
    for key in given:
        if key not in TRAIN_DEFAULTS:
            hint = suggestion(key, TRAIN_DEFAULTS)
            raise ConfigError(f"train.{key}: unknown setting.{hint} Known: {', '.join(TRAIN_DEFAULTS)}")
    settings = {**TRAIN_DEFAULTS, **given}
    if settings["amp"] not in AMP_MODES:
        raise ConfigError(f"train.amp must be one of null, bf16, fp16; got {settings['amp']!r}")
    for key in ("epochs", "log_interval", "eval_interval", "checkpoint_interval", "nan_patience"):
        if not isinstance(settings[key], int) or settings[key] < 1:
            raise ConfigError(f"train.{key} must be a positive integer, got {settings[key]!r}")
    settings["ema_decay"] = ema_decay(settings["ema"])
    return settings


def ema_decay(ema: Any) -> tuple[float, int] | None:
    """``train.ema``: null, a decay in (0, 1), or ``{decay: d, warmup_iters: n}`` -> (decay, warmup)."""
    if ema is None or ema is False:
        return None
    spec = dict(ema) if isinstance(ema, Mapping) else {"decay": ema}
    decay, warmup = spec.pop("decay", None), spec.pop("warmup_iters", 2000)
    if (spec or isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < float(decay) < 1.0
            or not isinstance(warmup, int) or warmup < 1):
        raise ConfigError(f"train.ema must be null, a decay in (0, 1) or {{decay: 0.9998, warmup_iters: 2000}}; "
                          f"got {ema!r}")
    return float(decay), warmup


class WarmupEMA:
    """``AveragedModel`` update with decay ``d (1 - exp(-iter / warmup))`` (YOLOX / mmdetection).

    A plain decay of 0.9998 keeps ~0.9998^iter of the random initial weights, so on a short
    schedule the averaged model evaluates near 0 AP; the warm-up ramps the decay up instead.
    ``iter`` is set by the trainer before each update, which keeps resume exact.
    """

    def __init__(self, decay: float, warmup_iters: int) -> None:
        self.decay, self.warmup, self.iter = decay, warmup_iters, 0

    @torch.no_grad()
    def __call__(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        decay = self.decay * (1 - math.exp(-self.iter / self.warmup))
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1 - decay)
        else:  # integer buffers (BatchNorm's step counter) follow the model
            for a, c in zip(averaged, current):
                a.copy_(c)


def init_distributed(device_arg: str) -> tuple[torch.device, int]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE > 1``; returns (device, local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch.cuda.is_available() is False")
    if device_arg not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda; got {device_arg!r}")
    if world > 1 and not is_distributed():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        if not use_cuda:  # share the cores between the local processes
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), local_rank
    return torch.device("cpu"), local_rank


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_finite(total: Tensor) -> bool:
    """Whether the loss is finite on every rank (all ranks must skip a step together, or DDP hangs)."""
    finite = torch.isfinite(total.detach()).float()
    if is_distributed():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def autocast(device: torch.device, amp: str | None) -> Any:
    if amp is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class Trainer:
    """Builds everything from ``cfg`` and runs ``train()`` / ``evaluate()``.

    Args:
        cfg: resolved config (see ``load_config``). work_dir: output folder.
        device: ``auto`` (GPU when available), ``cpu`` or ``cuda``; overrides ``train.device``.
        resume: None, ``"auto"`` (newest readable checkpoint of ``work_dir``) or a checkpoint path.
    """

    def __init__(self, cfg: dict[str, Any], work_dir: str | os.PathLike, device: str | None = None,
                 resume: str | None = None, build_train: bool = True) -> None:
        self.cfg = cfg
        self.settings = train_settings(cfg)
        self.work_dir = Path(work_dir)
        self.device, self.local_rank = init_distributed(device or self.settings["device"])
        self.rank, self.world = get_rank(), get_world_size()
        self.is_main = self.rank == 0
        setup_logging(self.work_dir, self.rank)
        if self.settings["amp"] == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.amp: fp16 needs CUDA (GradScaler); use bf16 on CPU")
        seed_everything(int(self.settings["seed"]) + self.rank)
        if self.is_main and build_train:  # evaluation runs must not overwrite a training run's config
            dump_config(cfg, self.work_dir / "config.yaml")
        self.model = build_detector(cfg["model"]).to(self.device)
        if self.settings["sync_bn"] and is_distributed():
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.val_loader = build_dataloader(cfg["data"], "val", seed=int(self.settings["seed"]), rank=self.rank,
                                           world_size=self.world) if "val" in cfg["data"] else None
        self.epoch, self.iter, self.best_ap = 0, 0, -1.0
        self.ema: AveragedModel | None = None
        self.train_loader = None
        if build_train:
            self._build_training()
        self.run_log = RunLog(self.work_dir, self.is_main)
        if resume:
            self._resume(resume)

    # ----------------------------------------------------------------------------- setup
    def _build_training(self) -> None:
        s, cfg = self.settings, self.cfg
        self.train_loader = build_dataloader(cfg["data"], "train", seed=int(s["seed"]), rank=self.rank,
                                             world_size=self.world)
        if len(self.train_loader) == 0:
            raise ConfigError(f"data.train: {len(self.train_loader.dataset)} images give no batch of "
                              f"{self.train_loader.batch_size} on {self.world} process(es)")
        self.optimizer = build_optimizer(cfg.get("optimizer") or {"type": "SGD", "lr": 0.01, "momentum": 0.9},
                                         self.model)
        self.iters_per_epoch = len(self.train_loader)
        self.scheduler = build_scheduler(cfg.get("scheduler"), self.optimizer,
                                         int(s["epochs"]) * self.iters_per_epoch, self.iters_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=s["amp"] == "fp16")
        if s["ema_decay"] is not None:
            self.ema_update = WarmupEMA(*s["ema_decay"])
            self.ema = AveragedModel(self.model, multi_avg_fn=self.ema_update, use_buffers=True)
        self.train_model: nn.Module = self.model
        if is_distributed():
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        if s["compile"]:
            self.train_model.compile()

    def _resume(self, resume: str) -> None:
        if resume == "auto":
            found = find_resume_checkpoint(self.work_dir)
            if found is None:
                logger.info("auto-resume: no checkpoint in %s, starting from scratch", self.work_dir)
                return
            path, state = found
        else:
            path, state = Path(resume), load_checkpoint(resume)
        self.load_state(state, path)
        logger.info("resumed from %s (epoch %d, iteration %d)", path, self.epoch, self.iter)

    def load_state(self, state: Mapping[str, Any], path: Path | str) -> None:
        """Resume from ``state`` (training), or load its evaluation weights (EMA when saved) for eval only."""
        weights = state["model"] if self.train_loader is not None else evaluation_weights(state)
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: weights do not fit this config's model: {err}") from None
        self.epoch, self.iter = int(state.get("epoch", 0)), int(state.get("iter", 0))
        self.best_ap = float(state.get("best_ap", -1.0))
        if self.train_loader is None:
            return
        self.optimizer.load_state_dict(state["optimizer"])
        # Keep the position in the schedule but the schedule of *this* config: the saved lambdas
        # would bring back the old total length (resuming with more epochs would train at LR 0).
        scheduler = dict(state["scheduler"])
        scheduler["lr_lambdas"] = [None] * len(self.scheduler.lr_lambdas)
        self.scheduler.load_state_dict(scheduler)
        self._set_lr_for_iter()
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if state.get("rng") is not None:
            if self.rank == 0:
                set_rng_state(state["rng"])
            else:  # only rank 0's state is saved: give the other ranks their own stream
                seed_everything(int(self.settings["seed"]) + 7919 * self.rank + self.epoch)

    def _set_lr_for_iter(self) -> None:
        """Set every group's LR to the schedule's value at ``self.iter`` (after a resume)."""
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas):
            group["lr"] = base * factor(self.iter)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": self.epoch, "iter": self.iter, "best_ap": self.best_ap, "rng": rng_state(),
            "config": self.cfg, "classes": list(getattr(self.train_loader.dataset, "classes", [])),
            "cat_ids": list(getattr(self.train_loader.dataset, "cat_ids", [])),
        }

    # ----------------------------------------------------------------------------- training
    def train(self) -> dict[str, Any] | None:
        """Train ``train.epochs`` epochs (from the resumed epoch on); returns the last evaluation."""
        s = self.settings
        epochs = int(s["epochs"])
        metrics = None
        logger.info("training %s on %s: %d epochs x %d iterations, %d process(es), work_dir %s",
                    self.cfg["model"].get("type"), self.device, epochs, self.iters_per_epoch, self.world,
                    self.work_dir)
        while self.epoch < epochs:
            self.train_epoch()
            self.epoch += 1
            evaluate_now = self.val_loader is not None and (
                self.epoch % int(s["eval_interval"]) == 0 or self.epoch == epochs)
            if evaluate_now:
                metrics = self.evaluate()
                if self.is_main and metrics["AP"] > self.best_ap:
                    self.best_ap = metrics["AP"]
                    self.save("best.pth")
            if self.epoch % int(s["checkpoint_interval"]) == 0 or self.epoch == epochs:
                self.save_epoch()
        self.run_log.close()
        return metrics

    def train_epoch(self) -> None:
        s = self.settings
        loader = self.train_loader
        loader.sampler.set_epoch(self.epoch)
        # worker seeds follow (seed, epoch, rank): identical after a resume, distinct across ranks
        loader.generator.manual_seed((int(s["seed"]) * 1_000_003 + self.epoch) * 1024 + self.rank)
        self.model.train()
        bad_steps, start, running = 0, time.time(), {}
        bar = progress(loader, len(loader), f"epoch {self.epoch + 1}/{s['epochs']}", self.is_main)
        for step, batch in enumerate(bar):
            log_now = self.iter % int(s["log_interval"]) == 0 or step == len(loader) - 1
            grad_terms_now = log_now and self.is_main and self._grad_norm_due()
            self.model.keep_features = grad_terms_now
            images = batch["images"].to(self.device, non_blocking=True)
            with autocast(self.device, s["amp"]):
                losses = self.train_model(images, batch["targets"])
            total = sum(losses.values())
            if not all_finite(total):
                bad_steps = self._bad_step(losses, bad_steps, "non-finite loss")
                continue
            term_norms = self._term_grad_norms(losses) if grad_terms_now else {}
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
            max_norm = float(s["grad_clip"]) if s["grad_clip"] else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            if not torch.isfinite(grad_norm) and not self.scaler.is_enabled():
                bad_steps = self._bad_step(losses, bad_steps, "non-finite gradient")
                self.optimizer.zero_grad(set_to_none=True)
                continue
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema_update.iter = self.iter + 1
                self.ema.update_parameters(self.model)
            bad_steps = 0
            self.iter += 1
            values = {k: float(v.detach()) for k, v in losses.items()}
            for k, v in values.items():
                running[k] = 0.9 * running.get(k, v) + 0.1 * v
            if log_now:
                self._log_step(values, float(total.detach()), float(grad_norm), term_norms, step, start, bar, running)

    def _grad_norm_due(self) -> bool:
        interval = self.settings["grad_norm_interval"]
        interval = int(interval) if interval else int(self.settings["log_interval"])
        return self.iter % max(interval, 1) == 0

    def _term_grad_norms(self, losses: dict[str, Tensor]) -> dict[str, float]:
        """Gradient norm of each weighted term w.r.t. the neck outputs (the features all terms share)."""
        feats = getattr(self.model, "last_features", None)  # absent on models without a shared neck
        self.model.keep_features = False
        if not feats:
            return {}
        norms = {}
        for name, value in losses.items():
            if not value.requires_grad:
                continue
            grads = torch.autograd.grad(value, feats, retain_graph=True, allow_unused=True)
            sq = sum(float(g.float().pow(2).sum()) for g in grads if g is not None)
            norms[name] = math.sqrt(sq)
        return norms

    def _bad_step(self, losses: dict[str, Tensor], bad_steps: int, what: str) -> int:
        bad = [k for k, v in losses.items() if not torch.isfinite(v)] or ["(gradients)"]
        bad_steps += 1
        logger.warning("epoch %d iteration %d: %s in %s; step skipped (%d in a row, limit %d)", self.epoch + 1,
                       self.iter, what, ", ".join(bad), bad_steps, int(self.settings["nan_patience"]))
        self.run_log.record("skipped_step", self.iter, {"epoch": self.epoch + 1, "iter": self.iter,
                                                         "non_finite": bad}, "train")
        if bad_steps >= int(self.settings["nan_patience"]):
            raise NonFiniteLossError(
                f"{bad_steps} consecutive training steps had a {what} (terms: {', '.join(bad)}) at epoch "
                f"{self.epoch + 1}, iteration {self.iter}. Lower optimizer.lr, set train.grad_clip, or check the "
                f"data; the last checkpoint in {self.work_dir} holds the last finite weights.")
        return bad_steps

    def _log_step(self, values: dict[str, float], total: float, grad_norm: float, term_norms: dict[str, float],
                  step: int, start: float, bar: Any, running: dict[str, float]) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        record = {"epoch": self.epoch + 1, "iter": self.iter, **values, "total": total, "lr": lr,
                  "grad_norm": grad_norm}
        if term_norms:
            record["term_grad_norm"] = term_norms
        self.run_log.record("train", self.iter, record, "train")
        if not self.is_main:
            return
        elapsed = time.time() - start
        rate = (step + 1) / max(elapsed, 1e-9)
        eta = (len(self.train_loader) - step - 1) / max(rate, 1e-9)
        terms = " ".join(f"{k} {v:.4f}" for k, v in running.items())
        if bar.disable:
            logger.info("epoch %d [%d/%d] %s total %.4f lr %.2e grad %.2f | %.2f it/s eta %ds", self.epoch + 1,
                        step + 1, len(self.train_loader), terms, total, lr, grad_norm, rate, int(eta))
        else:
            bar.set_postfix_str(f"{terms} lr {lr:.1e}")

    # ----------------------------------------------------------------------------- eval + checkpoints
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """COCO bbox metrics of the (EMA) model on ``data.val``; rank 0 scores all ranks' predictions."""
        dataset = self.val_loader.dataset
        model = self.eval_model()
        model.eval()
        preds, ids, pictures = [], [], []
        for batch in progress(self.val_loader, len(self.val_loader), "eval", self.is_main):
            with autocast(self.device, self.settings["amp"]):
                out = model.predict(batch["images"].to(self.device, non_blocking=True), batch["image_sizes"])
            for i, det in enumerate(out):
                preds.append(to_original_coords(det, batch["scale_factors"][i], batch["orig_sizes"][i]))
                ids.append(batch["image_ids"][i])
                if len(pictures) < int(self.settings["vis_images"]):
                    pictures.append((batch["images"][i, :, : batch["image_sizes"][i][0], : batch["image_sizes"][i][1]],
                                     {k: v.float().cpu() if k != "labels" else v.cpu() for k, v in det.items()}))
        results = coco_results(preds, ids, dataset.cat_ids)
        gathered = all_gather_objects((results, ids))
        metrics: dict[str, Any] = {}
        if self.is_main:
            all_results, all_ids, seen = [], [], set()
            for part_results, part_ids in gathered:
                fresh = set(part_ids) - seen  # DistributedSampler repeats images to even out shards
                all_results += [r for r in part_results if r["image_id"] in fresh]
                all_ids += sorted(fresh)
                seen |= fresh
            metrics = evaluate_coco(dataset.coco, all_results, dataset.classes, all_ids)
            logger.info("evaluation after epoch %d on %d images:\n%s", self.epoch, len(all_ids),
                        format_metrics(metrics))
            self._write_results(all_results)
            self.run_log.record("eval", self.iter, {"epoch": self.epoch, "iter": self.iter, **metrics}, "val")
            self._log_pictures(pictures, dataset.classes)
        metrics = all_gather_objects(metrics)[0] if is_distributed() else metrics
        self.model.train()
        return metrics

    def _write_results(self, results: list[dict[str, Any]]) -> None:
        import json

        path = self.work_dir / "results" / f"bbox_epoch_{self.epoch}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results))

    def _log_pictures(self, pictures: list, classes: list[str]) -> None:
        from detkit.visualize import draw_detections

        for k, (image, det) in enumerate(pictures):
            keep = det["scores"] > 0.3
            drawn = draw_detections(image, det["boxes"][keep], det["labels"][keep], classes, det["scores"][keep])
            self.run_log.image(f"val/predictions_{k}", drawn, self.epoch)

    def save(self, name: str) -> None:
        if not self.is_main:
            return
        state = self.state_dict()
        bad = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteLossError(f"refusing to save {name}: non-finite weights in {bad[:5]}")
        save_checkpoint(state, self.work_dir / name)

    def save_epoch(self) -> None:
        self.save(f"epoch_{self.epoch}.pth")
        self.save("latest.pth")
        if self.is_main:
            prune_epoch_checkpoints(self.work_dir, int(self.settings["keep_checkpoints"]))
        barrier()


def evaluation_weights(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """The weights training evaluated: the EMA model's when the checkpoint has one, else ``model``."""
    ema = state.get("ema")
    if not ema:
        return state["model"]
    return {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}


def evaluate_checkpoint(cfg: dict[str, Any], checkpoint: str, work_dir: str | os.PathLike,
                        device: str | None = None) -> dict[str, Any]:
    """Load ``checkpoint``'s evaluation weights into the config's model and evaluate on ``data.val``."""
    trainer = Trainer(cfg, work_dir, device=device, build_train=False)
    if trainer.val_loader is None:
        raise ConfigError("data.val: no validation dataset in the config")
    trainer.load_state(load_checkpoint(checkpoint), checkpoint)
    metrics = trainer.evaluate()
    trainer.run_log.close()
    return metrics
