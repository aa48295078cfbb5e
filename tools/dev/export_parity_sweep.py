"""The parity check on barely trained models (issue 24's done-when), run once by hand, not in the suite.

``python tools/dev/export_parity_sweep.py --out DIR [--runs 10] [--format onnx] [--legacy-exporter]`` trains
``--runs`` checkpoints of the default-width FCOS, GFL and CenterNet shapes configs in turn for 1 epoch on 16
images (seeds 0..runs-1: near-equal scores, the case that used to fail), exports each through the real
``export`` command and prints one line per run and a tally; exit 1 when an export was refused.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from detkit.cli import main

CONFIGS = ["configs/fcos/fcos_r18_fpn_shapes.yaml", "configs/gfl/gfl_r18_fpn_shapes.yaml",
           "configs/centernet/centernet_r18_shapes.yaml"]


def sweep(out: Path, runs: int, fmt: str, legacy: bool) -> int:
    """Train, export and check ``runs`` checkpoints under ``out``; the number of refused exports."""
    data, failed = out / "data", 0
    for run in range(runs):
        config = CONFIGS[run % len(CONFIGS)]
        work = out / f"{Path(config).stem}_seed{run}"
        code = main(["train", "--config", config, "--work-dir", str(work), "--device", "cpu", "--overwrite", "--set",
                     f"data.train.root={data}", f"data.val.root={data}", "data.train.num_images=16",
                     "data.val.num_images=4", "data.num_workers=0", "train.epochs=1", f"train.seed={run}",
                     "eval.diagnostics=false"])
        if code:
            raise SystemExit(f"training {work} failed (exit {code})")
        start = time.perf_counter()
        code = main(["export", "--checkpoint", str(work / "model_final.pth"), "--format", fmt,
                     "--out", str(work / f"model.{fmt}")] + (["--legacy-exporter"] if legacy else []))
        failed += code != 0
        seconds = time.perf_counter() - start
        print(f"run {run} {Path(config).stem} seed {run}: exit {code} in {seconds:.0f} s", flush=True)
    print(f"{runs - failed} of {runs} exports passed the check", flush=True)
    return failed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--format", default="onnx")
    parser.add_argument("--legacy-exporter", action="store_true")
    args = parser.parse_args()
    raise SystemExit(1 if sweep(args.out, args.runs, args.format, args.legacy_exporter) else 0)
