"""``python -m detkit compare`` (``tools/compare.py``): configs x variants x seeds, one ordinary training run
each under ``OUT/runs/<config>[-<variant>]/seed<k>``, then (``--eval-variants``) every run's final weights
evaluated again with other evaluation settings (:mod:`detkit.analysis.compare_eval`), then the report of
:mod:`detkit.analysis.compare_report`.

Everything is validated before the first run starts: the arguments, every config with its ``--set`` and
variant overrides (the checks the ``train`` command makes before it writes), the val set (the same
images and annotations for every config: the comparison is paired), the configs of runs already in
``OUT`` (a run made with other settings is never reused) and the eval variants (evaluation keys only; an
evaluation already there was made with the same overrides).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

from detkit.analysis.compare_eval import (
    Evaluate,
    plan_evaluations,
    report_order,
    run_evaluations,
)
from detkit.analysis.compare_report import (
    build_report,
    last_evaluation,
    read_run,
    write_report,
)
from detkit.analysis.compare_sweep import (
    Launcher,
    Run,
    Sweep,
    recorded_wall,
    subprocess_launcher,
)
from detkit.config import import_modules, load_config
from detkit.data import build_dataset
from detkit.engine.checkpoint import CheckpointError, load_checkpoint
from detkit.engine.plan import check_train_config
from detkit.engine.run_log import setup_logging
from detkit.engine.runner import evaluate_checkpoint
from detkit.engine.settings import TrainSettings
from detkit.models import build_detector
from detkit.registry import ConfigError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


def parse_variants(items: list[str], option: str = "--variants") -> list[tuple[str, tuple[str, ...]]]:
    """``["NAME: k=v k=v", ...]`` -> ``[(NAME, (k=v, ...)), ...]`` (shell quoting for values with spaces:
    ``"ema: 'train.ema={decay: 0.999}'"``); no items: one unnamed variant. ``option`` names the argument
    in the messages."""
    variants = []
    for item in items:
        name, sep, rest = item.partition(":")
        try:
            name, overrides = name.strip(), tuple(shlex.split(rest))
        except ValueError as err:
            raise ConfigError(f"{option} {item!r}: {err}") from None
        if not sep or not NAME.match(name) or not overrides or not all("=" in o for o in overrides):
            raise ConfigError(f"{option} {item!r}: expected \"NAME: key=value [key=value ...]\" with NAME made of "
                              f"letters, digits, _ . - + =")
        variants.append((name, overrides))
    names = [n for n, _ in variants]
    if len(set(names)) < len(names):
        raise ConfigError(f"{option}: the names must differ, got {names}")
    return variants or [("", ())]


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise ConfigError(f"--shard must be I/N with 0 <= I < N (this shard runs runs I, I+N, ...), got {text!r}")
    return int(match[1]), int(match[2])


def parse_devices(text: str | None) -> list[str]:
    devices = [] if text is None else [d.strip() for d in text.split(",")]
    if not all(d.isdigit() for d in devices) or len(set(devices)) < len(devices):
        raise ConfigError(f"--devices must list distinct GPU indices like 0,1,2, got {text!r}")
    return devices


def check_run_config(cfg: dict[str, Any]) -> None:
    """What ``train`` checks before it writes anything (sections, train/data/eval settings, writers,
    optimizer, the model), plus what a comparison needs: a val split, metrics.jsonl and train.seed."""
    settings, _ = check_train_config(cfg)
    build_detector(cfg["model"])
    if "val" not in cfg["data"]:
        raise ConfigError("data.val: compare evaluates every run on the val split; the config has none")
    if not any(w.get("type") == "JsonlWriter" for w in settings.writers):
        raise ConfigError("train.writers: compare reads each run's metrics.jsonl; keep {type: JsonlWriter} in the list")
    if "seed" not in (cfg.get("train") or {}):
        raise ConfigError("train.seed: compare sets it per run (--set train.seed=K); add 'seed: 0' to the "
                          "config's train section")


def val_fingerprint(cfg: dict[str, Any]) -> tuple[str, Any]:
    """A hash of the val images and their annotations (what COCOeval sees), and the dataset."""
    dataset: Any = build_dataset(cfg["data"]["val"], "data.val")  # every detkit dataset has .coco and .ids
    ids = sorted(int(i) for i in dataset.ids)
    anns = sorted((a["image_id"], a["category_id"], [round(float(v), 3) for v in a["bbox"]], a.get("iscrowd", 0))
                  for a in dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=ids)))
    return hashlib.sha1(json.dumps([ids, anns]).encode()).hexdigest(), dataset


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The first key path where two configs differ (None when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(dict.fromkeys([*a, *b])):
            found = first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    return None if a == b else path or "(top level)"


def plan(args: argparse.Namespace) -> tuple[list[Run], dict[str, dict[str, Any]], Any]:
    """Every run of the sweep (sorted by label and seed), each label's resolved config, and the val dataset."""
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be a positive number of seeds per config, got {args.seeds}")
    if args.bootstrap < 1:
        raise ConfigError(f"--bootstrap must be a positive number of resamples, got {args.bootstrap}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder (it holds runs/, logs/ and the report)")
    variants = parse_variants(args.variants)
    labels: dict[str, dict[str, Any]] = {}
    runs: list[Run] = []
    reference: tuple[str, str] | None = None  # the first config's val fingerprint and label
    dataset = None
    for config in args.configs:
        for variant, extra in variants:
            label = Path(config).stem + (f"-{variant}" if variant else "")
            if label in labels:
                raise ConfigError(f"two runs would be named {label!r} (configs with the same file name); rename one")
            overrides = (*args.set, *extra)
            try:
                cfg = load_config(config, overrides)
                import_modules(cfg)
                check_run_config(cfg)
            except ConfigError as err:
                raise ConfigError(f"{label} ({config}{f' with variant {variant}' if variant else ''}): {err}") from None
            labels[label] = cfg
            fingerprint, found = val_fingerprint(cfg)
            dataset = dataset or found
            reference = reference or (fingerprint, label)
            if fingerprint != reference[0]:
                raise ConfigError(f"{label} evaluates on other val images or annotations than {reference[1]}; a "
                                  f"paired comparison needs the same val set (data.val)")
            runs += [Run(label, config, overrides, seed, out / "runs" / label / f"seed{seed}")
                     for seed in range(args.seeds)]
    for run in runs:
        check_existing(run, labels[run.label])
    return sorted(runs, key=lambda r: (r.label, r.seed)), labels, dataset


