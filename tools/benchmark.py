"""Benchmarks against peers in one process; writes benchmark.md and benchmark.json.

    python tools/benchmark.py --quick                  # all four tables in under 2 minutes on CPU
    python tools/benchmark.py --device cuda --size 800 --batch 8
    python tools/benchmark.py --sections epochs --epoch-set data.num_workers=2   # whole epochs, BCCD
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from detkit import benchmark as bm

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT.parent / "shared" / "datasets" / "bccd"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--repeat", type=int, default=10, help="timed runs per measurement (median reported)")
    p.add_argument("--size", type=int, default=512, help="square image size for losses and train step")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (CPU smoke run)")
    p.add_argument("--amp", action="store_true", help="train step under bf16 autocast")
    p.add_argument("--compile", action="store_true", help="also time each detkit loss under torch.compile")
    p.add_argument("--sections", nargs="+", default=["losses", "assigners", "train_step", "loading"],
                   choices=["losses", "assigners", "train_step", "loading", "epochs", "export"])
    p.add_argument("--depths", type=int, nargs="+", default=[18, 50], help="ResNet depths for the train step")
    p.add_argument("--width", type=int, default=256, help="FPN / head width for the train step")
    p.add_argument("--bccd", default=str(BCCD), help="BCCD folder for the loading table (skipped if absent)")
    p.add_argument("--epoch-configs", nargs="+", default=[str(ROOT / "configs/fcos/tv_fcos_r18_fpn_bccd.yaml"),
                                                          str(ROOT / "configs/fcos/fcos_r18_fpn_bccd.yaml")],
                   help="configs timed by whole epochs through the trainer (the first is the reference)")
    p.add_argument("--epoch-set", nargs="*", default=[], help="overrides for every epoch config (e.g. a resize)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (the first is warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternated runs per config")
    p.add_argument("--out", default="work_dirs/benchmark")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.quick:
        args.repeat, args.size, args.batch, args.depths, args.width = 3, 256, 2, [18], 64
    results: dict = {"machine": {**bm.machine(), "device": str(device), "command": " ".join(sys.argv)}}
    if "losses" in args.sections:
        results["losses"] = bm.bench_losses(device, args.size, args.batch, args.repeat, args.compile)
        print(bm.markdown("losses (fwd+bwd)", results["losses"]), flush=True)
    if "assigners" in args.sections:
        sizes = [(512, 512)] if args.quick else [(512, 512), (800, 1333)]
        results["assigners"] = bm.bench_assigners(device, sizes, 8, 20, args.repeat)
        print(bm.markdown("assigners (batch 8, 20 GTs/image)", results["assigners"]), flush=True)
    if "train_step" in args.sections:
        results["train_step"] = bm.bench_train_step(device, args.depths, args.size, args.batch, args.width,
                                                    args.repeat, args.amp)
        print(bm.markdown("train step", results["train_step"]), flush=True)
    if "loading" in args.sections:
        datasets = {"shapes 128px": {"type": "ShapesDataset", "num_images": 256 if args.quick else 2000,
                                     "image_size": 128, "min_size": 8,
                                     "transforms": [{"type": "RandomHorizontalFlip", "p": 0.5},
                                                    {"type": "RandomPhotometricDistort", "p": 0.5}]}}
        if Path(args.bccd).is_dir():
            datasets["BCCD 640x480"] = {"type": "CocoDataset", "data_root": args.bccd,
                                        "ann_file": "annotations/instances_train.json", "img_dir": "images",
                                        "transforms": [{"type": "RandomHorizontalFlip", "p": 0.5}]}
        results["loading"] = bm.bench_loading(datasets, 16, [0, 2], 4 if args.quick else 15)
        print(bm.markdown("data loading (batch 16)", results["loading"]), flush=True)
    if "epochs" in args.sections:
        from detkit.epoch_benchmark import bench_epochs

        data = [f"data.{split}.data_root={args.bccd}" for split in ("train", "val")]
        configs = {Path(c).stem: c for c in args.epoch_configs}
        results["epochs"] = bench_epochs(configs, [*data, *args.epoch_set], str(device), args.epochs, args.rounds)
        print(bm.markdown(f"training epochs through the trainer ({' '.join(args.epoch_set) or 'as configured'})",
                          results["epochs"]), flush=True)
    if "export" in args.sections:
        from detkit.export import bench_export

        results["export"] = bench_export(ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml", args.size, args.repeat)
        print(bm.markdown(f"one {args.size}px image on the CPU: eager vs onnxruntime", results["export"]), flush=True)
    bm.write(Path(args.out), results)
    print(f"wrote {args.out}/benchmark.md and benchmark.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
