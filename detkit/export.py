"""Export a detector to ONNX / TorchScript / OpenVINO / TensorRT, each file checked against PyTorch before it
replaces ``--out``.

:data:`FORMATS` is the one place that says how each ``--format`` is written and run; the graph they hold and
its ONNX / TorchScript writing are :mod:`detkit.export_graph`'s (its public names are importable from here too).
"""

from __future__ import annotations

import importlib
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import Tensor, nn

import detkit.api
from detkit.deploy.openvino import WEIGHTS_SUFFIX, calibration_inputs, load_openvino, onnx_to_openvino
from detkit.deploy.parity import ParityError, ParityReport, Runner, check_parity
from detkit.deploy.tensorrt import load_tensorrt, onnx_to_tensorrt, tensorrt_unavailable
from detkit.deploy.validate import VAL_TOL, Validation, ValidationError
from detkit.export_graph import (
    ExportOptions,
    ExportWrapper,
    export_onnx,
    export_torchscript,
    full_sizes,
    load_onnx,
    load_torchscript,
)
from detkit.files import replaced_on_success
from detkit.registry import ConfigError

__all__ = ["FORMATS", "ExportError", "ExportFormat", "ExportOptions", "ExportWrapper", "check_export_target",
           "export_checkpoint", "export_onnx", "export_openvino", "export_tensorrt", "export_torchscript", "full_sizes",
           "load_onnx", "load_torchscript", "require", "run_exported", "write"]


class ExportError(RuntimeError):
    """The exporter failed, or the exported file's detections differ from PyTorch's (``--out`` is left as it was)."""


@contextmanager
def temporary_onnx(detector: nn.Module, path: Path, options: ExportOptions) -> Iterator[Path]:
    """The ONNX graph of :func:`export_onnx` in a temporary folder beside ``path``, removed after the block: what
    OpenVINO and TensorRT convert."""
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as folder:
        yield export_onnx(detector, Path(folder) / "model.onnx", options)


def export_openvino(detector: nn.Module, path: Path, options: ExportOptions) -> Path:
    """OpenVINO IR at ``path`` (+ its ``.bin``): the ONNX graph of :func:`export_onnx` converted by OpenVINO,
    quantized to int8 when ``options.calibration`` holds inputs (:func:`~detkit.deploy.openvino.onnx_to_openvino`)."""
    with temporary_onnx(detector, path, options) as onnx:
        return onnx_to_openvino(onnx, Path(path), options.calibration)


def export_tensorrt(detector: nn.Module, path: Path, options: ExportOptions) -> Path:
    """A TensorRT engine at ``path``: the ONNX graph of :func:`export_onnx` built in fp16 for this machine's GPU
    (:func:`~detkit.deploy.tensorrt.onnx_to_tensorrt`)."""
    with temporary_onnx(detector, path, options) as onnx:
        return onnx_to_tensorrt(onnx, Path(path))


@dataclass(frozen=True)
class ExportFormat:
    """One ``--format``: its file suffix, the packages it needs (and the extra that brings them), how it
    is written (``export(detector, path, options)``) and how a written file is run (``load(path)``);
    ``unavailable()`` says why this machine cannot do either ('' when it can), checked before anything else."""

    suffix: str
    extra: str
    packages: Callable[[ExportOptions], tuple[str, ...]]
    export: Callable[[nn.Module, Path, ExportOptions], Any]
    load: Callable[[Path], Runner]
    sidecar: str = ""  # suffix of a second file written beside the first (OpenVINO's weights), moved with it
    unavailable: Callable[[], str] = lambda: ""


FORMATS: dict[str, ExportFormat] = {
    "onnx": ExportFormat(".onnx", "export", lambda o: ("onnx", "onnxruntime") + (("onnxscript",) if o.dynamo else ()),
                         export_onnx, load_onnx),
    "torchscript": ExportFormat(".pt", "export", lambda o: (), export_torchscript, load_torchscript),
    "openvino": ExportFormat(".xml", "openvino", lambda o: ("openvino", "onnx") + (("onnxscript",) if o.dynamo else ())
                             + (("nncf",) if o.calibration else ()), export_openvino, load_openvino,
                             sidecar=WEIGHTS_SUFFIX),
    "tensorrt": ExportFormat(".engine", "tensorrt",
                             lambda o: ("onnx", "tensorrt") + (("onnxscript",) if o.dynamo else ()), export_tensorrt,
                             load_tensorrt, unavailable=tensorrt_unavailable),
}


