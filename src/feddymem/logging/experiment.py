"""Experiment loggers for the orchestrator: CSV (always available) and Weights & Biases.

W&B runs offline by default and online when the user is logged in (``WANDB_API_KEY`` or a
``~/.netrc`` entry) or sets ``WANDB_MODE=online``; offline runs sync later with ``wandb sync``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.loggers import CSVLogger


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path("~/.netrc").expanduser()
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if logged_in else "offline"


def make_loggers(kind: str, run_dir: Path, run_name: str, config: dict[str, Any], project: str = "feddymem") -> list:
    """Loggers for ``logger=csv|wandb|none``; ``wandb`` also keeps the CSV log."""
    if kind == "none":
        return []
    loggers: list = [CSVLogger(str(run_dir), name="logs", version="")]
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        mode = wandb_mode()
        loggers.append(
            WandbLogger(
                project=project,
                name=run_name,
                save_dir=str(run_dir),
                offline=mode == "offline",
                mode=mode,
                config=config,
                log_model=False,
            )
        )
    return loggers


def find_wandb(loggers: list):
    return next((lg for lg in loggers if type(lg).__name__ == "WandbLogger"), None)


def heatmap_panel(
    image: torch.Tensor,
    anomaly_map: torch.Tensor,
    mask: torch.Tensor | None,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    vmax: float,
) -> np.ndarray:
    """One uint8 strip: the input, the anomaly map over it (jet, 50 %), and the ground-truth mask."""
    from matplotlib import colormaps

    img = (image.cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).clamp(0, 1)
    img = img.permute(1, 2, 0).numpy()
    heat = colormaps["jet"](np.clip(anomaly_map.cpu().numpy() / max(vmax, 1e-12), 0, 1))[..., :3]
    overlay = 0.5 * img + 0.5 * heat
    gt = np.repeat((mask.cpu().numpy() if mask is not None else np.zeros(img.shape[:2]))[..., None], 3, axis=2)
    gap = np.ones((img.shape[0], 4, 3))
    return (np.concatenate([img, gap, overlay, gap, gt], axis=1) * 255).astype(np.uint8)
