"""Necks: FPN with P6/P7 (on torchvision's FeaturePyramidNetwork) and CenterNet's up-sampling neck.

A neck is built with the backbone's ``in_channels`` and ``in_strides`` (its maps', finest first) and reports
``out_channels`` and ``strides``: the stride of each of its outputs, finest first, which the detector checks the
head's strides against (:func:`detkit.models.detector.check_head_levels`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detkit.models.backbones import norm_layer
from detkit.registry import NECKS, ConfigError, config_path


@NECKS.register()
class FPN(nn.Module):
    """Feature pyramid (a P level per backbone map: P3..P5 from C3..C5) plus ``extra_levels`` stride-2
    convs (P6, P7).

    A stride-4 P2 level for small objects comes from C2: the backbone's ``out_indices: [0, 1, 2, 3]``
    (the head's ``strides`` then start at 4; docs/architecture.md).

    Args:
        in_channels, in_strides: channels and strides of the backbone maps, finest first.
        out_channels: width of every output level.
        extra_levels: 0 or 2 (P6, P7 as in RetinaNet/FCOS).
        extra_on: ``p5`` (FCOS: extra convs on the P5 output) or ``c5`` (RetinaNet: on the C5 input).
    Output: list of ``(B, out_channels, H_l, W_l)``, finest first; ``strides``: ``in_strides``, then x2 per
    extra level.
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], out_channels: int = 256,
                 extra_levels: int = 2, extra_on: str = "p5") -> None:
        super().__init__()
        if extra_levels not in (0, 2):
            raise ConfigError(f"FPN extra_levels must be 0 or 2 (P6, P7), got {extra_levels}")
        if extra_on not in ("p5", "c5"):
            raise ConfigError(f"FPN extra_on must be 'p5' or 'c5', got {extra_on!r}")
        extra = None
        if extra_levels:
            extra = LastLevelP6P7(out_channels if extra_on == "p5" else in_channels[-1], out_channels)
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=extra)
        self.out_channels = out_channels
        self.strides = (*in_strides, *(in_strides[-1] * 2 ** i for i in range(1, extra_levels + 1)))

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())


@NECKS.register()
class CenterNetNeck(nn.Module):
    """Up-sampling neck to stride 4 from the coarsest backbone map (CenterNet ResNet variant).

    Each stage: 3x3 conv -> norm -> ReLU -> x2 up-sampling (4x4 deconv, or bilinear when
    ``use_deconv`` is false, cheaper on CPU) -> norm -> ReLU. With ``skip``, the backbone map of
    the same stride is added after each up-sampling through a 1x1 conv (better small objects).
    Output: ``[(B, channels[-1], H / s, W / s)]``, ``strides`` ``(s,)``: the coarsest backbone map's stride
    halved per stage (4 for a stride-32 map and three stages).
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int],
                 channels: Sequence[int] = (256, 128, 64), use_deconv: bool = True, skip: bool = False,
                 norm: str = "BN") -> None:
        super().__init__()
        coarsest, stages = in_strides[-1], len(channels)
        if coarsest % 2 ** stages:
            raise ConfigError(f"{config_path('channels')} has {stages} up-sampling stages: the coarsest backbone map "
                              f"(stride {coarsest}) would end at stride {coarsest / 2 ** stages}, not a whole pixel; "
                              f"give fewer stages or return a coarser map from the backbone")
        make_norm = norm_layer(norm)
        self.use_deconv = use_deconv
        self.stages = nn.ModuleList()
        self.laterals: nn.ModuleList | None = nn.ModuleList() if skip else None
        prev = in_channels[-1]
        if skip and len(in_channels) < len(channels) + 1:
            raise ConfigError(f"CenterNetNeck skip needs {len(channels) + 1} backbone maps, got {len(in_channels)}")
        for i, ch in enumerate(channels):
            up = (nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1, bias=False) if use_deconv
                  else nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.stages.append(nn.Sequential(nn.Conv2d(prev, ch, 3, padding=1, bias=False), make_norm(ch),
                                             nn.ReLU(inplace=True), up, make_norm(ch), nn.ReLU(inplace=True)))
            if self.laterals is not None:
                self.laterals.append(nn.Conv2d(in_channels[-2 - i], ch, 1))
            prev = ch
        self.out_channels = prev
        self.strides = (coarsest // 2 ** stages,)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        x = feats[-1]
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if self.laterals is not None:
                lateral = self.laterals[i](feats[-2 - i])
                # always interpolate (identity when sizes match): a Python shape test would be frozen
                # into a trace / export and break inputs whose size is not a multiple of 32
                x = x + F.interpolate(lateral, size=x.shape[-2:], mode="nearest")
        return [x]
