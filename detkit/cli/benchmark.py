"""``benchmark`` (``tools/benchmark.py``): the sections of :mod:`detkit.bench` it runs, their tables printed as
they are done, and benchmark.md / benchmark.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detkit.registry import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BCCD = ROOT.parent / "shared" / "datasets" / "bccd"
DEFAULT_CONFIG = ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"
EPOCH_CONFIGS = [str(ROOT / "configs/fcos" / name) for name in ("tv_fcos_r18_fpn_bccd.yaml", "fcos_r18_fpn_bccd.yaml")]
SECTIONS = ["losses", "assigners", "train_step", "inference", "loading", "epochs", "export", "deploy", "gpu"]
#: ``--sections gpu``: the GPU figures: R-50 FPN-256, 512 px, batch 8, fp32 and bf16, detkit eager and
#: ``train.compile: full`` vs torchvision eager, with peak memory; the assigners; the default config's split.
GPU = {"depths": [50], "width": 256, "size": 512, "batch": 8, "amps": [None, "bf16"], "compiled": True}


def apply_presets(args: argparse.Namespace, device_type: str) -> None:
    """``--sections gpu`` (the GPU figures' settings), ``--config`` alone (its split only) and ``--quick``
    (toy sizes) rewrite ``args`` in place before the sections run."""
    if "gpu" in args.sections:
        if device_type != "cuda":
            raise ConfigError("--sections gpu needs --device cuda (or auto with a GPU)")
        args.sections = ["assigners", "train_step"]
        args.depths, args.width, args.size, args.batch = GPU["depths"], GPU["width"], GPU["size"], GPU["batch"]
        args.compile, args.amp = GPU["compiled"], "both"
        args.config, args.set = args.config or str(DEFAULT_CONFIG), args.set or ["data.num_workers=8"]
    elif args.config:
        args.sections = []
    if args.quick:
        args.repeat, args.size, args.batch, args.depths, args.width = 3, 256, 2, [18], 64


def loading_datasets(args: argparse.Namespace) -> dict[str, dict]:
    """The dataset specs the ``loading`` section times: shapes, and BCCD where ``--bccd`` is a folder."""
    datasets: dict[str, dict] = {"shapes 128px": {
        "type": "ShapesDataset", "num_images": 256 if args.quick else 2000, "image_size": 128, "min_size": 8,
        "transforms": [{"type": "RandomHorizontalFlip", "p": 0.5}, {"type": "RandomPhotometricDistort", "p": 0.5}]}}
    if Path(args.bccd).is_dir():
        datasets["BCCD 640x480"] = {"type": "CocoDataset", "data_root": args.bccd,
                                    "ann_file": "annotations/instances_train.json", "img_dir": "images",
                                    "transforms": [{"type": "RandomHorizontalFlip", "p": 0.5}]}
    return datasets


def cmd_benchmark(args: argparse.Namespace) -> int:
    """Every section ``args`` asks for (the ``benchmark`` command's arguments), each table printed as it is done."""
    # lazy: torch and the trainer, kept out of `detkit --help`
    import torch

    from detkit.bench import common, epochs, peers, split, train_step

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    results: dict = {"machine": {**common.machine(), "device": str(device), "command": " ".join(sys.argv)}}

    def show(key: str, title: str, rows: list) -> None:
        results[key] = rows
        print(common.markdown(title, rows), flush=True)

    apply_presets(args, device.type)
    if args.config:
        quick = {"steps": 4, "warmup": 2, "infer_batches": 2} if args.quick else {"steps": args.steps}
        out = split.bench_config(args.config, args.set, args.device, **quick)
        show("config", f"{Path(args.config).name} {' '.join(args.set)}".strip(), out["summary"])
        show("split", "where the training step goes (ms per step)", out["split"])
        print(split.check_line(out), flush=True)
    precisions: dict[str, list[str | None]] = {"fp32": [None], "bf16": ["bf16"], "both": [None, "bf16"]}
    amps = precisions[args.amp]
    if "losses" in args.sections:
        show("losses", "losses (fwd+bwd)", peers.bench_losses(device, args.size, args.batch, args.repeat, args.compile))
    if "assigners" in args.sections:
        sizes = [(512, 512)] if args.quick else [(512, 512), (800, 1333)]
        show("assigners", "assigners (batch 8, 20 GTs/image)", peers.bench_assigners(device, sizes, 8, 20, args.repeat))
    if "train_step" in args.sections:
        show("train_step", "train step", train_step.bench_train_step(
            device, args.depths, args.size, args.batch, args.width, args.repeat, amps, args.compile, args.num_convs,
            args.num_classes, args.channels_last))
    if "inference" in args.sections:
        show("inference", "batched inference, fp32 (predict vs torchvision eval())", train_step.bench_inference(
            device, args.depths[0], args.width, args.num_convs, args.num_classes, args.size, args.batch, args.repeat))
    if "loading" in args.sections:
        show("loading", "data loading (batch 16)",
             peers.bench_loading(loading_datasets(args), 16, [0, 2], 4 if args.quick else 15))
    if "epochs" in args.sections:
        data = [f"data.{s}.data_root={args.bccd}" for s in ("train", "val")]
        configs = {Path(c).stem: c for c in args.epoch_configs}
        show("epochs", f"training epochs through the trainer ({' '.join(args.epoch_set) or 'as configured'})",
             epochs.bench_epochs(configs, [*data, *args.epoch_set], str(device), args.epochs, args.rounds))
    if "export" in args.sections:
        from detkit.export_bench import bench_export  # onnx and onnxruntime: only for this section

        show("export", f"one {args.size}px image on the CPU: eager vs onnxruntime",
             bench_export(DEFAULT_CONFIG, args.size, args.repeat))
    if "deploy" in args.sections:
        if not args.checkpoint:
            raise ConfigError("--sections deploy times one trained model in every format: give --checkpoint CKPT")
        from detkit.export_bench import bench_deploy  # the exporters and runtimes: only for this section

        show("deploy", f"{args.checkpoint} in every format on the CPU (val AP on data.val, batches of val images)",
             bench_deploy(args.checkpoint, args.repeat, args.calib_images))
    common.write(Path(args.out), results)
    print(f"wrote {args.out}/benchmark.md and benchmark.json")
    return 0


DESCRIPTION = """Benchmarks; writes benchmark.md and benchmark.json to --out.

Your model (any config): train-step and inference images/s, peak memory and where the step's time goes
    python tools/benchmark.py --config configs/fcos/fcos_r18_fpn_shapes.yaml [--set k=v ...] [--quick]

Against peers in one process (alternated):
    python tools/benchmark.py --quick                       # losses, assigners, train step, loading on CPU
    python tools/benchmark.py --device cpu --sections inference --size 128 --batch 16
    python tools/benchmark.py --device cuda --sections gpu  # every GPU figure of docs/benchmarks.md
    python tools/benchmark.py --sections epochs --epoch-set data.num_workers=2   # whole epochs, BCCD
    python tools/benchmark.py --sections deploy --checkpoint CKPT   # every export format: size, AP, speed
"""


def add_benchmark_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="throughput, memory and time split of a config; peers (also: "
                                         "tools/benchmark.py)", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="time this config's training step and inference (the other flags below "
                                    "--set apply to the peer sections)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for --config")
    p.add_argument("--steps", type=int, default=15, help="--config: plain and split steps each (after warm-up)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--repeat", type=int, default=10, help="timed runs per measurement (median reported)")
    p.add_argument("--size", type=int, default=512, help="square image size for losses, train step, inference")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats and steps (CPU smoke run)")
    p.add_argument("--amp", choices=["fp32", "bf16", "both"], default="fp32", help="train step autocast")
    p.add_argument("--compile", action="store_true",
                   help="also time each detkit loss compiled, and detkit's train step under train.compile: full")
    p.add_argument("--sections", nargs="+", default=["losses", "assigners", "train_step", "loading"],
                   choices=SECTIONS)
    p.add_argument("--depths", type=int, nargs="+", default=[18, 50], help="ResNet depths for the train step")
    p.add_argument("--width", type=int, default=256, help="FPN / head width for the train step and inference")
    p.add_argument("--num-convs", type=int, default=4, help="head tower depth (train step, inference)")
    p.add_argument("--num-classes", type=int, default=80, help="classes (train step, inference)")
    p.add_argument("--channels-last", action="store_true", help="train step: also detkit in channels_last")
    p.add_argument("--bccd", default=str(BCCD), help="BCCD folder for the loading table (skipped if absent)")
    p.add_argument("--epoch-configs", nargs="+", default=EPOCH_CONFIGS,
                   help="configs timed by whole epochs through the trainer (the first is the reference)")
    p.add_argument("--epoch-set", nargs="*", default=[], help="overrides for every epoch config (e.g. a resize)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (the first is warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternated runs per config")
    p.add_argument("--checkpoint", help="--sections deploy: the trained model to export to every format")
    p.add_argument("--calib-images", type=int, default=100, metavar="N",
                   help="--sections deploy: OpenVINO int8 calibration images (the first N of data.val)")
    p.add_argument("--out", default="work_dirs/benchmark")
    p.set_defaults(func=cmd_benchmark)