def run_exported(path: Path, fmt: str, images: Tensor, image_sizes: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Run an exported file once on ``images`` (uint8 (B, 3, H, W); ``image_sizes`` (B, 2) defaults to
    the batch's H, W for every image)."""
    return FORMATS[fmt].load(Path(path))(images, full_sizes(images) if image_sizes is None else image_sizes)


def require(module: str, extra: str = "export") -> None:
    """Import ``module`` or raise a :class:`ConfigError` saying which extra to install."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"export needs the '{module}' package: pip install {module} (or all that this --format "
                          f"needs: pip install \"detkit[{extra}]\")") from None


def check_export_target(checkpoint: str | Path, fmt: str, out: str | Path) -> Path:
    """``out`` as a Path, refused (:class:`ConfigError`) when it is a folder or the checkpoint itself."""
    out, checkpoint = Path(out), Path(checkpoint)
    suffix = FORMATS[fmt].suffix
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file path such as {out / (checkpoint.stem + suffix)}")
    if out.resolve() == checkpoint.resolve() or (out.exists() and checkpoint.exists() and out.samefile(checkpoint)):
        raise ConfigError(f"--out {out} is the checkpoint being exported ({checkpoint}); writing it would replace "
                          f"the checkpoint: give another file, e.g. {checkpoint.with_suffix(suffix)}")
    sidecar = FORMATS[fmt].sidecar
    if sidecar and (out.suffix != suffix or out.with_suffix(sidecar).resolve() == checkpoint.resolve()):
        example = out.parent / f"{checkpoint.stem}_{fmt}{suffix}"
        raise ConfigError(f"--format {fmt} writes {out.with_suffix(suffix).name} and its {sidecar} beside it: give "
                          f"--out a {suffix} name that is not the checkpoint's, e.g. {example}")
    return out


def write(fmt: str, detector: nn.Module, path: Path, options: ExportOptions) -> Runner:
    """Export to ``path`` and load it back; any exporter/runtime error becomes one :class:`ExportError` line."""
    try:
        FORMATS[fmt].export(detector, path, options)
        return FORMATS[fmt].load(path)
    except Exception as err:  # the exporters raise many types; the first line says what went wrong
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise ExportError(f"exporting to {fmt} failed ({type(err).__name__}: {reason})") from err


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, dynamo: bool = True,
                      val_tol: float | None = None, int8: int | None = None) -> ParityReport:
    """Export ``checkpoint``'s inference weights to ``out`` and check the file against ``predict``
    (:func:`detkit.deploy.parity.check_parity`: several sizes and a padded batch, detections matched as sets).
    With ``val_tol`` (AP points) the file's val AP must also be within it of PyTorch's
    (:class:`~detkit.deploy.validate.Validation`). ``int8`` (OpenVINO; None: fp32): quantize with that many val
    images for calibration; its detections move by more than float rounding, so it is checked by val AP only.

    The file is written to a temporary file beside ``out`` and moved over it only once the check passed; an
    exporter error or a failed check is an :class:`ExportError` and leaves an existing ``out`` as it was.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = check_export_target(checkpoint, fmt, out)
    if reason := FORMATS[fmt].unavailable():  # a GPU and its runtime: checked before the checkpoint is read
        raise ConfigError(reason)
    if int8 is not None and fmt != "openvino":
        raise ConfigError(f"--int8 quantizes OpenVINO models: use it with --format openvino, not {fmt}")
    model = detkit.api.load_detector(checkpoint, device="cpu")
    calibration = () if int8 is None else tuple(calibration_inputs(model.config, int8, model.size_divisor))
    options = ExportOptions(size_divisor=model.size_divisor, dynamo=dynamo, calibration=calibration)
    for module in FORMATS[fmt].packages(options):
        require(module, FORMATS[fmt].extra)
    if fmt == "torchscript" and getattr(model.model.head, "stride_from_input", False):
        raise ConfigError("--format torchscript: this head spaces points by the input size (stride_from_input), "
                          "which a trace freezes at one size; export to onnx instead")
    tol = VAL_TOL if val_tol is None else val_tol  # --int8 is always checked by val AP
    validation = None if val_tol is None and int8 is None else Validation(model, tol)  # PyTorch's AP, before writing
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = f"{out} not written" + (" (the existing file is unchanged)" if out.exists() else "")

    def write_again() -> Runner:  # the same export into a throw-away file (the check's lowered threshold)
        with tempfile.TemporaryDirectory(dir=out.parent) as folder:
            return write(fmt, model.model, Path(folder) / f"check{FORMATS[fmt].suffix}", options)

    sidecar = FORMATS[fmt].sidecar
    with replaced_on_success(out) as tmp:
        try:
            run = write(fmt, model.model, tmp, options)
            report = check_parity(model, run, write_again) if int8 is None else ParityReport()
            report.validation = validation.check(run, fmt) if validation else None
            if sidecar:  # before the main file: that is replaced when the block ends
                os.replace(tmp.with_suffix(sidecar), out.with_suffix(sidecar))
        except (ExportError, ParityError, ValidationError) as err:
            raise ExportError(f"{checkpoint} -> {fmt}: {err}; {kept}") from err
        finally:
            if sidecar:
                tmp.with_suffix(sidecar).unlink(missing_ok=True)
    report.path = out
    report.mib = sum(p.stat().st_size for p in {out, out.with_suffix(sidecar or out.suffix)}) / 2 ** 20
    return report

