"""``export``: a checkpoint to ONNX, TorchScript, OpenVINO or TensorRT, checked against PyTorch before it is written."""

from __future__ import annotations

import argparse


def cmd_export(args: argparse.Namespace) -> int:
    from detkit.export import export_checkpoint  # lazy: torch, kept out of --help

    report = export_checkpoint(args.checkpoint, args.format, args.out, dynamo=not args.legacy_exporter,
                               val_tol=args.val_tol if args.val or args.int8 else None,
                               int8=args.calib_images if args.int8 else None)
    print(report.summary())  # the file, its size, and what the check against PyTorch compared
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """The ``export`` subcommand's arguments (new export flags go here)."""
    p = sub.add_parser("export", help="export a checkpoint to ONNX, TorchScript, OpenVINO or TensorRT "
                                      "(also: tools/export.py)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "openvino", "tensorrt"])
    p.add_argument("--out", required=True, help="the file to write (.onnx, .pt, .xml with its .bin beside it, "
                                                ".engine); replaced only once the new file passed the check")
    p.add_argument("--legacy-exporter", action="store_true",
                   help="ONNX through torch.onnx's TorchScript-based exporter (faster to export; same graph)")
    p.add_argument("--val", action="store_true",
                   help="also evaluate the file through its runtime on the config's data.val next to PyTorch, and "
                        "refuse it (exit 1, nothing written) when its AP is lower by more than --val-tol")
    p.add_argument("--val-tol", type=float, default=0.5, metavar="AP_POINTS",
                   help="--val, --int8: AP points (0-100) the file may lose against PyTorch (default 0.5)")
    p.add_argument("--int8", action="store_true",
                   help="--format openvino: int8 post-training quantization (nncf) calibrated on data.val images; "
                        "checked by val AP (--val-tol) instead of detection by detection")
    p.add_argument("--calib-images", type=int, default=100, metavar="N",
                   help="--int8: calibration images, the first N of data.val (default 100)")
    p.set_defaults(func=cmd_export)
