"""Latency of an exported model against PyTorch eager on the CPU (``benchmark --sections export``)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from detkit.config import load_config
from detkit.export import ExportOptions, export_onnx, full_sizes, require
from detkit.models import build_detector


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
