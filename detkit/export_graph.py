"""The exported graph and its ONNX / TorchScript files: ``uint8 images (B, 3, H, W), image_sizes (B, 2) -> boxes,
scores, labels``.

The graph (:class:`ExportWrapper`) holds zero-padding to the model's ``size_divisor``, normalisation, network,
decoding, (class-wise) NMS and clipping of each image's boxes to its own ``image_sizes`` row (h, w: its real
pixels in a zero-padded batch; the batch's H, W for unpadded images), so it gives ``DetectorModel.predict``'s
detections at any size and in padded batches of mixed sizes. Outputs are fixed-size per image:
``boxes (B, M, 4)`` x1y1x2y2 input pixels, ``scores (B, M)``, ``labels (B, M)`` int64, sorted by score;
empty slots have box 0, score 0, label -1 (M = head.max_per_img or head.topk).

:mod:`detkit.export` says which formats are written from it and checks each file before it replaces ``--out``.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.deploy.parity import Runner
from detkit.models.detector import Detector

INPUT_NAMES = ["images", "image_sizes"]
OUTPUT_NAMES = ["boxes", "scores", "labels"]


class ExportWrapper(nn.Module):
    """``forward(images uint8 (B, 3, H, W), image_sizes int64 (B, 2)) -> (boxes (B, M, 4), scores (B, M),
    labels (B, M))``: pads H, W up to a multiple of ``size_divisor`` as the loaders' collate does (the FPN's
    levels then line up as in training and ``predict``) and clips each image's boxes to its (h, w) row."""

    def __init__(self, detector: nn.Module, size_divisor: int = 32) -> None:
        super().__init__()
        if not hasattr(detector.head, "predict_padded"):
            raise TypeError(f"{type(detector.head).__name__} has no predict_padded: not exportable")
        if not isinstance(detector, Detector):  # forward() runs its features()
            raise TypeError(f"{type(detector).__name__} is not a detkit Detector: not exportable")
        self.detector: Detector = detector
        self.size_divisor = int(size_divisor)
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
            assert program is not None  # dynamo=True returns the program (the TorchScript-based exporter: None)
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
    import onnxruntime  # the export extra: imported when this format is written or run

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        boxes, scores, labels = session.run(None, {"images": images.contiguous().numpy(),
                                                   "image_sizes": image_sizes.numpy()})
        return torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels)

    return run


def load_torchscript(path: Path) -> Runner:
    """A loaded TorchScript file as ``run(images, image_sizes) -> (boxes, scores, labels)``."""
    with quiet_export():
        module = torch.jit.load(str(path), map_location="cpu")

    def run(images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            return module(images, image_sizes)

    return run

