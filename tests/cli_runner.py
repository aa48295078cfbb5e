"""Running the real CLI entry point (``detkit.cli.main``) in this process: the same code path as
``tools/*.py`` without a new interpreter and torch import for every call."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

from detkit.cli import main


def run_main(*args: str) -> SimpleNamespace:
    """``main(args)`` -> ``returncode``, ``stdout``, ``stderr`` (the log goes to stderr, as in a terminal)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def tiny_shapes(data: Path) -> list[str]:
    """``--set`` overrides that shrink the default FCOS shapes config to about a second per run."""
    return [f"data.train.root={data}", f"data.val.root={data}", "data.train.num_images=4", "data.val.num_images=2",
            "data.train.image_size=64", "data.val.image_size=64", "data.batch_size=2", "data.num_workers=0",
            "train.epochs=1", "train.eval_interval=10", "model.neck.out_channels=16", "model.head.feat_channels=16",
            "model.head.num_convs=1", "eval.diagnostics=false",
            "train.amp=null"]  # fp32: bf16 CPU kernels are not run-to-run deterministic (exact-resume tests)
