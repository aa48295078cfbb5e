"""``load_from``: start a new run from a whole detector's weights (a detkit checkpoint or torchvision's)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from detkit.engine.checkpoint import evaluation_weights, load_checkpoint
from detkit.models.convert import CONVERTERS
from detkit.models.weights import PREFIX, download_state_dict, weights_enum
from detkit.registry import ConfigError

logger = logging.getLogger("detkit")
MIN_LOADED = 0.5


def source_weights(spec: str, model: nn.Module) -> dict[str, Any]:
    """The state dict ``spec`` names, in detkit's keys: ``torchvision:<Weights>.<NAME>`` (converted) or a
    detkit checkpoint path (its evaluation weights: EMA when it has them)."""
    if spec.startswith(PREFIX):
        weights = weights_enum(spec[len(PREFIX):], "load_from")
        kind = type(weights).__name__
        if kind not in CONVERTERS:
            raise ConfigError(f"load_from: no converter for torchvision's {kind} into detkit; "
                              f"available: {', '.join(sorted(CONVERTERS))}")
        return CONVERTERS[kind](download_state_dict(weights, "load_from"), getattr(model, "num_classes", None))
    if not Path(spec).is_file():
        raise ConfigError(f"load_from: file not found: {spec}")
    return evaluation_weights(load_checkpoint(spec))


def load_pretrained(model: nn.Module, spec: str) -> str:
    """Copy every tensor of ``spec`` whose name and shape fit ``model``; returns the report table.

    Tensors of another shape (a classifier for another class count) are skipped. Fewer than half of
    the model's tensors loaded is a :class:`ConfigError`: the config and the weights do not match.
    """
    source = source_weights(spec, model)
    own = model.state_dict()
    loaded = {k: v for k, v in source.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    shape = sorted(k for k in source if k in own and k not in loaded)
    missing = sorted(k for k in own if k not in source)
    unexpected = sorted(k for k in source if k not in own)
    rows = [("loaded", len(loaded), []), ("skipped: shape differs", len(shape),
            [f"{k} {tuple(source[k].shape)} -> {tuple(own[k].shape)}" for k in shape]),
            ("missing in the weights (kept as initialised)", len(missing), missing),
            ("unexpected (not in this model)", len(unexpected), unexpected)]
    lines = [f"load_from {spec}: {len(loaded)} of the model's {len(own)} tensors loaded"]
    for name, count, keys in rows:
        lines.append(f"  {name:<46} {count:>5}")
        lines += [f"      {k}" for k in keys[:20]]
        lines += [f"      ... and {len(keys) - 20} more"] if len(keys) > 20 else []
    report = "\n".join(lines)
    if len(loaded) < MIN_LOADED * len(own):
        raise ConfigError(f"load_from {spec}: only {len(loaded)} of the model's {len(own)} tensors fit "
                          f"(needs at least {MIN_LOADED:.0%}): the weights are for another architecture than "
                          f"this config's model.\n{report}")
    model.load_state_dict(loaded, strict=False)
    return report
