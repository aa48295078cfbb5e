"""The ``train`` section of a config, validated once: unknown keys, types and ranges."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from detkit.registry import ConfigError, check_keys

AMP_MODES = (None, "bf16", "fp16", "auto")
#: What an evaluation reports (COCO bbox); best_metric and early_stop.metric name one of them.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
COMPILE_MODES = (False, True, "full")


def _positive_int(key: str, value: Any, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"train.{key} must be {what}{' or null' if allow_none else ''}, got {value!r}")


def _ema(value: Any) -> tuple[float, int] | None:
    """``train.ema``: null, a decay in (0, 1), or ``{decay: d, warmup_iters: n}`` -> (decay, warmup)."""
    if value is None or value is False:
        return None
    spec = dict(value) if isinstance(value, Mapping) else {"decay": value}
    decay, warmup = spec.pop("decay", None), spec.pop("warmup_iters", 2000)
    if (spec or isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < float(decay) < 1.0
            or isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1):
        raise ConfigError(f"train.ema must be null, a decay in (0, 1) or {{decay: 0.9998, warmup_iters: 2000}}; "
                          f"got {value!r}")
    return float(decay), warmup


def _early_stop(value: Any) -> dict[str, Any] | None:
    """``train.early_stop``: null or ``{metric: AP, patience: N, min_delta: 0.0, mode: max}``."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"train.early_stop must be null or {{metric: AP, patience: 5, min_delta: 0.0}}, "
                          f"got {value!r}")
    check_keys(value, ("metric", "patience", "min_delta", "mode"), "train.early_stop")
    spec = {"metric": "AP", "patience": 5, "min_delta": 0.0, "mode": "max", **value}
    if spec["metric"] not in METRICS:
        raise ConfigError(f"train.early_stop.metric must be one of {', '.join(METRICS)}, got {spec['metric']!r}")
    _positive_int("early_stop.patience", spec["patience"])
    if not isinstance(spec["min_delta"], (int, float)) or spec["min_delta"] < 0:
        raise ConfigError(f"train.early_stop.min_delta must be a number >= 0, got {spec['min_delta']!r}")
    if spec["mode"] not in ("max", "min"):
        raise ConfigError(f"train.early_stop.mode must be 'max' or 'min', got {spec['mode']!r}")
    return spec


def _spec_list(key: str, value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, Mapping) and "type" in v for v in value):
        raise ConfigError(f"train.{key} must be a list of specs like [{{type: Name, ...}}], got {value!r}")
    return [dict(v) for v in value]


def section_settings(cls: type, cfg: Mapping[str, Any], section: str) -> Any:
    """``cls(**cfg[section])`` for a settings dataclass, after checking that the section is a mapping
    of known keys (a :class:`ConfigError` naming ``section.<key>`` otherwise); values are the caller's."""
    given = cfg.get(section) or {}
    if not isinstance(given, Mapping):
        raise ConfigError(f"{section} must be a mapping of settings, got {type(given).__name__}: {given!r}")
    check_keys(given, [f.name for f in dataclasses.fields(cls)], section, "setting")
    return cls(**given)


@dataclass
class TrainSettings:
    """Every ``train.*`` setting with its default; :meth:`from_config` validates a config's section."""

    epochs: int = 12
    amp: str | None = None
    grad_clip: float | None = None
    ema: Any = None
    seed: int = 0
    device: str = "auto"
    log_interval: int = 20
    eval_interval: int = 1
    checkpoint_interval: int = 1
    checkpoint_interval_iters: int | None = None
    keep_checkpoints: int = 3
    nan_patience: int = 10
    compile: Any = False
    channels_last: bool = False
    sync_bn: bool = False
    grad_norm_interval: int | None = None
    vis_images: int = 4
    accumulate: int = 1
    best_metric: str = "AP"
    early_stop: Any = None
    hooks: list = field(default_factory=list)
    writers: list = field(default_factory=lambda: [{"type": "ConsoleWriter"}, {"type": "JsonlWriter"},
                                                   {"type": "TensorboardWriter"}])
    loss_balance: Any = None
    close_mosaic: int = 0
    ddp_timeout: float = 600.0  # seconds; NCCL's own default is 10 min too

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "TrainSettings":
        """``cfg['train']`` over the defaults; raises :class:`ConfigError` naming ``train.<key>``."""
        settings = section_settings(cls, cfg, "train")
        settings.validate()
        return settings

    @property
    def ema_decay(self) -> tuple[float, int] | None:
        """``(decay, warmup_iters)`` of ``ema``, or None without EMA."""
        return _ema(self.ema)

    def validate(self) -> None:
        for key in ("epochs", "log_interval", "eval_interval", "checkpoint_interval", "nan_patience", "accumulate"):
            _positive_int(key, getattr(self, key))
        for key in ("checkpoint_interval_iters", "grad_norm_interval"):
            _positive_int(key, getattr(self, key), allow_none=True)
        _positive_int("keep_checkpoints", self.keep_checkpoints, minimum=0)
        _positive_int("vis_images", self.vis_images, minimum=0)
        _positive_int("close_mosaic", self.close_mosaic, minimum=0)
        _positive_int("seed", self.seed, minimum=0)
        if self.best_metric not in METRICS:
            raise ConfigError(f"train.best_metric must be one of {', '.join(METRICS)}, got {self.best_metric!r}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"train.amp must be one of null, bf16, fp16; got {self.amp!r} (or auto: bf16 where "
                              f"the device computes it natively, else fp32)")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"train.compile must be false, true (the model's forward) or full (the whole step at "
                              f"fixed shapes); got {self.compile!r}")
        if not isinstance(self.channels_last, bool):
            raise ConfigError(f"train.channels_last must be true or false, got {self.channels_last!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device must be auto, cpu or cuda; got {self.device!r}")
        clip = self.grad_clip
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
            raise ConfigError(f"train.grad_clip must be null (no clipping) or a max norm > 0, got {clip!r}")
        balance = self.loss_balance
        if balance is not None and not (isinstance(balance, Mapping) and "type" in balance):
            raise ConfigError(f"train.loss_balance must be null or a spec like {{type: Uncertainty}}, "
                              f"got {self.loss_balance!r}")
        timeout = self.ddp_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ConfigError(f"train.ddp_timeout must be a number of seconds > 0 (how long a rank may make no "
                              f"progress before a multi-process run is stopped), got {timeout!r}")
        _ema(self.ema)
        self.early_stop = _early_stop(self.early_stop)
        self.hooks = _spec_list("hooks", self.hooks)
        self.writers = _spec_list("writers", self.writers)
