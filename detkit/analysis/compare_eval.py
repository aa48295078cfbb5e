"""``compare --eval-variants``: every finished run's final weights evaluated again with the run's own config
(its ``config.yaml``) plus a variant's ``eval.*`` / ``train.amp`` overrides, as the ``eval`` command evaluates
a checkpoint (:func:`~detkit.engine.runner.evaluate_checkpoint`), into ``<run work dir>/eval-<NAME>/``; each
becomes a row ``<config>@<NAME>`` of the report, paired by seed like the trained configs."""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from detkit.analysis import RunDataError
from detkit.analysis.compare_report import RunResult, format_duration, last_evaluation
from detkit.analysis.compare_sweep import Run
from detkit.config import apply_override, load_config
from detkit.engine.checkpoint import CheckpointError, load_checkpoint
from detkit.engine.plan import check_train_config
from detkit.engine.runner import evaluate_checkpoint
from detkit.engine.writers import read_jsonl
from detkit.registry import ConfigError

logger = logging.getLogger("detkit")
#: ``evaluate(cfg, checkpoint, work_dir)``: :func:`evaluate_checkpoint` (writes ``results.json``,
#: ``metrics.jsonl``, ``log.txt`` into ``work_dir``).
Evaluate = Callable[[dict[str, Any], str, Path], Any]
#: The weights a run's last evaluation scored: the EMA model's when there is one (``trainer.eval_model()``),
#: saved after that evaluation by ``CheckpointHook.after_train``; nothing trains in between.
FINAL_WEIGHTS = "model_final.pth"
#: Beside an evaluation's ``results.json``: its overrides, and once it is done the weights' epoch and
#: iteration and its wall time.
VARIANT_FILE = "variant.json"


@dataclass(frozen=True)
class EvalRun:
    """``run``'s final weights evaluated with the overrides of eval variant ``name``."""

    run: Run
    name: str
    overrides: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.run.label}@{self.name}"

    @property
    def folder(self) -> Path:
        return self.run.work_dir / f"eval-{self.name}"


def allowed_key(item: str) -> bool:
    """An override of the evaluation alone: a key under ``eval.``, or ``train.amp`` (its precision)."""
    key = item.partition("=")[0].strip()
    return key.startswith("eval.") or key == "train.amp"


def plan_evaluations(variants: Sequence[tuple[str, tuple[str, ...]]], runs: Sequence[Run],
                     labels: dict[str, dict[str, Any]]) -> list[EvalRun]:
    """Every run x eval variant (``variants`` parsed by ``parse_variants``), checked: only evaluation keys,
    each label's config with the overrides passes ``train``'s checks, an ``eval-<NAME>/`` already there was
    made with the same overrides. Writes nothing."""
    for name, overrides in variants:
        bad = [o.partition("=")[0].strip() for o in overrides if not allowed_key(o)]
        if bad:
            raise ConfigError(f"--eval-variants {name}: {bad[0]} is not an evaluation setting; an eval variant may "
                              f"set keys under eval. and train.amp only (one that changes the model or the data is "
                              f"a training variant: --variants)")
    for label, cfg in labels.items():
        for name, overrides in variants:
            if f"{label}@{name}" in labels:
                raise ConfigError(f"the eval variant {name} of {label} would be named like the config "
                                  f"{label}@{name}; rename one")
            changed = copy.deepcopy(cfg)
            try:
                for item in overrides:
                    apply_override(changed, item)
                check_train_config(changed)
            except ConfigError as err:
                raise ConfigError(f"{label}@{name} (--eval-variants {name}): {err}") from None
    evals = [EvalRun(run, name, overrides) for run in runs for name, overrides in variants]
    for e in evals:
        check_existing_evaluation(e)
    return evals


def _saved(folder: Path) -> dict[str, Any] | None:
    """``folder/variant.json`` (None when absent); :class:`ConfigError` when unreadable."""
    path = folder / VARIANT_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path}: not readable ({err}); delete {folder} to evaluate again") from None
    return saved if isinstance(saved, dict) else {}


def check_existing_evaluation(e: EvalRun) -> None:
    """An ``eval-<NAME>/`` folder already there must be this eval variant's, made with the same overrides."""
    if not e.folder.exists():
        return
    saved = _saved(e.folder)
    if saved is None or saved.get("overrides") != list(e.overrides):
        what = (f"an evaluation with other overrides ({' '.join(saved.get('overrides') or [])})" if saved is not None
                else f"files without {VARIANT_FILE} (not an evaluation of compare --eval-variants)")
        raise ConfigError(f"{e.folder} holds {what}, not {' '.join(e.overrides)}; use another --out, or delete that "
                          f"folder to evaluate {e.label} again")


