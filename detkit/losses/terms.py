"""Named loss terms of a head: ``losses: {cls: SPEC, bbox: SPEC or [SPEC, ...], ...}``."""

from __future__ import annotations

from typing import Any, Collection, Mapping, Sequence, cast

from torch import Tensor, nn

from detkit.registry import LOSSES, ConfigError, check_keys, config_path


def check_kind(term: str, loss: nn.Module, accepted: Collection[str]) -> None:
    """Raise :class:`ConfigError` when ``loss`` declares kinds and none is ``accepted`` by ``term``."""
    kinds: Collection[str] = getattr(loss, "kinds", frozenset())
    if not kinds or set(kinds) & set(accepted):
        return
    fitting = sorted(n for n, cls in LOSSES.items() if set(getattr(cls, "kinds", ())) & set(accepted))
    raise ConfigError(f"{config_path(f'losses.{term}')}: {type(loss).__name__} is a {'/'.join(sorted(kinds))} loss, "
                      f"but the {term} term takes {'/'.join(sorted(accepted))} losses: {', '.join(fitting)}")


class LossTerms(nn.Module):
    """Builds one loss module (or several, summed) per term and names their outputs.

    ``terms(name, pred, target, ...)`` returns ``{name: loss}`` for a single spec, and
    ``{f"{name}.{Type}": loss, ...}`` for a list, so that every part is logged on its own.

    ``required`` maps each term to the loss kinds it takes (``classification``: class-index or
    float targets; ``quality``: ``(labels, scores)`` targets; ``box``; ``regression``;
    ``distribution``: DFL bins; ``score``; ``heatmap``): a loss whose ``kinds`` share none of them (a box term
    given ``FocalLoss``) is a config error at build time. Losses without ``kinds`` (your own,
    unless you set it) are accepted anywhere.
    """

    def __init__(self, specs: Mapping[str, Any], required: Mapping[str, Collection[str]]) -> None:
        super().__init__()
        if not isinstance(specs, Mapping):
            raise ConfigError(f"losses must map each of {list(required)} to a loss spec, got {specs!r}")
        check_keys(specs, required, "losses", "loss term")
        missing = [n for n in required if n not in specs]
        if missing:
            raise ConfigError(f"losses: missing term(s) {missing}; this head needs {list(required)}")
        self.terms = nn.ModuleDict()
        self.names: dict[str, list[str]] = {}
        for name in required:
            spec = specs[name]
            many = isinstance(spec, (list, tuple))
            specs_list = list(spec) if many else [spec]
            modules = [LOSSES.build(s, f"losses.{name}" + (f".{i}" if many else "")) for i, s in enumerate(specs_list)]
            for module in modules:
                check_kind(name, module, required[name])
            self.terms[name] = nn.ModuleList(modules)
            self.names[name] = self._names(name, specs_list) if many else [name]

    @staticmethod
    def _names(term: str, specs: Sequence[Mapping[str, Any]]) -> list[str]:
        names: list[str] = []
        seen: dict[str, int] = {}
        for spec in specs:
            base = f"{term}.{spec['type']}"
            seen[base] = seen.get(base, 0) + 1
            names.append(base if seen[base] == 1 else f"{base}.{seen[base] - 1}")
        return names

    def forward(self, name: str, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        losses = cast(nn.ModuleList, self.terms[name])
        return {label: loss(*args, **kwargs) for label, loss in zip(self.names[name], losses)}
