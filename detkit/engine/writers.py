"""Where records go: console + log.txt, metrics.jsonl, tensorboard, MLflow, Weights & Biases.

Every writer gets the same records: ``write(kind, step, record)`` with ``kind`` ``train`` (one
per log interval), ``eval`` (one per evaluation) or ``skipped_step``; ``image(tag, image, step)``
for pictures. Writers exist on rank 0 only. ``train.writers: [{type: ConsoleWriter}, ...]``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from torch import Tensor

from detkit.engine.evaluator import format_metrics
from detkit.engine.run_log import bar_active
from detkit.registry import (
    WRITERS,
    ConfigError,
    build_path,
    check_arguments,
    config_path,
)

logger = logging.getLogger("detkit")
#: Keys of a ``train`` record that are not loss terms.
TRAIN_META = ("epoch", "iter", "step", "steps", "total", "lr", "grad_norm", "time", "eta")


def jsonable(value: Any) -> Any:
    """NaN -> None and +-inf -> "inf" (JSON has neither), recursively through dicts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def flatten(values: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``("a/b", 1)``."""
    for key, value in values.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def scalars(record: dict[str, Any]) -> Iterable[tuple[str, float]]:
    """The numbers of a record worth plotting (no counters)."""
    for key, value in flatten(record):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "iter"):
            yield key, float(value)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``. A last line that is not JSON (a killed run's half-written
    record) is skipped with one warning naming the file and line; a bad line elsewhere is a
    :class:`ValueError` naming them (the file was damaged otherwise: fix or remove that line)."""
    lines = path.read_text().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if any(rest.strip() for rest in lines[n:]):
                raise ValueError(f"{path}:{n}: not a JSON object ({err.msg}); fix or remove that line") from None
            logger.warning("%s:%d: skipping a truncated last line (a killed run's half-written record)", path, n)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class Writer:
    """Base class: ignore what you do not show. ``package``: the module the writer needs (imported when
    the config is checked, before anything is written)."""

    package: str | None = None

    def write(self, kind: str, step: int, record: dict[str, Any]) -> None:
        pass

    def image(self, tag: str, image: Tensor, step: int) -> None:
        pass

    def close(self) -> None:
        pass


@WRITERS.register()
class ConsoleWriter(Writer):
    """One line per train record and the metrics table per evaluation, to the console and ``log.txt``
    (while a tqdm bar is drawn, train lines go to ``log.txt`` only: the bar shows the same numbers)."""

    def __init__(self, work_dir: Path | None = None) -> None:
        del work_dir

    def write(self, kind: str, step: int, record: dict[str, Any]) -> None:
        if kind == "train":
            terms = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in TRAIN_META and isinstance(v, float))
            logger.info("epoch %d [%d/%d] iter %d | %s | total %.4f | lr %.2e grad %.2f | %.2f s/it eta %s",
                        record["epoch"], record["step"], record["steps"], step, terms, record["total"],
                        record["lr"], record["grad_norm"], record["time"], record["eta"],
                        extra={"file_only": bar_active()})
        elif kind == "eval":
            logger.info("evaluation after epoch %d on %d images:\n%s", record["epoch"], record["num_images"],
                        format_metrics(record))


@WRITERS.register()
class JsonlWriter(Writer):
    """``metrics.jsonl``: one JSON object per record, ``{"type": kind, **record}``. A resumed run first
    drops the lines after the resumed iteration, so no iteration appears twice."""

    def __init__(self, work_dir: Path, resume_iter: int | None = None) -> None:
        self.path = Path(work_dir) / "metrics.jsonl"
        if resume_iter is not None and self.path.is_file():
            try:
                kept = [r for r in read_jsonl(self.path) if r.get("iter", 0) <= resume_iter]
            except ValueError as err:
                raise ConfigError(str(err)) from None
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, kind: str, step: int, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(jsonable({"type": kind, **record})) + "\n")


