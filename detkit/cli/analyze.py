"""Looking at runs, data and components: ``analyze curves``, ``analyze dataset``, ``analyze tide``, ``browse``
and ``list``."""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
from typing import Any

from detkit.cli.common import add_set_argument, run_config
from detkit.files import is_inside
from detkit.registry import REGISTRIES, ConfigError, Registry, format_params

CURVE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")  # picture formats matplotlib writes (jpg through Pillow)


def cmd_curves(args: argparse.Namespace) -> int:
    from detkit.analysis.training_curves import plot_curves, read_metrics  # lazy: matplotlib, kept out of --help

    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file path such as {out / 'curves.png'}")
    if out.suffix.lower() not in CURVE_SUFFIXES:
        raise ConfigError(f"--out {out}: {out.suffix or 'no suffix'} is not a picture format; give a "
                          f"{', '.join(CURVE_SUFFIXES)} file, e.g. {out.with_suffix('.png')}")
    for run_dir in args.run_dirs:
        if out.exists() and is_inside(out, run_dir):
            raise ConfigError(f"--out {out} is a file of the run {run_dir}; write the curves outside the run's files")
    runs = [read_metrics(d) for d in args.run_dirs]
    names = [r.name for r in runs]
    for run, run_dir in zip(runs, args.run_dirs):  # two runs of the same folder name: tell them apart
        if names.count(run.name) > 1:
            run.name = str(run_dir)
    path = plot_curves(runs, args.out, args.keys)
    print(f"wrote {path} ({len(runs)} run(s))")
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    from detkit.analysis import dataset_stats as ds  # lazy (here and below): torch, kept out of --help
    from detkit.data import build_dataset

    cfg = run_config(args)
    if args.split not in (cfg.get("data") or {}):
        raise ConfigError(f"data.{args.split}: the config has no dataset for split '{args.split}'")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be a positive number of images, got {args.limit}")
    dataset = build_dataset(cfg["data"][args.split], f"data.{args.split}")
    stats = ds.dataset_stats(dataset, args.limit, f"data.{args.split}")
    health = ds.config_health(cfg, args.split, dataset, args.limit)
    name = f"{Path(args.config).stem} data.{args.split}"
    print(ds.format_stats(stats, name))
    print(ds.format_health(health) if isinstance(health, dict) else f"assigner health: not measured ({health})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = ds.plot_dataset_stats(stats, out / f"dataset_{args.split}.png",
                                title=f"{name} ({len(stats.boxes_per_image)} images, after its transforms)",
                                health=health if isinstance(health, dict) else None)
    summary = {**stats.summary(), "images_without_boxes_ids": list(map(str, stats.empty)), "assigner_health": health}
    (out / f"dataset_{args.split}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {png} and {out / f'dataset_{args.split}.json'}")
    return 0


def cmd_tide(args: argparse.Namespace) -> int:
    from detkit.analysis import tide_plot as tp  # lazy (here and below): torch, kept out of --help
    from detkit.analysis.tide_files import result_names, tide_of_files

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the TIDE tables and charts")
    names = result_names(args.results)
    inputs = {Path(p).resolve() for p in [args.gt, *args.results]}
    clash = [p for p in tp.tide_paths(out, names if len(names) > 1 else ()) if p.resolve() in inputs]
    if clash:
        raise ConfigError(f"--out {out} would overwrite the input {clash[0]}; give another folder")
    reports = tide_of_files(args.gt, args.results, args.fg_iou, args.bg_iou)  # every input checked first
    if len(reports) == 1:
        (report,) = reports.values()
        files = tp.write_tide(report, out)
        print("\n".join(tp.tide_size_table(report)))
    else:
        files = tp.write_tide_compare(reports, dict(zip(names, args.results)), out)
        print("\n".join(tp.tide_compare_tables(reports)))
    print(f"wrote {len(files)} files to {out} (dAP: AP50 points gained by fixing each error type alone)")
    return 0


def cmd_browse(args: argparse.Namespace) -> int:
    from detkit.data import build_dataset  # lazy (here and below): torch, kept out of --help
    from detkit.visualize import draw_detections, save_grid

    cfg = run_config(args)
    dataset: Any = build_dataset(cfg["data"][args.split], f"data.{args.split}")  # map-style, with `classes`
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    drawn = []
    for index in range(min(args.n, len(dataset))):
        image, target = dataset[index]
        picture = draw_detections(image, target["boxes"], target["labels"], dataset.classes)
        save_grid([picture], out / f"{args.split}_{index:03d}.png", nrow=1)
        drawn.append(picture)
    if drawn:
        save_grid(drawn, out / f"{args.split}_grid.png")
    print(f"wrote {len(drawn)} samples of data.{args.split} ({len(dataset)} images, classes "
          f"{dataset.classes}) to {out}")
    return 0


