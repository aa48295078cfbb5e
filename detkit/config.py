"""YAML configs with ``_base_`` inheritance and ``a.b.c=VALUE`` command-line overrides.

Rules (docs/architecture.md, section 1): dicts merge recursively, everything else replaces; a component
spec (a dict with ``type``) whose ``type`` changes replaces the base spec whole, so the old
component's arguments never leak into the new one.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

from detkit.registry import ConfigError, check_keys, suggestion

BASE_KEY = "_base_"


class _Loader(yaml.SafeLoader):
    """``safe_load`` that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str) -> object:
    """YAML text -> Python objects (safe loader, scientific-notation floats)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader derives from SafeLoader)
#: Top-level sections an override may create even when the loaded file lacks them.
SECTIONS = ("model", "data", "optimizer", "scheduler", "train", "work_dir", "imports", "load_from", "eval")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level, got {type(data).__name__}")
    return data


def merge(base: dict, child: dict) -> dict:
    """Return ``base`` updated by ``child`` (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            type_changed = "type" in value and "type" in old and value["type"] != old["type"]
            out[key] = copy.deepcopy(value) if type_changed else merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load(path: Path, chain: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{path}: _base_ cycle: {cycle}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    merged: dict = {}
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"{path}: _base_ file not found: {base} (looked for {base_path})")
        merged = merge(merged, _load(base_path, (*chain, path)))
    return merge(merged, data)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=VALUE")
    key, raw = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override '{item}': empty key in '{key}'")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{item}': value is not valid YAML: {err}") from None
    return keys, value


def apply_override(cfg: dict, item: str) -> None:
    """Set ``cfg[a][b][c] = VALUE`` for ``item = "a.b.c=VALUE"`` in place.

    Every key on the way must exist (a did-you-mean error otherwise), except the last key
    inside a component spec (a dict with ``type``), which becomes a new keyword argument;
    list elements are addressed by index (``data.train.transforms.0.p=0.5``).
    """
    keys, value = _parse_override(item)
    node: Any = cfg
    for depth, key in enumerate(keys):
        here = ".".join(keys[: depth + 1])
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
                raise ConfigError(f"override '{item}': '{here}' is not an index of a list of {len(node)}")
            if last:
                node[int(key)] = value
            node = node[int(key)]
            continue
        if not isinstance(node, dict):
            parent, rest = ".".join(keys[:depth]), ".".join(keys[depth:])
            whole = f"; set it whole: {parent}={{{rest.split('.')[0]}: ...}}" if node is None else ""
            raise ConfigError(f"override '{item}': '{parent}' is {'null' if node is None else f'the value {node!r}'}, "
                              f"not a section with keys{whole}")
        if key not in node:
            may_create = (last and "type" in node) or (depth == 0 and key in SECTIONS)
            if not may_create:
                known = list(node) if depth else sorted(set(node) | set(SECTIONS))
                hint = suggestion(key, known)
                raise ConfigError(f"override '{item}': unknown key '{here}'.{hint} "
                                  f"Known keys there: {', '.join(map(str, known))}")
            if not last:
                node[key] = {}
        if last:
            node[key] = value
        node = node[key]


def load_config(path: str | os.PathLike, overrides: Iterable[str] | None = None) -> dict:
    """Load a YAML config with its ``_base_`` files merged and ``overrides`` applied.

    Args:
        path: the YAML file. ``_base_`` paths inside it are relative to it.
        overrides: items like ``"model.head.losses.bbox.type=DIoULoss"`` (values parsed as YAML).
    Returns:
        The resolved config as plain dicts/lists/scalars, without ``_base_``.
    """
    cfg = _load(Path(path), ())
    if not cfg:
        raise ConfigError(f"{path}: the config is empty; it needs at least model and data sections")
    check_keys(cfg, SECTIONS, str(path), "top-level section", sep=": ")
    for item in overrides or ():
        apply_override(cfg, item)
    return cfg


def import_modules(cfg: dict) -> None:
    """Import the modules listed under ``imports`` (they register user components)."""
    names = cfg.get("imports") or []
    if isinstance(names, str):
        names = [names]
    if names and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # tools/*.py put their own folder first, not the cwd
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"imports: cannot import '{name}' ({err}); it must be importable from "
                              f"the current folder or the Python path") from None


def dump_config(cfg: dict, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML; loading it back gives the same dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None), encoding="utf-8")
    os.replace(tmp, path)