@WRITERS.register()
class TensorboardWriter(Writer):
    """``tb/``: every number of every record (``train/...``, ``val/...``) and the pictures."""

    def __init__(self, work_dir: Path, resume_iter: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # why here: 0.6 s of imports, only for runs with tb/

        self.writer = SummaryWriter(str(Path(work_dir) / "tb"),
                                    purge_step=None if resume_iter is None else resume_iter + 1)

    def write(self, kind: str, step: int, record: dict[str, Any]) -> None:
        prefix = "val" if kind == "eval" else kind
        for key, value in scalars(record):
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def image(self, tag: str, image: Tensor, step: int) -> None:
        self.writer.add_image(tag, image, step)

    def close(self) -> None:
        self.writer.close()


def optional_module(package: str, writer: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"train.writers: {writer} needs the '{package}' package: pip install {package}") from None


@WRITERS.register()
class MLflowWriter(Writer):
    """MLflow run (``pip install mlflow``): every record's numbers as metrics per step."""

    package = "mlflow"

    def __init__(self, work_dir: Path, experiment: str = "detkit", tracking_uri: str | None = None,
                 run_name: str | None = None) -> None:
        self.mlflow = optional_module(self.package, "MLflowWriter")
        if tracking_uri:
            self.mlflow.set_tracking_uri(tracking_uri)
        self.mlflow.set_experiment(experiment)
        self.run = self.mlflow.start_run(run_name=run_name or Path(work_dir).name)

    def write(self, kind: str, step: int, record: dict[str, Any]) -> None:
        prefix = "val" if kind == "eval" else kind
        self.mlflow.log_metrics({f"{prefix}/{k}".replace("/", "."): v for k, v in scalars(record)
                                 if math.isfinite(v)}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


@WRITERS.register()
class WandbWriter(Writer):
    """Weights & Biases run (``pip install wandb``); ``mode: offline`` works without an account."""

    package = "wandb"

    def __init__(self, work_dir: Path, project: str = "detkit", name: str | None = None, mode: str | None = None
                 ) -> None:
        self.wandb = optional_module(self.package, "WandbWriter")
        self.run = self.wandb.init(project=project, name=name or Path(work_dir).name, dir=str(work_dir), mode=mode)

    def write(self, kind: str, step: int, record: dict[str, Any]) -> None:
        prefix = "val" if kind == "eval" else kind
        self.run.log({f"{prefix}/{k}": v for k, v in scalars(record)}, step=step)

    def close(self) -> None:
        self.run.finish()


class WriterGroup:
    """The run's writers as one: each call goes to every writer (rank 0 only; empty elsewhere)."""

    def __init__(self, writers: Sequence[Writer]) -> None:
        self.writers = list(writers)

    def write(self, kind: str, step: int, record: dict[str, Any]) -> None:
        for w in self.writers:
            w.write(kind, step, record)

    def image(self, tag: str, image: Tensor, step: int) -> None:
        for w in self.writers:
            w.image(tag, image, step)

    def close(self) -> None:
        for w in self.writers:
            w.close()


def check_writer_specs(specs: Sequence[dict[str, Any]]) -> None:
    """Every ``train.writers`` type is registered, its arguments fit and its package imports (before
    anything is written)."""
    for i, spec in enumerate(specs):
        with build_path(f"train.writers.{i}"):
            cls = WRITERS.get(spec["type"])
            given = {k: v for k, v in spec.items() if k != "type"}
            given.update({k: None for k in ("work_dir", "resume_iter") if k in inspect.signature(cls).parameters})
            check_arguments(cls, spec["type"], given, config_path())
            package = getattr(cls, "package", None)
            if package:
                optional_module(package, spec["type"])


def build_writers(specs: Sequence[dict[str, Any]], work_dir: Path, resume_iter: int | None, enabled: bool
                  ) -> WriterGroup:
    """``train.writers`` -> :class:`WriterGroup` (``work_dir`` and ``resume_iter`` filled in where taken)."""
    if not enabled:
        return WriterGroup([])
    writers = []
    for i, spec in enumerate(specs):
        cls = WRITERS.get(spec["type"])
        params = inspect.signature(cls).parameters
        defaults = {k: v for k, v in (("work_dir", work_dir), ("resume_iter", resume_iter)) if k in params}
        writers.append(WRITERS.build(spec, f"train.writers.{i}", **defaults))
    return WriterGroup(writers)
