"""tools/benchmark.py --quick runs end to end and writes its four tables (timings are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_prints_all_tables(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/benchmark.py"), "--quick", "--device", "cpu",
                           "--out", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, check=True)
    for title in ("### losses", "### assigners", "### train step", "### data loading"):
        assert title in proc.stdout
    results = json.loads((tmp_path / "out/benchmark.json").read_text())
    assert {"machine", "losses", "assigners", "train_step", "loading"} <= set(results)
    assert {row["loss"] for row in results["losses"]} >= {"FocalLoss", "GIoULoss", "GaussianFocalLoss"}
    assert all(row["speedup"] > 0 for row in results["losses"] + results["assigners"])
    assert results["train_step"][0]["ratio"] > 0
