"""Learned loss weights: homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor, nn

from detkit.engine.hooks.base import Hook
from detkit.registry import HOOKS, ConfigError

if TYPE_CHECKING:
    from detkit.engine.trainer import Trainer


@HOOKS.register()
class Uncertainty(Hook):
    """``train.loss_balance: {type: Uncertainty}``: one learned log-variance ``s_i`` per loss term,
    each term ``L_i`` becoming ``exp(-s_i) L_i + s_i`` (the form of Kendall et al. 2018 used by most
    implementations; ``s_i = log sigma_i^2``). The ``s_i`` are optimizer parameters (a param group of
    their own, no weight decay, the first group's lr and schedule), checkpointed with the hook and
    logged as ``loss_weight`` (= ``exp(-s_i)``) next to the per-term gradient norms.

    Args:
        init: initial ``s_i`` (0: every weight starts at 1). terms: the terms to balance
            (default: all the model's terms, ``model.loss_names()``).
    """

    priority = 15

    def __init__(self, init: float = 0.0, terms: Sequence[str] | None = None) -> None:
        self.init, self.terms = float(init), list(terms) if terms is not None else None
        self.log_vars: nn.ParameterDict | None = None

    def _started(self) -> nn.ParameterDict:
        assert self.log_vars is not None, "before_train builds it"
        return self.log_vars

    def before_train(self, trainer: "Trainer") -> None:
        names = self.terms if self.terms is not None else list(trainer.model.loss_names())  # type: ignore[operator]  # a detkit Detector's method
        if not names:
            raise ConfigError("train.loss_balance: the model names no loss terms to balance")
        self.log_vars = nn.ParameterDict({
            n.replace(".", "/"): nn.Parameter(torch.full((), self.init, device=trainer.device)) for n in names})
        trainer.optimizer.add_param_group({"params": list(self.log_vars.values()), "weight_decay": 0.0})

    def after_forward(self, trainer: "Trainer", losses: dict[str, Tensor]) -> dict[str, Tensor]:
        out, log_vars = dict(losses), self._started()
        for name, value in losses.items():
            key = name.replace(".", "/")
            if key in log_vars:
                s = log_vars[key]
                out[name] = torch.exp(-s) * value + s
        trainer.result.extras["loss_weight"] = {k.replace("/", "."): float(torch.exp(-v.detach()))
                                                for k, v in log_vars.items()}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"log_vars": {k: v.detach().cpu() for k, v in self.log_vars.items()}} if self.log_vars else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in state["log_vars"].items():
                self._started()[k].copy_(v)
