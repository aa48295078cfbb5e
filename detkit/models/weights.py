"""Pretrained weights by name (``torchvision:ResNet50_Weights.IMAGENET1K_V2``) or local path.

Names resolve through torchvision's weights API; the file lives in torch.hub's cache,
``$TORCH_HOME/hub/checkpoints/<file name of the weights URL>``. A cached file is read from there
(weights-only); otherwise it is downloaded once. Offline and not cached, the error names the
config key, the URL and the exact path to put the file at.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torchvision.models import WeightsEnum, get_model_weights

from detkit.registry import ConfigError

PREFIX = "torchvision:"


def weights_enum(name: str, key: str, model_name: str | None = None) -> Any:
    """``ResNet50_Weights.IMAGENET1K_V2`` (or ``DEFAULT`` for ``model_name``) -> the torchvision enum value."""
    if name in ("DEFAULT", "") or "." not in name:
        if model_name is None:
            raise ConfigError(f"{key}: '{PREFIX}{name}' needs a full weights name, e.g. "
                              f"'{PREFIX}FCOS_ResNet50_FPN_Weights.COCO_V1'")
        enum: type[WeightsEnum] | None = get_model_weights(model_name)
        member = name or "DEFAULT"
    else:
        enum_name, member = name.split(".", 1)
        enum = getattr(torchvision.models, enum_name, None) or getattr(torchvision.models.detection, enum_name, None)
        if enum is None:
            raise ConfigError(f"{key}: torchvision has no weights '{enum_name}' (e.g. ResNet50_Weights, "
                              f"FCOS_ResNet50_FPN_Weights)")
    if not (isinstance(enum, type) and issubclass(enum, WeightsEnum)):
        raise ConfigError(f"{key}: '{name}' is not a torchvision weights name (e.g. ResNet50_Weights.IMAGENET1K_V2)")
    try:
        return enum[member]
    except KeyError:
        raise ConfigError(f"{key}: {enum.__name__} has no '{member}'; it has "
                          f"{', '.join(dict.fromkeys([*enum.__members__, 'DEFAULT']))}") from None  # DEFAULT: an alias


def cached_file(url: str) -> Path:
    """Where torch.hub keeps the file of ``url``: ``<hub dir>/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def download_state_dict(weights: Any, key: str) -> dict[str, torch.Tensor]:
    """The state dict of a torchvision weights enum value, from the hub cache or downloaded once."""
    url, file = weights.url, cached_file(weights.url)
    if not file.is_file():
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(file), progress=True)  # a temp file, then moved in place
        except Exception as err:  # offline, proxy, disk: one message with the way out
            raise ConfigError(f"{key}: cannot download {url} ({type(err).__name__}: {err}). Without a connection, put "
                              f"that file at {file} (set TORCH_HOME to use another cache folder)") from None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"{key}: {file} (the cached {url}) cannot be read ({type(err).__name__}); delete it to "
                          f"download it again") from None


def load_weights_file(path: str | os.PathLike, key: str) -> dict[str, torch.Tensor]:
    """A local state dict (or a dict holding one under ``model`` / ``state_dict``), read weights-only."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{key}: file not found: {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"{key}: {file} is not a readable weights-only state dict ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]})") from None
    if isinstance(state, dict):
        state = state.get("model", state.get("state_dict", state))
    if not isinstance(state, dict):
        raise ConfigError(f"{key}: {file} holds a {type(state).__name__}, not a state dict")
    return state


def resolve_weights(spec: str, key: str, model_name: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """``torchvision:<Weights>.<NAME>`` / ``torchvision:DEFAULT`` or a local path -> (state dict, what it was)."""
    if spec.startswith(PREFIX):
        weights = weights_enum(spec[len(PREFIX):], key, model_name)
        return download_state_dict(weights, key), f"{type(weights).__name__}.{weights.name}"
    return load_weights_file(spec, key), str(spec)
