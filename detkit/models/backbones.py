"""Backbones returning multi-scale feature maps (torchvision ResNets)."""

from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn
from torchvision import models
from torchvision.ops import FrozenBatchNorm2d

from detkit.models.weights import PREFIX, resolve_weights
from detkit.registry import BACKBONES, ConfigError

NORMS = ("BN", "SyncBN", "GN", "FrozenBN")


def norm_layer(norm: str, groups: int = 32) -> Callable[[int], nn.Module]:
    """A ``channels -> module`` factory for ``BN`` / ``SyncBN`` / ``GN`` / ``FrozenBN``."""
    if norm in ("BN", "SyncBN"):  # SyncBN: converted by the trainer under DDP
        return nn.BatchNorm2d
    if norm == "GN":
        return lambda channels: nn.GroupNorm(min(groups, channels), channels)
    if norm == "FrozenBN":
        return FrozenBatchNorm2d
    raise ConfigError(f"norm must be one of {NORMS}, got {norm!r}")


def load_backbone_weights(module: nn.Module, spec: str | None, depth: int) -> None:
    """``init_weights``: a torchvision weights name (``torchvision:ResNet50_Weights.IMAGENET1K_V2``,
    ``torchvision:DEFAULT``) or a local torchvision ResNet state dict; mismatches are named errors."""
    key = "model.backbone.init_weights"
    if spec is None:
        return
    if not isinstance(spec, str) or spec in ("", PREFIX):
        hint = (" (YAML reads an unquoted 'torchvision: ...' as a mapping: write the name without a space after "
                "the colon, or quote it)" if isinstance(spec, dict) else "")
        raise ConfigError(f"{key} must be null, '{PREFIX}ResNet{depth}_Weights.<NAME>', '{PREFIX}DEFAULT' or the path "
                          f"of a state dict file, got {spec!r}{hint}")
    if spec.startswith(PREFIX):
        expected = f"ResNet{depth}_Weights"
        given = spec[len(PREFIX):].split(".", 1)[0]
        if given not in ("DEFAULT", expected):
            raise ConfigError(f"{key}: {spec} are weights for another network than this ResNet-{depth}; use "
                              f"{PREFIX}{expected}.<NAME> or {PREFIX}DEFAULT")
    state, source = resolve_weights(spec, key, model_name=f"resnet{depth}")
    own = module.state_dict()
    shapes = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state and not k.startswith("fc.") and "num_batches_tracked" not in k]
    if shapes or missing:
        raise ConfigError(f"{key}: {source} does not fit ResNet-{depth}: {len(missing)} weights missing "
                          f"{missing[:3]}, {len(shapes)} of another shape {shapes[:3]}")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


@BACKBONES.register()
class ResNet(nn.Module):
    """torchvision ResNet-18/34/50/101 returning C2..C5 feature maps.

    Args:
        depth: 18, 34, 50 or 101.
        out_indices: stages to return, 0 = C2 (stride 4) ... 3 = C5 (stride 32).
        norm: ``BN`` (trainable; right for training from scratch), ``GN``, ``SyncBN`` or ``FrozenBN``.
        frozen_stages: freeze the stem and the first ``k`` stages (-1: nothing frozen).
        norm_eval: keep BatchNorm layers in eval mode (running stats fixed) while training.
        init_weights: ``torchvision:ResNet50_Weights.IMAGENET1K_V2`` / ``torchvision:DEFAULT`` (torch.hub
            cache, downloaded once) or the local path of a torchvision ResNet state dict.
    Output: list of ``(B, C_i, H / s_i, W / s_i)``; ``out_channels`` lists ``C_i``.
    """

    def __init__(self, depth: int = 18, out_indices: Sequence[int] = (1, 2, 3), norm: str = "BN",
                 frozen_stages: int = -1, norm_eval: bool = False, init_weights: str | None = None) -> None:
        super().__init__()
        builders = {18: models.resnet18, 34: models.resnet34, 50: models.resnet50, 101: models.resnet101}
        if depth not in builders:
            raise ConfigError(f"ResNet depth must be one of {sorted(builders)}, got {depth}")
        net = builders[depth](weights=None, norm_layer=norm_layer(norm))
        load_backbone_weights(net, init_weights, depth)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        if not set(out_indices) <= {0, 1, 2, 3}:
            raise ConfigError(f"ResNet out_indices must be within 0..3 (C2..C5), got {list(out_indices)}")
        self.out_indices = tuple(out_indices)
        widths = [64, 128, 256, 512] if depth < 50 else [256, 512, 1024, 2048]
        self.out_channels = [widths[i] for i in self.out_indices]
        self.strides = [4 * 2 ** i for i in self.out_indices]
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._freeze()

    def _freeze(self) -> None:
        frozen = [self.stem, *self.stages[: max(self.frozen_stages, 0)]] if self.frozen_stages >= 0 else []
        for module in frozen:
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        self._freeze()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
            if i >= max(self.out_indices):
                break
        return outs

