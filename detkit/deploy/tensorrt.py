"""TensorRT: a serialized engine (``.engine``) built from the exported ONNX graph, run on a CUDA GPU.

The engine keeps the ONNX file's contract: ``images uint8 (B, 3, H, W), image_sizes int64 (B, 2) -> boxes (B, M, 4)
float32, scores (B, M) float32, labels (B, M) int64``. It is built for TensorRT 10's weakly typed networks with
``BuilderFlag.FP16``: convolutions, their activations and pooling may run in fp16; every other layer that computes
on floats (normalisation, additions, decoding, NMS) is constrained to fp32, because the graph's class-wise NMS adds
a per-class offset of ``class * (max box coordinate + 1)`` to the boxes, which leaves fp16's range (65504) or
precision (1 px spacing above 1024) on ordinary inputs. One optimization profile covers batch 1..:data:`MAX_BATCH`
and sides :data:`MIN_SIDE`..:data:`MAX_SIDE` px; the runner splits larger batches. ``tensorrt`` is optional (the
``tensorrt`` extra) and imported only here, when the format is used.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from detkit.registry import ConfigError

INPUTS = ("images", "image_sizes")
OUTPUTS = ("boxes", "scores", "labels")
OUTPUT_DTYPES = (torch.float32, torch.float32, torch.int64)  # the contract, whatever the engine's own types
MIN_SIDE, OPT_SIDE, MAX_SIDE = 32, 640, 1344  # px of the input (the graph pads to size_divisor itself)
MAX_BATCH = 8  # the profile's largest batch: device memory is reserved for the largest shape when loaded


def tensorrt_unavailable() -> str:
    """Why this machine cannot build or run an engine ('' when it can): no CUDA GPU, no ``tensorrt`` package, or a
    TensorRT without the FP16 builder flag (TensorRT 11 removed weakly typed precision flags)."""
    cuda = torch.cuda.is_available()
    has = ["a CUDA GPU" if cuda else "no CUDA GPU (torch.cuda.is_available() is False)"]
    if importlib.util.find_spec("tensorrt") is None:
        has.append("no tensorrt package")
    elif not cuda:  # importing tensorrt loads its CUDA libraries: only tried where a GPU is
        has.append("a tensorrt package")
    else:
        try:
            import tensorrt as trt  # optional dependency (pip install "detkit[tensorrt]")
        except (ImportError, OSError) as err:
            has.append(f"a tensorrt package that does not import ({err})")
        else:
            if all(hasattr(trt.BuilderFlag, flag) for flag in ("FP16", "OBEY_PRECISION_CONSTRAINTS")):
                return ""
            has.append(f"tensorrt {trt.__version__}, without BuilderFlag.FP16 (removed in TensorRT 11)")
    return (f"--format tensorrt needs a CUDA GPU and TensorRT 10 (pip install \"tensorrt>=10,<11\", or "
            f"pip install \"detkit[tensorrt]\"); this machine has: {', '.join(has)}")


def error_log() -> Any:
    """A ``tensorrt.ILogger`` that keeps TensorRT's errors (``.errors``) for the one-line message and drops the rest
    (the parity check, not TensorRT's warnings, says whether the engine is right)."""
    import tensorrt as trt  # optional dependency (pip install "detkit[tensorrt]")

    class ErrorLog(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(msg)

    return ErrorLog()


def keep_float_layers_fp32(network: Any) -> None:
    """Constrain every layer that reads or writes floats to fp32, except convolutions, activations and pooling (and
    constants: the weights are what they are): the fp16 part is the network's arithmetic, not its box geometry."""
    import tensorrt as trt  # optional dependency (pip install "detkit[tensorrt]")

    fp16_ok = {trt.LayerType.CONVOLUTION, trt.LayerType.DECONVOLUTION, trt.LayerType.ACTIVATION,
               trt.LayerType.POOLING, trt.LayerType.CONSTANT}
    floats = {trt.float32, trt.float16}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in fp16_ok:
            continue
        ins = [layer.get_input(j) for j in range(layer.num_inputs)]
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if any(t is not None and t.dtype in floats for t in ins + outs):
            layer.precision = trt.float32
            for j, tensor in enumerate(outs):
                if tensor.dtype in floats:
                    layer.set_output_type(j, trt.float32)


def onnx_to_tensorrt(onnx_path: Path, path: Path) -> Path:
    """Parse ``onnx_path`` with TensorRT's ONNX parser, build an fp16 engine (:func:`keep_float_layers_fp32`) with
    one optimization profile for both inputs, and write it to ``path`` (the export's temporary file)."""
    import tensorrt as trt  # optional dependency (pip install "detkit[tensorrt]")

    log = error_log()
    builder = trt.Builder(log)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        raise RuntimeError("TensorRT's ONNX parser: " + "; ".join(str(parser.get_error(i))
                                                                  for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)  # fail the build rather than ignore the fp32 ones
    keep_float_layers_fp32(network)
    profile = builder.create_optimization_profile()
    profile.set_shape("images", (1, 3, MIN_SIDE, MIN_SIDE), (1, 3, OPT_SIDE, OPT_SIDE),
                      (MAX_BATCH, 3, MAX_SIDE, MAX_SIDE))
    profile.set_shape("image_sizes", (1, 2), (1, 2), (MAX_BATCH, 2))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT could not build the engine: {'; '.join(log.errors) or 'no reason given'}")
    Path(path).write_bytes(memoryview(engine))
    return Path(path)


class TensorRTRunner:
    """A deserialized engine as ``run(images uint8 (B, 3, H, W), image_sizes (B, 2)) -> (boxes (B, M, 4), scores
    (B, M), labels (B, M))``: inputs copied to the current CUDA device, bound by name, run by ``execute_async_v3`` on
    the current stream, in chunks of at most :data:`MAX_BATCH` images; outputs on the inputs' device."""

    def __init__(self, path: Path) -> None:
        import tensorrt as trt  # optional dependency (pip install "detkit[tensorrt]")

        self.log = error_log()  # held: TensorRT keeps using the logger, the runtime and the engine
        self.runtime = trt.Runtime(self.log)
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {path}: {'; '.join(self.log.errors) or 'no reason given'}")
        self.context = self.engine.create_execution_context()
        torch_dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                        trt.int64: torch.int64, trt.uint8: torch.uint8, trt.bool: torch.bool}
        self.dtypes = {name: torch_dtypes[self.engine.get_tensor_dtype(name)] for name in INPUTS + OUTPUTS}
        self.device = torch.device("cuda", torch.cuda.current_device())

    def __call__(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h, w = images.shape[-2:]
        if not (MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE):
            raise ConfigError(f"--format tensorrt: the engine takes images of {MIN_SIDE} to {MAX_SIDE} px a side "
                              f"(its optimization profile), got {h}x{w}")
        chunks = [self.run_chunk(images[i:i + MAX_BATCH], image_sizes[i:i + MAX_BATCH])
                  for i in range(0, len(images), MAX_BATCH)]
        return tuple(torch.cat(parts).to(images.device, dtype)  # type: ignore[return-value]
                     for parts, dtype in zip(zip(*chunks), OUTPUT_DTYPES))

    def run_chunk(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        """At most :data:`MAX_BATCH` images through the engine; outputs on the GPU in the engine's types."""
        inputs = {"images": images, "image_sizes": image_sizes}
        stream = torch.cuda.current_stream(self.device)
        bound = []  # referenced until enqueued; freed memory is reused only by later work on the same stream
        for name in INPUTS:
            tensor = inputs[name].to(self.device, self.dtypes[name]).contiguous()
            bound.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in OUTPUTS:
            tensor = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name],
                                 device=self.device)
            outputs.append(tensor)
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT could not run the engine: {'; '.join(self.log.errors) or 'no reason given'}")
        return tuple(outputs)


def load_tensorrt(path: Path) -> TensorRTRunner:
    """The engine at ``path`` on the current CUDA device, as a :data:`~detkit.deploy.parity.Runner`."""
    return TensorRTRunner(path)
