"""Export a detector to ONNX / TorchScript as ``uint8 images (B, 3, H, W) -> boxes, scores, labels``.

The exported graph holds normalisation, network, decoding and (FCOS) class-wise NMS. Outputs are
fixed-size per image: ``boxes (B, M, 4)`` x1y1x2y2 input pixels, ``scores (B, M)``, ``labels (B, M)``
int64, sorted by score; empty slots have box 0, score 0, label -1 (M = head.max_per_img or head.topk).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detkit.engine.inference import replaced_on_success
from detkit.ops.nms import image_sizes_of
from detkit.registry import ConfigError

OUTPUT_NAMES = ["boxes", "scores", "labels"]
MAX_BOX_DIFF = 0.5  # px: an export whose boxes differ more from PyTorch's (or whose labels differ) is not written


class ExportError(RuntimeError):
    """The exporter failed, or the exported file's detections differ from PyTorch's (``--out`` is left as it was)."""


class ExportWrapper(nn.Module):
    """``forward(images uint8 (B, 3, H, W)) -> (boxes (B, M, 4), scores (B, M), labels (B, M))``."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        if not hasattr(detector.head, "predict_padded"):
            raise TypeError(f"{type(detector.head).__name__} has no predict_padded: not exportable")
        self.detector = detector
        self.eval()  # the wrapper too: torch.onnx.export restores the *wrapper's* mode afterwards, and a
        # fresh nn.Module is in training mode, which would silently put the detector's BatchNorms in train()

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        outputs = self.detector.head(self.detector.features(images))  # features() normalises
        return self.detector.head.predict_padded(outputs, image_sizes_of(images))


def export_onnx(detector: nn.Module, path: str | Path, example: Tensor | None = None, dynamo: bool = False,
                opset: int = 18) -> Path:
    """ONNX with dynamic batch, height and width (both exporters). The example is only traced, its values
    don't matter; for ``dynamo=True`` it must have batch >= 2 and every FPN level larger than 1x1 (torch.export
    specialises sizes 0/1 and guards on them), hence the default (2, 3, 320, 352)."""
    wrapper, path = ExportWrapper(detector), Path(path)
    if example is None:
        example = torch.randint(0, 256, (2, 3, 320, 352), dtype=torch.uint8)
    dynamic = {"boxes": {0: "batch", 1: "det"}, "scores": {0: "batch", 1: "det"}, "labels": {0: "batch", 1: "det"}}
    with torch.no_grad():
        if dynamo:
            dims = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
            program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=["images"],
                                        output_names=OUTPUT_NAMES, dynamic_shapes=(dims,), opset_version=opset,
                                        external_data=False)
            program.save(str(path))
        else:
            torch.onnx.export(wrapper, (example,), str(path), dynamo=False, input_names=["images"],
                              output_names=OUTPUT_NAMES, opset_version=opset,
                              dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, **dynamic})
    return path


