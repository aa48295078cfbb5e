"""Export a detector to ONNX / TorchScript: ``uint8 images (B, 3, H, W), image_sizes (B, 2) -> boxes, scores, labels``.

The exported graph holds zero-padding to the model's ``size_divisor``, normalisation, network, decoding,
(class-wise) NMS and clipping of each image's boxes to its own ``image_sizes`` row (h, w: its real pixels in
a zero-padded batch; the batch's H, W for unpadded images), so it gives ``DetectorModel.predict``'s
detections at any size and in padded batches of mixed sizes. Outputs are fixed-size per image:
``boxes (B, M, 4)`` x1y1x2y2 input pixels, ``scores (B, M)``, ``labels (B, M)`` int64, sorted by score;
empty slots have box 0, score 0, label -1 (M = head.max_per_img or head.topk).

:data:`FORMATS` is the one place that says how each ``--format`` is written and run.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.deploy.openvino import WEIGHTS_SUFFIX, calibration_inputs, load_openvino, onnx_to_openvino
from detkit.deploy.parity import ParityError, ParityReport, Runner, check_parity
from detkit.deploy.tensorrt import load_tensorrt, onnx_to_tensorrt, tensorrt_unavailable
from detkit.deploy.validate import VAL_TOL, Validation, ValidationError
from detkit.files import replaced_on_success
from detkit.registry import ConfigError

INPUT_NAMES = ["images", "image_sizes"]
OUTPUT_NAMES = ["boxes", "scores", "labels"]


class ExportError(RuntimeError):
    """The exporter failed, or the exported file's detections differ from PyTorch's (``--out`` is left as it was)."""


class ExportWrapper(nn.Module):
    """``forward(images uint8 (B, 3, H, W), image_sizes int64 (B, 2)) -> (boxes (B, M, 4), scores (B, M),
    labels (B, M))``: pads H, W up to a multiple of ``size_divisor`` as the loaders' collate does (the FPN's
    levels then line up as in training and ``predict``) and clips each image's boxes to its (h, w) row."""

    def __init__(self, detector: nn.Module, size_divisor: int = 32) -> None:
        super().__init__()
        if not hasattr(detector.head, "predict_padded"):
            raise TypeError(f"{type(detector.head).__name__} has no predict_padded: not exportable")
        self.detector, self.size_divisor = detector, int(size_divisor)
        self.eval()  # the wrapper too: torch.onnx.export restores the *wrapper's* mode afterwards, and a
        # fresh nn.Module is in training mode, which would silently put the detector's BatchNorms in train()

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        d = self.size_divisor  # shape arithmetic stays symbolic: traced as tensors, exported as SymInts
        height, width = images.shape[-2], images.shape[-1]
        images = F.pad(images, (0, (d - width % d) % d, 0, (d - height % d) % d))  # zeros, bottom/right
        outputs = self.detector.head(self.detector.features(images))  # features() normalises
        return self.detector.head.predict_padded(outputs, image_sizes)


@dataclass(frozen=True)
class ExportOptions:
    """What an exporter needs besides the detector: the padding multiple and, for ONNX, the exporter."""

    size_divisor: int = 32
    dynamo: bool = True
    calibration: tuple[tuple[Tensor, Tensor], ...] = ()  # OpenVINO int8: (images, image_sizes) inputs; () = fp32


def full_sizes(images: Tensor) -> Tensor:
    """``image_sizes (B, 2)`` int64 for a batch of unpadded images: every row the batch's (H, W)."""
    return torch.tensor([list(images.shape[-2:])] * images.shape[0], dtype=torch.int64)


def examples(batch: int) -> tuple[Tensor, Tensor]:
    """Traced example inputs: values don't matter; sizes not multiples of ``size_divisor`` (the padding
    is traced as a non-zero amount), large enough that every FPN level is above 1x1 (torch.export
    specialises sizes 0/1), with batch >= 2 for torch.export for the same reason."""
    images = torch.randint(0, 256, (batch, 3, 300, 340), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[300, 340], [260, 300]] * batch, dtype=torch.int64)[:batch]
    return images, sizes


@contextmanager
def quiet_export() -> Iterator[None]:
    """Silence what torch and torchvision say while tracing/exporting and that is not the user's business
    (deprecation notices of ``torch.jit``, ``torch.onnx`` and torchvision's NMS registration, the tracer's
    warnings on shape-dependent values: the file is checked against PyTorch instead), by message or category:
    other warnings still show."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        warnings.filterwarnings("ignore", "`create_unbacked_symint` is deprecated", FutureWarning)  # torchvision's nms
        for legacy_onnx in ("You are using the legacy TorchScript-based ONNX export", "The feature will be removed"):
            warnings.filterwarnings("ignore", legacy_onnx, DeprecationWarning)
        warnings.filterwarnings("ignore", "# The axis name: .* will not be used", UserWarning)  # torch.export's Dim
        yield


def export_onnx(detector: nn.Module, path: str | Path, options: ExportOptions = ExportOptions()) -> Path:
    """ONNX (opset 18) with dynamic batch, height and width, by torch.export (``dynamo``) or torch.onnx's
    TorchScript-based exporter."""
    wrapper, path = ExportWrapper(detector, options.size_divisor), Path(path)
    example = examples(2 if options.dynamo else 1)
    outputs = {name: {0: "batch", 1: "det"} for name in OUTPUT_NAMES}
    with torch.no_grad(), quiet_export():
        if options.dynamo:
            batch = torch.export.Dim("batch", min=1)
            dims = ({0: batch, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}, {0: batch})
            program = torch.onnx.export(wrapper, example, dynamo=True, input_names=INPUT_NAMES,
                                        output_names=OUTPUT_NAMES, dynamic_shapes=dims, opset_version=18,
                                        external_data=False, verbose=False)
            program.save(str(path))
        else:
            torch.onnx.export(wrapper, example, str(path), dynamo=False, input_names=INPUT_NAMES,
                              output_names=OUTPUT_NAMES, opset_version=18,
                              dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                            "image_sizes": {0: "batch"}, **outputs})
    return path


def export_torchscript(detector: nn.Module, path: str | Path, options: ExportOptions = ExportOptions()) -> Path:
    """``torch.jit.trace`` of the wrapper (shape-dependent values are traced as tensors: dynamic B, H, W)."""
    with torch.no_grad(), quiet_export():
        traced = torch.jit.trace(ExportWrapper(detector, options.size_divisor), examples(1),
                                 check_trace=False)
    traced.save(str(path))
    return Path(path)


def load_onnx(path: Path) -> Runner:
    """An onnxruntime session on the CPU as ``run(images, image_sizes) -> (boxes, scores, labels)``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        outs = session.run(None, {"images": images.contiguous().numpy(), "image_sizes": image_sizes.numpy()})
        return tuple(torch.from_numpy(o) for o in outs)  # type: ignore[return-value]

    return run


def load_torchscript(path: Path) -> Runner:
    """A loaded TorchScript file as ``run(images, image_sizes) -> (boxes, scores, labels)``."""
    with quiet_export():
        module = torch.jit.load(str(path), map_location="cpu")

    def run(images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            return module(images, image_sizes)

    return run


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
    import importlib

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
    from detkit.api import load_detector

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = check_export_target(checkpoint, fmt, out)
    if reason := FORMATS[fmt].unavailable():  # a GPU and its runtime: checked before the checkpoint is read
        raise ConfigError(reason)
    if int8 is not None and fmt != "openvino":
        raise ConfigError(f"--int8 quantizes OpenVINO models: use it with --format openvino, not {fmt}")
    model = load_detector(checkpoint, device="cpu")
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

