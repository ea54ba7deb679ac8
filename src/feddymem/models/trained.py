"""A trained model from a run's checkpoint, for inference (``predict``, ``export``, ``report``, notebooks).

Needs nothing from the training code: the checkpoint holds the run's config, each client's kept state
(generator, radius, memory) and thresholds, and the global memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

from omegaconf import DictConfig, OmegaConf

from feddymem.config import TrainConfig
from feddymem.errors import CheckpointError
from feddymem.io import load_checkpoint
from feddymem.lightning_model import FedDyMemModule


@dataclass
class Trained:
    """A trained model in eval mode, the run's config and the decision threshold stored with it."""

    module: FedDyMemModule
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
        module = FedDyMemModule.from_config(config)
        module.set_global_memory(payload["global_memory"])
        return Trained(module.eval(), config, _threshold(payload, checkpoint))
    if client_id not in payload["clients"]:
        raise CheckpointError(f"{checkpoint} has no client {client_id}; it has {sorted(payload['clients'])}")
    saved = payload["clients"][client_id]
    if "module" in saved:  # the settings it was trained with, the method's own included
        module = FedDyMemModule(**saved["module"], log_prefix=f"client/{client_id}/", sync_metrics=False)
    else:  # checkpoints written before module settings were stored
        module = FedDyMemModule.from_config(config, client_id)
    module.load_trainable_state((saved.get("kept") or {}).get("model", saved["model"]))
    return Trained(module.eval(), config, _threshold(saved, checkpoint))


def _threshold(holder: dict, checkpoint: str | Path) -> float:
    if holder.get("threshold") is None:
        raise CheckpointError(f"{checkpoint} holds no threshold (written by an older FedDyMem?)")
    return float(holder["threshold"])
