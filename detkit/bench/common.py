"""Timing, machine description and table output shared by the benchmarks."""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import Tensor

STRIDES = (8, 16, 32, 64, 128)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(fns: dict[str, Callable[[], Any]], device: torch.device, repeat: int, warmup: int = 2
              ) -> dict[str, float]:
    """Median seconds per call of each function, run alternately so that drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def num_points(height: int, width: int) -> int:
    return sum(math.ceil(height / s) * math.ceil(width / s) for s in STRIDES)


def random_boxes(batch: int, num: int, height: int, width: int, device: torch.device,
                 seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    wh = torch.rand(batch, num, 2, generator=g) * torch.tensor([width, height]) * 0.5 + 8
    xy = torch.rand(batch, num, 2, generator=g) * (torch.tensor([width, height]) - wh)
    boxes = torch.cat([xy, xy + wh], -1)
    return boxes.to(device), torch.randint(0, 80, (batch, num), generator=g).to(device)


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown(title: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return f"### {title}\n\n(no rows)\n"
    keys = list(dict.fromkeys(k for row in rows for k in row))  # every row's columns, first seen first
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = []
        for k in keys:
            v = row.get(k, "")
            if isinstance(v, float):
                v = fmt_time(v) if k in ("detkit", "peer_time", "reference", "detkit_compiled") else f"{v:.2f}"
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(out_dir: Path, results: dict[str, Any]) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmark.json").write_text(json.dumps(results, indent=1))
    text = "\n".join(markdown(k, v) for k, v in results.items() if k != "machine")
    (out_dir / "benchmark.md").write_text(text)
    return text
