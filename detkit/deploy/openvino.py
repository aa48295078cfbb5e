"""OpenVINO: the exported ONNX graph converted by OpenVINO's own converter to IR (``.xml`` + ``.bin``), run on
the CPU, and optionally quantized to int8 by NNCF's post-training quantization on val images.

The IR keeps the ONNX file's contract: ``images uint8 (B, 3, H, W), image_sizes int64 (B, 2) -> boxes (B, M, 4),
scores (B, M), labels (B, M)``. It is compiled with ``INFERENCE_PRECISION_HINT: f32``: on CPUs with native bf16
(AVX512-BF16, AMX) OpenVINO otherwise runs fp32 models in bf16, whose detections differ from PyTorch's by more
than float rounding (near-tied scores swap, boxes move by several pixels).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from detkit.data.collate import collate_detection
from detkit.data.loader import build_dataset
from detkit.deploy.parity import Runner
from detkit.registry import ConfigError

WEIGHTS_SUFFIX = ".bin"  # the IR's weights, beside the .xml
FP32 = {"INFERENCE_PRECISION_HINT": "f32"}


def weights_path(xml: str | os.PathLike) -> Path:
    """The ``.bin`` an IR file's weights are written to and read from: ``xml`` with its suffix replaced."""
    return Path(xml).with_suffix(WEIGHTS_SUFFIX)


@contextlib.contextmanager
def quiet_nncf() -> Iterator[None]:
    """NNCF's progress bars go to stderr with the log (stdout keeps the command's result), and the "No CUDA
    runtime is found" notice that importing torch's cpp_extension for NNCF's torch backend logs is dropped."""
    cpp_extension = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension.level
    cpp_extension.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        cpp_extension.setLevel(level)


def onnx_to_openvino(onnx_path: Path, path: Path, calibration: Sequence[tuple[Tensor, Tensor]] = ()) -> Path:
    """Convert ``onnx_path`` with ``openvino.convert_model`` and save the IR at ``path`` (any suffix: the
    export writes a temporary name first) and :func:`weights_path` (fp32 weights, no fp16 compression).
    With ``calibration`` (``(images, image_sizes)`` inputs), the model is first quantized to int8 by
    ``nncf.quantize`` (activation ranges from those inputs; NNCF picks what runs in int8, the convolutions;
    NMS stays in fp32)."""
    import openvino  # optional packages (the openvino extra): imported when this format is used

    model = openvino.convert_model(str(onnx_path))
    if calibration:
        with quiet_nncf():
            import nncf  # optional dependency (pip install "detkit[openvino]"), only for --int8

            dataset = nncf.Dataset(list(calibration), lambda item: {"images": item[0].numpy(),
                                                                      "image_sizes": item[1].numpy()})
            model = nncf.quantize(model, dataset, subset_size=len(calibration))
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as folder:  # save_model insists on a .xml name
        openvino.save_model(model, str(Path(folder) / "model.xml"), compress_to_fp16=False)
        os.replace(Path(folder) / "model.bin", weights_path(path))
        os.replace(Path(folder) / "model.xml", path)
    return Path(path)


def load_openvino(path: Path, threads: int | None = None) -> Runner:
    """The IR at ``path`` compiled for the CPU in fp32 (``threads``: OpenVINO's default, all cores, when None)
    as ``run(images, image_sizes) -> (boxes, scores, labels)``."""
    import openvino  # optional package

    core = openvino.Core()
    config: dict[str, Any] = {**FP32, **({"INFERENCE_NUM_THREADS": int(threads)} if threads else {})}
    compiled = core.compile_model(core.read_model(str(path), str(weights_path(path))), "CPU", config)
    request = compiled.create_infer_request()

    def run(images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = request.infer({"images": images.contiguous().numpy(), "image_sizes": image_sizes.numpy()})
        boxes, scores, labels = (torch.from_numpy(out[name].copy()) for name in ("boxes", "scores", "labels"))
        return boxes, scores, labels

    return run


def calibration_inputs(config: dict[str, Any], count: int, size_divisor: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``count`` images of ``config``'s ``data.val`` (its transforms applied, padded to
    ``size_divisor``) as one-image ``(images uint8 (1, 3, H, W), image_sizes (1, 2))`` inputs for
    :func:`onnx_to_openvino`'s quantization."""
    if count < 1:
        raise ConfigError(f"--calib-images must be at least 1, got {count}")
    if "val" not in (config.get("data") or {}):
        raise ConfigError("--int8 calibrates on data.val, and the checkpoint's config has none")
    dataset = build_dataset(config["data"]["val"], "data.val")
    available = len(dataset)  # type: ignore[arg-type]  # map-style: torch's Dataset declares no __len__
    items = [collate_detection([dataset[i]], size_divisor) for i in range(min(count, available))]
    if not items:
        raise ConfigError("--int8: data.val has no images to calibrate on")
    return [(batch["images"], batch["image_sizes"]) for batch in items]
