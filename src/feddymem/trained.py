"""A trained model from a run's checkpoint, for inference (``predict``, ``export``, ``report``, notebooks).

Needs nothing from the training code, Lightning included: the checkpoint holds the run's config, each
client's model settings and kept state (generator, radius, memory) and thresholds, and the global memory;
this rebuilds the pure-torch :class:`~feddymem.models.torch_model.FedDyMemModel`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from feddymem.config import TrainConfig
from feddymem.config.settings import model_settings
from feddymem.errors import CheckpointError
from feddymem.io import load_checkpoint
from feddymem.models.settings import ModelSettings
from feddymem.models.torch_model import FedDyMemModel


@dataclass
class Trained:
    """A trained model in eval mode, the run's config and the decision threshold stored with it."""

    model: FedDyMemModel
    config: DictConfig
    threshold: float


def load_trained(checkpoint: str | Path, client_id: int | None = 0) -> Trained:
    """Client ``client_id``'s kept state (``selection.keep=best``: the round best by its held-out criterion,
    else the last) and threshold; ``None``: the global model (the global memory with the untrained
    identity generator) and the global threshold."""
    payload = load_checkpoint(checkpoint)
    config = cast(DictConfig, OmegaConf.merge(OmegaConf.structured(TrainConfig), payload["config"]))
    if client_id is None:
        if payload.get("global_memory") is None:
            raise CheckpointError(
                f"{checkpoint} has no global memory (method={config.method.value} shares none): "
                "use a client's model (--client K) instead"
            )
        model = FedDyMemModel(model_settings(config))
        model.set_memory(payload["global_memory"])
        return Trained(model.eval(), config, _threshold(payload, checkpoint))
    if client_id not in payload["clients"]:
        raise CheckpointError(f"{checkpoint} has no client {client_id}; it has {sorted(payload['clients'])}")
    saved = payload["clients"][client_id]
    model = FedDyMemModel(_saved_settings(saved.get("module"), config))
    state = (saved.get("kept") or {}).get("model", saved["model"])
    try:
        model.load_trainable_state(state)
    except ValueError as err:
        raise CheckpointError(f"{checkpoint}, client {client_id}: {err}") from None
    return Trained(model.eval(), config, _threshold(saved, checkpoint))


def _saved_settings(module: dict[str, Any] | None, config: DictConfig) -> ModelSettings:
    """The model settings a client was trained with (the method's own included): its module's hparams,
    nested (``model``) or flat (checkpoints of 0.x); the run's config where none were stored."""
    if module is None:
        return model_settings(config)
    if isinstance(module.get("model"), dict):
        return ModelSettings(**module["model"])
    names = {f.name for f in fields(ModelSettings)}
    return ModelSettings(**{k: v for k, v in module.items() if k in names})


def _threshold(holder: dict, checkpoint: str | Path) -> float:
    if holder.get("threshold") is None:
        raise CheckpointError(f"{checkpoint} holds no threshold (written by an older FedDyMem?)")
    return float(holder["threshold"])
