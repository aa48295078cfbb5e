"""Mixed precision of ``train.amp``: which dtype a device runs, and the autocast context for it."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16 support, or a CPU with AVX512-BF16
    or AMX (elsewhere oneDNN emulates bf16 and autocast would be slower than fp32)."""
    if device.type == "cuda":  # not emulated bf16 (pre-Ampere GPUs): that is slower than fp32
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_amp(amp: str | None, device: torch.device) -> str | None:
    """``train.amp`` for ``device``: ``auto`` becomes ``bf16`` where :func:`native_bf16`, else None (fp32)."""
    if amp == "auto":
        return "bf16" if native_bf16(device) else None
    return amp


def autocast(device: torch.device, amp: str | None) -> Any:
    """The autocast context of ``train.amp`` (None | bf16 | fp16 | auto, see :func:`resolve_amp`) on ``device``."""
    amp = resolve_amp(amp, device)
    if amp is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