def keep_auto_class_weights(saved: Any, cfg: Any) -> None:
    """``class_weight: auto`` in ``cfg`` where ``saved`` (a run's config.yaml) holds the numbers the
    run computed from its training set: the same setting, in place."""
    if isinstance(saved, dict) and isinstance(cfg, dict):
        for key, value in cfg.items():
            if key == "class_weight" and value == "auto" and key in saved:
                saved[key] = "auto"
            else:
                keep_auto_class_weights(saved.get(key), value)
    elif isinstance(saved, list) and isinstance(cfg, list):  # a term with several losses
        for saved_item, item in zip(saved, cfg):
            keep_auto_class_weights(saved_item, item)


def check_existing(run: Run, cfg: dict[str, Any]) -> None:
    """A run already in its work dir must have been made from the same config; ``train.epochs`` may grow
    (``--resume`` continues on the longer schedule) and ``work_dir`` is where ``--out`` is now."""
    saved = run.work_dir / "config.yaml"
    if not saved.is_file():
        return
    old, new = load_config(saved), copy.deepcopy(cfg)
    new["train"]["seed"] = run.seed
    keep_auto_class_weights(old, new)
    for c in (old, new):
        c.pop("work_dir", None)
        (c.get("train") or {}).pop("epochs", None)
    diff = first_difference(old, new)
    if diff:
        raise ConfigError(f"{run.work_dir} holds a run made with other settings ({diff}: {saved} differs from "
                          f"{run.config} with the overrides); use another --out, or delete that folder to rerun it")


