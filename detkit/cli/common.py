"""Arguments and config loading that several commands share."""

from __future__ import annotations

import argparse

from detkit.config import apply_override, import_modules, load_config


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set train.epochs=3 model.head.losses.bbox.type=DIoULoss")


def add_run_arguments(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    parser.add_argument("--config", required=config_required,
                        help="YAML config" if config_required
                        else "YAML config (default: the one stored in the checkpoint)")
    parser.add_argument("--work-dir", default=None, help="output folder (default: work_dirs/<config name>)")
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                        help="default: train.device of the config (auto: GPU when available)")
    add_set_argument(parser)


def run_config(args: argparse.Namespace) -> dict:
    """The resolved config of ``--config`` with ``--set`` applied and its ``imports`` imported."""
    cfg = load_config(args.config, args.set)
    import_modules(cfg)
    return cfg


def checkpoint_config(args: argparse.Namespace) -> dict | None:
    """``--config`` (imports imported: the user named it), else with ``--set`` the checkpoint's own config with
    the overrides, whose ``imports`` are never imported (a checkpoint must not run code), else None (the
    checkpoint's config as stored)."""
    if args.config:
        return run_config(args)
    if args.set:
        from detkit.engine.checkpoint import load_checkpoint  # lazy: torch, kept out of --help

        cfg = dict(load_checkpoint(args.checkpoint).get("config") or {})
        for item in args.set:
            apply_override(cfg, item)
        return cfg
    return None