def final_weights(run: Run) -> tuple[Path, dict[str, Any]]:
    """The run's ``model_final.pth`` and its last ``eval`` record, checked to be the same epoch and iteration
    (read memory-mapped); :class:`RunDataError` naming the file otherwise."""
    path, record = run.work_dir / FINAL_WEIGHTS, last_evaluation(run.work_dir)
    try:
        state = load_checkpoint(path, mmap=True)
    except CheckpointError as err:
        raise RunDataError(f"{err}; --eval-variants evaluates the weights a finished run saves there. To train "
                           f"{run.name} again, delete {run.work_dir} and run the command again") from None
    if record is None or [state.get("epoch"), state.get("iter")] != [record.get("epoch"), record.get("iter")]:
        raise RunDataError(f"{path} (epoch {state.get('epoch')}, iteration {state.get('iter')}) is not what the last "
                           f"evaluation in {run.work_dir / 'metrics.jsonl'} scored; delete {run.work_dir} and run "
                           f"the command again to train {run.name} again")
    return path, record


def evaluated(e: EvalRun, record: dict[str, Any]) -> bool:
    """The evaluation is done, of the weights of ``record`` (the run's last evaluation)."""
    saved = _saved(e.folder) or {}
    return ("wall_s" in saved and [saved.get("epoch"), saved.get("iter")] == [record.get("epoch"), record.get("iter")]
            and (e.folder / "results.json").is_file())


def evaluate_one(e: EvalRun, checkpoint: Path, record: dict[str, Any], evaluate: Evaluate) -> float:
    """Evaluate ``checkpoint`` with the run's config.yaml and the overrides into ``e.folder``; its wall time."""
    cfg = load_config(e.run.work_dir / "config.yaml", e.overrides)
    e.folder.mkdir(parents=True, exist_ok=True)
    (e.folder / VARIANT_FILE).write_text(json.dumps({"overrides": list(e.overrides)}) + "\n")
    start = time.time()
    evaluate(cfg, str(checkpoint), e.folder)
    wall = time.time() - start
    done = {"overrides": list(e.overrides), "checkpoint": str(checkpoint), "epoch": record.get("epoch"),
            "iter": record.get("iter"), "wall_s": wall}
    (e.folder / VARIANT_FILE).write_text(json.dumps(done) + "\n")
    return wall


def run_evaluations(evals: Sequence[EvalRun], evaluate: Evaluate = evaluate_checkpoint) -> list[RunResult]:
    """Evaluate what is not done yet (every run's final weights checked first), print a line per
    evaluation; every evaluation's :class:`RunResult` (``wall_s``: the evaluation's time)."""
    weights = {run: final_weights(run) for run in dict.fromkeys(e.run for e in evals)}
    todo = [e for e in evals if not evaluated(e, weights[e.run][1])]
    print(f"compare: {len(evals)} evaluations of eval variants; {len(evals) - len(todo)} done (reused), "
          f"{len(todo)} to evaluate", flush=True)
    for k, e in enumerate(todo, 1):
        wall = evaluate_one(e, *weights[e.run], evaluate)
        ap = read_evaluation(e).metrics.get("AP")
        print(f"[{k}/{len(todo)}] {e.label}/seed{e.run.seed} evaluated in {format_duration(wall)}: AP "
              f"{'n/a' if ap is None else f'{100 * ap:.1f}'} ({e.folder})", flush=True)
    for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(handler)  # the last evaluation's log.txt: what follows is not part of it
        handler.close()
    return [read_evaluation(e) for e in evals]


def read_evaluation(e: EvalRun) -> RunResult:
    """The :class:`RunResult` of a done evaluation: its ``eval`` record, ``results.json`` and wall time."""
    path = e.folder / "metrics.jsonl"
    try:
        records = [r for r in read_jsonl(path) if r.get("type") == "eval"] if path.is_file() else []
    except ValueError as err:
        raise RunDataError(str(err)) from None
    if not records:
        raise RunDataError(f"{path}: no eval record; delete {e.folder} and run the command again")
    return RunResult(e.label, e.run.seed, e.folder, records[-1], e.folder / "results.json",
                     (_saved(e.folder) or {}).get("wall_s"))


def report_order(labels: Sequence[str], evals: Sequence[EvalRun]) -> dict[str, int]:
    """Row order: each config (the baseline first, as given) followed by its eval variants."""
    names = list(dict.fromkeys(e.name for e in evals))
    rows = [row for label in labels for row in (label, *(f"{label}@{name}" for name in names))]
    return {row: i for i, row in enumerate(rows)}