def finished(run: Run, cfg: dict[str, Any]) -> bool:
    """The run has evaluated after its last epoch, or after the epoch its early stop ended it at (its
    ``latest.pth`` says so; read memory-mapped, the weights stay on disk)."""
    record = last_evaluation(run.work_dir)
    if record is None:
        return False
    if int(record.get("epoch", 0)) >= TrainSettings.from_config(cfg).epochs:
        return True
    try:
        state = load_checkpoint(run.work_dir / "latest.pth", mmap=True)
    except CheckpointError:  # none yet, or unreadable: train --resume sorts it out
        return False
    return bool(state.get("stop_reason")) and int(state.get("epoch", -1)) == int(record.get("epoch", 0))


def compare(args: argparse.Namespace, launcher: Launcher = subprocess_launcher,
            evaluate: Evaluate = evaluate_checkpoint) -> int:
    """The ``compare`` command: validate, run what is missing (of this shard), when all runs are done (and
    without ``--shard``) evaluate the eval variants, then report."""
    setup_logging(None, 0)  # planning builds the val set (its generation logs): to this process's stderr
    first, count = parse_shard(args.shard)
    devices = parse_devices(args.devices)
    runs, cfgs, dataset = plan(args)
    evals = plan_evaluations(parse_variants(args.eval_variants, "--eval-variants") if args.eval_variants else [],
                             runs, cfgs)
    out = Path(args.out)
    mine = runs[first::count]
    todo = [r for r in mine if not finished(r, cfgs[r.label])]
    what = "configs x variants" if args.variants else "configs"
    print(f"compare: {len(runs)} runs ({len(cfgs)} {what} x {args.seeds} seed{'s' if args.seeds > 1 else ''})"
          f"{f', shard {first}/{count}: {len(mine)} of them' if count > 1 else ''}; {len(mine) - len(todo)} finished "
          f"(reused), {len(todo)} to train; logs in {out / 'logs'}", flush=True)
    sweep = Sweep(todo, out / "logs", launcher, devices, total=len(mine), done=len(mine) - len(todo))
    try:
        completed = sweep.run()
    except KeyboardInterrupt:  # between runs (a running child is waited for in the launcher)
        completed = False
    if not completed:
        print("interrupted: the runs saved their latest.pth; the same command continues the sweep", flush=True)
        return 130
    if sweep.failed:
        names = ", ".join(f"{r.name} (exit {code})" for r, code in sweep.failed)
        print(f"error: {len(sweep.failed)} run(s) failed: {names}; their output is in {out / 'logs'}. The same "
              f"command retries them and reuses the finished runs", flush=True)
        return 1
    pending = [r for r in runs if not finished(r, cfgs[r.label])]  # other shards' runs may be running
    if pending:
        print(f"{len(runs) - len(pending)} of {len(runs)} runs finished; the report is written when all are "
              f"(after the other shards, or run the command without --shard)", flush=True)
        return 0
    if evals and count > 1:  # two shards finishing together would evaluate into the same folders
        print(f"all {len(runs)} runs finished; run the command without --shard for the --eval-variants "
              f"evaluations and the report", flush=True)
        return 0
    results = [read_run(r.label, r.seed, r.work_dir, recorded_wall(out / "logs", r)) for r in runs]
    results += run_evaluations(evals, evaluate)
    order = report_order(list(cfgs), evals)  # the baseline first, as given; each config's eval variants after it
    results.sort(key=lambda r: (order[r.label], r.seed))
    report = build_report(results, dataset.coco, dataset.ids, args.bootstrap, args.bootstrap_seed)
    if evals:
        report["eval_variants"] = {e.name: list(e.overrides) for e in evals}
    paths = write_report(report, out)
    print((out / "report.md").read_text(), flush=True)
    print("wrote " + ", ".join(map(str, paths)), flush=True)
    return 0