def export_torchscript(detector: nn.Module, path: str | Path, example: Tensor | None = None) -> Path:
    """``torch.jit.trace`` of the wrapper (shape-dependent values are traced as tensors: dynamic B, H, W)."""
    if example is None:
        example = torch.randint(0, 256, (1, 3, 320, 352), dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer/deprecation notices: the result is checked by the caller
        traced = torch.jit.trace(ExportWrapper(detector), (example,), check_trace=False)
    traced.save(str(path))
    return Path(path)


def require(module: str) -> None:
    """Import ``module`` or raise a :class:`ConfigError` saying which extra to install."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"export needs the '{module}' package: pip install \"detkit[export]\" "
                          f"(onnx, onnxruntime, onnxscript)") from None


def run_exported(path: Path, fmt: str, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Run an exported file on ``images`` (uint8 (B, 3, H, W)): onnxruntime on the CPU, or TorchScript."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs = session.run(None, {"images": images.numpy()})
        return tuple(torch.from_numpy(o) for o in outs)  # type: ignore[return-value]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(images)


def check_export_target(checkpoint: str | Path, fmt: str, out: str | Path) -> Path:
    """``out`` as a Path, refused (:class:`ConfigError`) when it is a folder or the checkpoint itself."""
    out, checkpoint = Path(out), Path(checkpoint)
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file path such as {out / (checkpoint.stem + suffix)}")
    if out.resolve() == checkpoint.resolve() or (out.exists() and checkpoint.exists() and out.samefile(checkpoint)):
        raise ConfigError(f"--out {out} is the checkpoint being exported ({checkpoint}); writing it would replace "
                          f"the checkpoint: give another file, e.g. {checkpoint.with_suffix(suffix)}")
    return out


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, dynamo: bool = True) -> dict[str, float]:
    """Export ``checkpoint``'s inference weights to ``out`` and check the file against PyTorch eager on a
    random 256x320 image: returns the max box / score differences and the file size (MiB).

    The file is written beside ``out`` and moved over it only once the check passed; an exporter error or a
    failed check is an :class:`ExportError` and leaves an existing ``out`` as it was.
    """
    from detkit.api import load_detector

    if fmt not in ("onnx", "torchscript"):
        raise ConfigError(f"--format must be onnx or torchscript, got {fmt!r}")
    out = check_export_target(checkpoint, fmt, out)
    if fmt == "onnx":
        for module in ("onnx", "onnxruntime") + (("onnxscript",) if dynamo else ()):
            require(module)
    detector = load_detector(checkpoint, device="cpu").model
    if fmt == "torchscript" and getattr(detector.head, "stride_from_input", False):
        raise ConfigError("--format torchscript: this head spaces points by the input size (stride_from_input), "
                          "which a trace freezes at one size; export to onnx instead")
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = f"{out} not written" + (" (the existing file is unchanged)" if out.exists() else "")
    image = torch.randint(0, 256, (1, 3, 256, 320), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with replaced_on_success(out) as tmp:
        try:
            (export_onnx(detector, tmp, dynamo=dynamo) if fmt == "onnx" else export_torchscript(detector, tmp))
            boxes, scores, labels = run_exported(tmp, fmt, image)
        except Exception as err:  # the exporters raise many types; the first line says what went wrong
            reason = (str(err).strip().splitlines() or [""])[0][:300]
            raise ExportError(f"exporting {checkpoint} to {fmt} failed ({type(err).__name__}: {reason}); "
                              f"{kept}") from err
        with torch.no_grad():
            ref = ExportWrapper(detector)(image)
        check = {"box_diff": float((boxes - ref[0]).abs().max()), "score_diff": float((scores - ref[1]).abs().max()),
                 "same_labels": bool(torch.equal(labels, ref[2]))}
        if not (check["same_labels"] and check["box_diff"] < MAX_BOX_DIFF):
            raise ExportError(f"the exported {fmt} file differs from PyTorch on a 256x320 image (max box difference "
                              f"{check['box_diff']:.2g} px, labels {'equal' if check['same_labels'] else 'different'}"
                              f"); {kept}")
    return {**check, "mib": out.stat().st_size / 2 ** 20}


def bench_export(config: str | Path, size: int = 512, repeat: int = 20, threads: int = 2) -> list[dict[str, Any]]:
    """Latency of one ``size`` x ``size`` image on the CPU: PyTorch eager ``predict`` vs the same model
    exported to ONNX and run by onnxruntime (both on ``threads`` threads; median of ``repeat``)."""
    import statistics
    import tempfile
    import time

    require("onnxruntime")
    import onnxruntime

    from detkit.config import load_config
    from detkit.models import build_detector

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = build_detector(load_config(config)["model"]).eval()
    image = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(model, Path(folder) / "m.onnx")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        runs = {"pytorch eager predict": lambda: model.predict(image),
                "onnxruntime (CPU)": lambda: session.run(None, {"images": image.numpy()})}
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
