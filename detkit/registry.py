"""Name -> component registries that turn YAML specs (``{type: X, **kwargs}``) into objects.

One small class, no scopes and no folder scanning: ``detkit.build`` imports the modules that
register components, so what is registered is what that file imports.
"""

from __future__ import annotations

import difflib
import inspect
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Mapping

# Dotted config path of the spec being built ("model.head.losses.bbox"), so that errors raised
# while a parent builds its children name the full path although the parent never sees it.
_BUILD_PATH: ContextVar[str] = ContextVar("detkit_build_path", default="")


class ConfigError(ValueError):
    """A config or spec is wrong; the message says where and what was expected."""


class UnknownTypeError(ConfigError, KeyError):
    """A spec names a ``type`` that its registry does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message and show quotes
        return str(self.args[0])


def did_you_mean(name: str, candidates: Any, n: int = 3) -> list[str]:
    """Closest matches of ``name`` among ``candidates`` (difflib, case-insensitive first)."""
    candidates = [str(c) for c in candidates]
    lower = {c.lower(): c for c in candidates}
    matches = difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.6)
    return [lower[m] for m in matches]


def suggestion(name: str, candidates: Any) -> str:
    """`` Did you mean 'a', 'b'?`` for the closest ``candidates``, or ``""`` when none is close."""
    close = did_you_mean(name, candidates)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def check_keys(given: Any, known: Any, where: str, what: str = "key", sep: str = ".") -> None:
    """The one unknown-key check: ``{where}{sep}{key}: unknown {what}. Did you mean ...? Known: ...``."""
    known = list(known)
    for key in given:
        if key not in known:
            prefix = f"{where}{sep}{key}" if where else str(key)
            raise ConfigError(f"{prefix}: unknown {what}.{suggestion(str(key), known)} "
                              f"Known: {', '.join(map(str, known))}")


def _join(path: str, key: str | None) -> str:
    if not key:
        return path
    return f"{path}.{key}" if path else key


def config_path(key: str | None = None) -> str:
    """The dotted config path being built (``model.head``), extended by ``key``: for error messages."""
    return _join(_BUILD_PATH.get(), key)


def positive_int(value: Any, key: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``, else a :class:`ConfigError` naming the full config path of ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{config_path(key)} must be an integer >= {minimum}, got {value!r}")
    return value


@contextmanager
def build_path(key: str | None) -> Iterator[str]:
    """Extend the current config path by ``key`` for the duration of a nested build."""
    path = _join(_BUILD_PATH.get(), key)
    token = _BUILD_PATH.set(path)
    try:
        yield path
    finally:
        _BUILD_PATH.reset(token)


def _where(path: str) -> str:
    return f"{path}: " if path else ""


def signature_params(obj: Callable) -> list[inspect.Parameter]:
    """Keyword-settable parameters of a class (its ``__init__`` minus ``self``) or function."""
    params = inspect.signature(obj).parameters.values()
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY)]


def format_params(obj: Callable) -> str:
    """``a, b=1.0, **kwargs`` for messages and ``detkit list``."""
    parts = []
    for p in signature_params(obj):
        if p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        elif p.default is p.empty:
            parts.append(p.name)
        else:
            parts.append(f"{p.name}={p.default!r}")
    return ", ".join(parts)


class Registry:
    """Maps type names to classes or functions and builds them from spec dicts.

    >>> LOSSES = Registry("losses")
    >>> @LOSSES.register()
    ... class MyLoss: ...
    >>> LOSSES.build({"type": "MyLoss"})
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: dict[str, Callable] = {}

    def register(self, obj: Callable | None = None, *, name: str | None = None) -> Callable:
        """Register ``obj`` under ``name`` (default: its ``__name__``); usable as a decorator."""

        def add(target: Callable) -> Callable:
            key = name or target.__name__
            if key in self._entries:
                raise KeyError(f"registry '{self.name}' already holds '{key}' "
                               f"({self._entries[key].__module__}.{self._entries[key].__qualname__})")
            self._entries[key] = target
            return target

        return add if obj is None else add(obj)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, Callable]]:
        return sorted(self._entries.items())

    def get(self, key: str) -> Callable:
        """The registered object, or :class:`UnknownTypeError` with the closest names."""
        if key in self._entries:
            return self._entries[key]
        path = _BUILD_PATH.get()
        hint = suggestion(key, self._entries)
        known = ", ".join(sorted(self._entries)) or "(none registered)"
        raise UnknownTypeError(
            f"{_where(path)}unknown {self.name} type '{key}'.{hint} Known {self.name}: {known}")

    def build(self, spec: Mapping[str, Any], key: str | None = None, **defaults: Any) -> Any:
        """Build ``spec['type']`` with the other keys as keyword arguments.

        ``key`` names the spec inside its parent (e.g. ``"losses.bbox"``) for error messages;
        ``defaults`` are keyword arguments the caller supplies unless the spec sets them.
        """
        with build_path(key) as path:
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{_where(path)}expected a {self.name} spec (a mapping with 'type'), "
                                  f"got {type(spec).__name__}: {spec!r}")
            if "type" not in spec:
                raise ConfigError(f"{_where(path)}{self.name} spec has no 'type' key; got keys "
                                  f"{sorted(spec)}. Known {self.name}: {', '.join(self) or '(none)'}")
            type_name = spec["type"]
            obj = self.get(type_name)
            kwargs = {**defaults, **{k: v for k, v in spec.items() if k != "type"}}
            check_arguments(obj, type_name, kwargs, path)
            try:
                return obj(**kwargs)
            except ValueError as err:  # a constructor's own check of a value: name where it was set
                if type(err) is not ValueError:
                    raise  # ConfigError is named already; a data error keeps its own kind (exit 1)
                raise ConfigError(f"{_where(path)}{err}") from None


def check_arguments(obj: Callable, type_name: str, kwargs: Mapping[str, Any], path: str = "") -> None:
    """Raise :class:`ConfigError` naming an unknown or missing argument of ``obj``."""
    params = signature_params(obj)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params)
    names = [p.name for p in params if p.kind is not p.VAR_KEYWORD]
    accepted = format_params(obj) or "(no parameters)"
    if not accepts_any:
        for arg in kwargs:
            if arg not in names:
                hint = suggestion(arg, names)
                raise ConfigError(f"{_where(path)}{type_name} got an unknown argument '{arg}'.{hint} "
                                  f"{type_name} accepts: {accepted}")
    for p in params:
        if p.default is p.empty and p.kind is not p.VAR_KEYWORD and p.name not in kwargs:
            raise ConfigError(f"{_where(path)}{type_name} is missing the required argument '{p.name}'. "
                              f"{type_name} accepts: {accepted}")


LOSSES = Registry("losses")
BACKBONES = Registry("backbones")
NECKS = Registry("necks")
HEADS = Registry("heads")
DETECTORS = Registry("detectors")
ASSIGNERS = Registry("assigners")
DATASETS = Registry("datasets")
TRANSFORMS = Registry("transforms")
SAMPLERS = Registry("samplers")
OPTIMIZERS = Registry("optimizers")
SCHEDULERS = Registry("schedulers")
HOOKS = Registry("hooks")
WRITERS = Registry("writers")
WEIGHT_SCHEDULES = Registry("weight_schedules")

REGISTRIES: dict[str, Registry] = {
    r.name: r for r in (LOSSES, BACKBONES, NECKS, HEADS, DETECTORS, ASSIGNERS, DATASETS,
                        TRANSFORMS, SAMPLERS, OPTIMIZERS, SCHEDULERS, HOOKS, WRITERS, WEIGHT_SCHEDULES)
}
