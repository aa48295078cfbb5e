"""Weights of other libraries' detectors as detkit state dicts (used by ``load_from: torchvision:...``)."""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch
from torch import Tensor
from torchvision.models.detection.fcos import _COCO_CATEGORIES

#: torchvision ``fcos_resnet50_fpn`` key -> detkit FCOS key (tower index N is Conv/GN/ReLU on both sides).
TORCHVISION_FCOS_KEYS = [
    (r"^backbone\.body\.conv1\.", "backbone.stem.0."),
    (r"^backbone\.body\.bn1\.", "backbone.stem.1."),
    (r"^backbone\.body\.layer([1-4])\.", lambda m: f"backbone.stages.{int(m.group(1)) - 1}."),
    (r"^backbone\.fpn\.", "neck.fpn."),
    (r"^head\.classification_head\.conv\.", "head.cls_tower."),
    (r"^head\.classification_head\.cls_logits\.", "head.cls_out."),
    (r"^head\.regression_head\.conv\.", "head.reg_tower."),
    (r"^head\.regression_head\.bbox_reg\.", "head.reg_out."),
    (r"^head\.regression_head\.bbox_ctrness\.", "head.ctr_out."),
]


def coco80_rows() -> list[int]:
    """The rows of torchvision's 91 COCO outputs (index = COCO category id) that are the 80 real classes,
    in detkit's contiguous label order (sorted category ids)."""
    return [i for i, name in enumerate(_COCO_CATEGORIES) if name not in ("__background__", "N/A")]


def rename(state: Mapping[str, Tensor], rules: list) -> dict[str, Tensor]:
    """Apply the first matching ``(pattern, replacement)`` of ``rules`` to every key; unmatched keys are kept."""
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            new, hits = re.subn(pattern, repl, key)
            if hits:
                key = new
                break
        out[key] = value
    return out


def convert_torchvision_fcos(state: Mapping[str, Tensor], num_classes: int | None = None,
                             num_levels: int = 5) -> dict[str, Tensor]:
    """torchvision ``FCOS`` (ResNet-FPN) -> detkit ``FCOS``; exact at inference with the head options
    ``conv_bias: true, point_offset: 0.0, stride_from_input: true`` (see configs/fcos/fcos_r50_fpn_finetune_bccd.yaml).

    ``head.scales.*`` (torchvision has none) are set to 1. With ``num_classes == 80`` the 91-way COCO
    classifier keeps the 80 real classes in sorted-id order (detkit's ``CocoDataset`` labels).
    """
    out = rename(state, TORCHVISION_FCOS_KEYS)
    for i in range(num_levels):
        out[f"head.scales.{i}.scale"] = torch.tensor(1.0)
    if num_classes == 80 and out["head.cls_out.bias"].shape[0] == 91:
        rows = torch.tensor(coco80_rows())
        for name in ("weight", "bias"):
            out[f"head.cls_out.{name}"] = out[f"head.cls_out.{name}"][rows]
    return out


#: torchvision weights enum name -> converter ``(state, num_classes) -> detkit state``.
CONVERTERS: dict[str, Callable[..., dict[str, Tensor]]] = {
    "FCOS_ResNet50_FPN_Weights": convert_torchvision_fcos,
}
