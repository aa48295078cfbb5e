"""Inference-only folding of BatchNorm into the convolution before it (``torch.nn.utils.fusion``)."""

from __future__ import annotations

from typing import cast

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.ops import FrozenBatchNorm2d

FOLDABLE_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _foldable(conv: object, norm: object) -> bool:
    return isinstance(conv, nn.Conv2d) and isinstance(norm, FOLDABLE_NORMS)


def _fused(conv: object, norm: object) -> nn.Conv2d:
    """``conv`` with ``norm`` folded in, for a :func:`_foldable` pair."""
    # FrozenBatchNorm2d has the statistics fuse_conv_bn_eval reads but is no _BatchNorm
    return fuse_conv_bn_eval(cast(nn.Conv2d, conv), cast(_BatchNorm, norm))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every ``Conv2d -> BatchNorm2d`` pair of an eval-mode ``model`` in place and return it.

    Pairs are consecutive entries of an ``nn.Sequential`` (ResNet stems, ``downsample``) and the
    ``convN`` / ``bnN`` attributes of torchvision's ResNet blocks; each conv takes the norm's scale and
    shift (``w * gamma / sigma``, ``(b - mean) * gamma / sigma + beta``) and the norm becomes
    ``Identity``. Outputs are unchanged up to float rounding; GroupNorm (it depends on the input) is
    left alone. The model can no longer be trained or loaded from a checkpoint: inference only.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model (BatchNorm running statistics)")
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if _foldable(module[i], module[i + 1]):
                    module[i], module[i + 1] = _fused(module[i], module[i + 1]), nn.Identity()
        for k in (1, 2, 3):
            conv, norm = getattr(module, f"conv{k}", None), getattr(module, f"bn{k}", None)
            if _foldable(conv, norm):
                setattr(module, f"conv{k}", _fused(conv, norm))
                setattr(module, f"bn{k}", nn.Identity())
    return model
