"""One command line: every ``tools/*.py`` is ``python -m detkit <command>`` (same ``--help``), every command's
errors go through one map to exit codes, and only the CLI imports the CLI."""

from __future__ import annotations

import importlib.util
import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from detkit.analysis import AnalysisError, RunDataError
from detkit.cli import build_parser, main
from detkit.cli.errors import exit_code
from detkit.data.annotations import DatasetError
from detkit.engine.checkpoint import CheckpointError
from detkit.registry import ConfigError
from tests.cli_runner import run_main

ROOT = Path(__file__).resolve().parents[1]
FCOS_CFG = ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"
TOOLS = sorted((ROOT / "tools").glob("*.py"))


def help_text(func, argv: list[str]) -> str:
    """What ``func(argv)`` prints for ``--help`` (argparse exits 0 after printing)."""
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as stop:
        func(argv)
    assert stop.value.code == 0
    return out.getvalue()


def test_every_tool_is_its_detkit_command():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    seen = set()
    for path in TOOLS:
        spec = importlib.util.spec_from_file_location(f"tool_{path.stem}", path)
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        assert tool.COMMAND in commands, path.name
        assert len(path.read_text().splitlines()) <= 20, f"{path.name} is more than a thin wrapper"
        assert help_text(tool.main, ["--help"]) == help_text(main, [tool.COMMAND, "--help"]), path.name
        seen.add(tool.COMMAND)
    assert commands - seen == {"list"}  # list has no tools/ script; every other command has one


def test_one_error_map():
    assert [exit_code(e) for e in (ConfigError("x"), AnalysisError("x"), FileNotFoundError("x"))] == [2, 2, 2]
    assert [exit_code(e) for e in (RunDataError("x"), DatasetError("x"), CheckpointError("x"),
                                   PermissionError(13, "Permission denied"))] == [1, 1, 1, 1]
    assert exit_code(RuntimeError("a bug")) is None  # its traceback is wanted


def test_analyze_errors_go_through_the_one_map(tmp_path):
    missing = run_main("analyze", "curves", str(tmp_path / "missing"), "--out", str(tmp_path / "c.png"))
    assert missing.returncode == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = tmp_path / "stats"
    broken = run_main("analyze", "dataset", "--config", str(FCOS_CFG), "--out", str(out), "--set",
                      f"data.train={{type: CocoDataset, data_root: {tmp_path}, ann_file: bad.json, img_dir: .}}")
    assert broken.returncode == 1
    for result, what in ((missing, "run folder not found"), (broken, "bad.json")):
        assert re.fullmatch(r"error: [^\n]+\n", result.stderr) and what in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert bad.read_text() == "{not json" and not out.exists() and not (tmp_path / "c.png").exists()


def test_only_the_cli_imports_the_cli_and_the_engine_no_api():
    for path in (ROOT / "detkit").rglob("*.py"):
        text = path.read_text()
        if path.parent.name != "cli" and path.name != "__main__.py":
            assert not re.search(r"^\s*(from|import) detkit\.cli\b", text, re.M), path
        if "engine" in path.relative_to(ROOT / "detkit").parts:
            assert not re.search(r"^\s*from detkit(\.api| import api)\b", text, re.M), path
