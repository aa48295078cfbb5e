"""``export``: a checkpoint to ONNX or TorchScript, checked against PyTorch before it is written."""

from __future__ import annotations

import argparse


def cmd_export(args: argparse.Namespace) -> int:
    from detkit.export import export_checkpoint  # lazy: torch, kept out of --help

    report = export_checkpoint(args.checkpoint, args.format, args.out, dynamo=not args.legacy_exporter)
    print(report.summary())  # the file, its size, and what the check against PyTorch compared
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """The ``export`` subcommand's arguments (new export flags go here)."""
    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript (also: tools/export.py)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", required=True,
                   help="the file to write (.onnx or .pt); replaced only once the new file passed the check")
    p.add_argument("--legacy-exporter", action="store_true",
                   help="ONNX through torch.onnx's TorchScript-based exporter (faster to export; same graph)")
    p.set_defaults(func=cmd_export)