def format_registry(registry: Registry) -> str:
    """Every component of ``registry`` with its parameters, defaults and first docstring line."""
    lines = [f"{registry.name} ({len(registry)})"]
    for name, obj in registry.items():
        lines.append(f"  {name}({format_params(obj)})")
        doc = (inspect.getdoc(obj) or "").strip()
        if doc:
            lines.append(f"      {doc.splitlines()[0]}")
    if not len(registry):
        lines.append("  (none registered)")
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    import detkit.build  # noqa: F401  (fills the registries; lazy: torch, kept out of --help)

    names = args.registries or list(REGISTRIES)
    for name in names:
        if name not in REGISTRIES:
            raise ConfigError(f"unknown registry '{name}'; known: {', '.join(REGISTRIES)}")
    print("\n\n".join(format_registry(REGISTRIES[n]) for n in names))
    return 0


def add_analyze_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="training curves of runs, dataset statistics, TIDE errors of results files "
                                       "(also: tools/analyze.py; docs/diagnostics.md)",
                       description="Training curves, dataset statistics and TIDE error types of results files.")
    analyze = p.add_subparsers(dest="analysis", required=True)
    p_curves = analyze.add_parser("curves", help="loss terms, total, lr, AP/AP50 of one or more runs, overlaid")
    p_curves.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training work dirs (with metrics.jsonl)")
    p_curves.add_argument("--keys", nargs="+", default=None,
                          help="what to draw (default: every loss term, total, lr, AP, AP50), e.g. bbox AP "
                               "per_class/circle grad_norm")
    p_curves.add_argument("--out", default="curves.png",
                          help="the picture to write: .png, .pdf, .svg or .jpg (default: curves.png)")
    p_curves.set_defaults(func=cmd_curves)
    p_data = analyze.add_parser("dataset", help="class counts, boxes per image, box sizes, images without boxes, "
                                                "the config's assigner health (positives per box)")
    p_data.add_argument("--config", required=True)
    p_data.add_argument("--split", default="train", choices=["train", "val"])
    p_data.add_argument("--out", default="dataset_stats", help="folder for dataset_<split>.png/.json")
    p_data.add_argument("--limit", type=int, default=None, help="read only the first N images")
    add_set_argument(p_data)
    p_data.set_defaults(func=cmd_dataset)
    add_tide_parser(analyze)


def add_tide_parser(analyze: argparse._SubParsersAction) -> None:
    p = analyze.add_parser(
        "tide", help="where the AP goes (TIDE error types) of COCO results files against a COCO ground truth; "
                     "several --results side by side",
        description="TIDE (Bolya et al., ECCV 2020) of detections you already have: the AP50 gained by fixing each "
                    "error type alone (Cls, Loc, Both, Dupl, Bkg, Miss), per class and size, as eval writes it "
                    "(docs/diagnostics.md). A results file is a COCO results json: a list of {image_id, "
                    "category_id, bbox [x, y, w, h], score}; detkit eval writes one to "
                    "<checkpoint folder>/eval_<checkpoint name>/results.json, training to "
                    "<work dir>/results/bbox_epoch_N.json.")
    p.add_argument("--gt", required=True, help="COCO annotation json the detections were made on")
    p.add_argument("--results", required=True, nargs="+", action="extend", metavar="RESULTS_JSON",
                   help="one or more COCO results json files (several: compared side by side)")
    p.add_argument("--out", default="tide", help="folder for tide.md/.json/.png (several results: "
                                                 "tide_compare.md/.json/.png and a folder per results file)")
    p.add_argument("--fg-iou", type=float, default=0.5, help="t_f: IoU of a match (default 0.5)")
    p.add_argument("--bg-iou", type=float, default=0.1, help="t_b: IoU below which a box is background (0.1)")
    p.set_defaults(func=cmd_tide)


def add_browse_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("browse", help="draw transformed samples with their GT boxes to PNGs (also: "
                                      "tools/browse_dataset.py)")
    p.add_argument("--config", required=True)
    p.add_argument("--split", default="train", choices=["train", "val"])
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("-n", type=int, default=16, help="number of samples")
    add_set_argument(p)
    p.set_defaults(func=cmd_browse)


def add_list_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list registered components with their parameters")
    p.add_argument("registries", nargs="*", metavar="REGISTRY", help=f"any of: {', '.join(REGISTRIES)} (default: all)")
    p.set_defaults(func=cmd_list)
