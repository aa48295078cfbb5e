"""The export benchmarks (``benchmark --sections export`` and ``--sections deploy``), above the exporters
and the runtimes they time.

``export``: latency of one image, PyTorch eager vs the same model in ONNX on onnxruntime.
``deploy``: one checkpoint in every format this machine can run (ultralytics' ``yolo benchmark`` for
detkit). Per format: the file's size, the time to write it (export, conversion, quantization), its COCO AP
on the checkpoint config's ``data.val`` through its own runtime (:mod:`detkit.deploy.validate`), the latency
of one image and the throughput of a batch of 8 val images, all on the CPU. PyTorch eager is ``predict``'s
network (BatchNorm folded, channels_last) on the same padded batches; the runtimes are timed alternately
(:func:`detkit.bench.common.time_pair`), so drift on a shared machine hits all alike.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from detkit.api import load_detector
from detkit.bench.common import time_pair
from detkit.config import load_config
from detkit.deploy.openvino import calibration_inputs, weights_path
from detkit.deploy.parity import Runner
from detkit.deploy.validate import RuntimeDetector, Validation
from detkit.export import FORMATS, ExportError, ExportOptions, export_onnx, full_sizes, require, write
from detkit.models import build_detector

CPU = torch.device("cpu")
#: (row name, --format, int8): the rows after PyTorch eager, in this order
VARIANTS = [("TorchScript", "torchscript", False), ("ONNX Runtime", "onnx", False),
            ("OpenVINO fp32", "openvino", False), ("OpenVINO int8", "openvino", True)]


def missing_packages(fmt: str, options: ExportOptions) -> list[str]:
    """The packages ``fmt`` needs (with ``options``) that are not installed."""
    return [p for p in FORMATS[fmt].packages(options) if importlib.util.find_spec(p) is None]


def file_mib(path: Path) -> float:
    """Size of an exported file and of its weights file beside it, if it has one (OpenVINO's ``.bin``)."""
    return sum(p.stat().st_size for p in {path, weights_path(path)} if p.is_file()) / 2 ** 20


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_deploy(checkpoint: str | Path, repeat: int = 20, calib_images: int = 100, dynamo: bool = False
                 ) -> list[dict[str, Any]]:
    """One row per format: ``format``, ``MiB``, ``export_s`` (writing the file and loading it into its runtime),
    ``AP``, ``AP_vs_pytorch`` (AP points), ``batch1_ms`` (median of ``repeat`` runs), ``batch8_img_s``,
    ``speedup_b1`` / ``speedup_b8`` against PyTorch eager. A format whose packages are missing, or whose export
    fails, gets a row saying so. OpenVINO int8 calibrates on the first ``calib_images`` val images. ONNX (and the
    ONNX that OpenVINO converts) is written by torch.onnx's TorchScript-based exporter unless ``dynamo``: the
    same graph, several times faster to write."""
    model = load_detector(checkpoint, device="cpu")
    validation = Validation(model)
    batch = next(iter(validation.loader))
    images, sizes = batch["images"][:8].contiguous(), batch["image_sizes"][:8]
    # the checkpoint's predict (nn.Module types its attributes as Tensor | Module), timed only: any model runs here
    runners: dict[str, Runner] = {"PyTorch eager": lambda x, s: model.model.predict(  # type: ignore[operator]
        x.contiguous(memory_format=torch.channels_last), s)}
    rows: dict[str, dict[str, Any]] = {"PyTorch eager": {
        "format": "PyTorch eager", "MiB": round(Path(checkpoint).stat().st_size / 2 ** 20, 1), "export_s": "",
        "AP": round(100 * validation.pytorch["AP"], 2), "AP_vs_pytorch": 0.0}}
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        for name, fmt, int8 in VARIANTS:
            calibration = calibration_inputs(model.config, calib_images, model.size_divisor) if int8 else ()
            options = ExportOptions(size_divisor=model.size_divisor, dynamo=dynamo, calibration=tuple(calibration))
            missing = missing_packages(fmt, options)
            if missing:
                rows[name] = {"format": name, "MiB": f"not run: pip install {' '.join(missing)}"}
                continue
            path = Path(folder) / f"{fmt}{'_int8' if int8 else ''}{FORMATS[fmt].suffix}"
            log(f"deploy benchmark: writing {name}")
            start = time.perf_counter()
            try:
                runners[name] = write(fmt, model.model, path, options)
            except ExportError as err:
                rows[name] = {"format": name, "MiB": f"not run: {err}"}
                continue
            seconds = time.perf_counter() - start
            metrics, _ = validation.evaluate(RuntimeDetector(runners[name]), f"eval {name}")
            rows[name] = {"format": name, "MiB": round(file_mib(path), 1), "export_s": round(seconds, 1),
                          "AP": round(100 * metrics["AP"], 2),
                          "AP_vs_pytorch": round(100 * (metrics["AP"] - validation.pytorch["AP"]), 2)}
        # warm-up 5: TorchScript's profiling executor re-optimizes its graph over the first runs of each shape
        one = time_pair({k: bound(run, images[:1], sizes[:1]) for k, run in runners.items()}, CPU, repeat, 5)
        eight = time_pair({k: bound(run, images, sizes) for k, run in runners.items()}, CPU, repeat, 5)
    for name in runners:
        rows[name].update({"batch1_ms": round(one[name] * 1e3, 1), "batch8_img_s": round(8 / eight[name], 1),
                           "speedup_b1": round(one["PyTorch eager"] / one[name], 2),
                           "speedup_b8": round(eight["PyTorch eager"] / eight[name], 2)})
    return list(rows.values())


def bound(run: Runner, images: Tensor, sizes: Tensor) -> Callable[[], Any]:
    """``run`` on these inputs, as a no-argument call for :func:`time_pair`."""
    return lambda: run(images, sizes)


def bench_export(config: str | Path, size: int = 512, repeat: int = 20, threads: int = 2) -> list[dict[str, Any]]:
    """Latency of one ``size`` x ``size`` image on the CPU: PyTorch eager ``predict`` vs the same model
    exported to ONNX and run by onnxruntime (both on ``threads`` threads; median of ``repeat``)."""
    require("onnxruntime")
    import onnxruntime  # the export extra: imported when this section runs

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = build_detector(load_config(config)["model"]).eval()
    image = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(model, Path(folder) / "m.onnx", ExportOptions(dynamo=False))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        # a Detector's predict (nn.Module types its attributes as Tensor | Module)
        runs = {"pytorch eager predict": lambda: model.predict(image),  # type: ignore[operator]
                "onnxruntime (CPU)": lambda: session.run(None, {"images": image.numpy(),
                                                                "image_sizes": full_sizes(image).numpy()})}
        times: dict[str, list[float]] = {k: [] for k in runs}
        with torch.no_grad():
            for _ in range(3):  # warm-up
                for fn in runs.values():
                    fn()
            for _ in range(repeat):
                for name, fn in runs.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
    torch.set_num_threads(previous)
    eager = statistics.median(times["pytorch eager predict"])
    return [{"runtime": name, "config": Path(config).stem, "size": size, "threads": threads,
             "latency_ms": round(statistics.median(t) * 1e3, 1),
             "speedup_vs_eager": round(eager / statistics.median(t), 2)}
            for name, t in times.items()]
