"""Experiment loggers for the orchestrator: CSV (always available) and Weights & Biases.

W&B runs offline by default and online when the user is logged in (``WANDB_API_KEY`` or a
``~/.netrc`` entry) or sets ``WANDB_MODE=online``; offline runs sync later with ``wandb sync``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.loggers import Logger
from lightning.fabric.utilities.rank_zero import rank_zero_only

from feddymem.io import atomic_write_text


class RoundCSVLogger(Logger):
    """``logs/metrics.csv``: one row per logged step, columns the union of every key logged so far.

    Resume-safe, unlike Lightning's CSV logger (which deletes an existing file): rows already in the file
    are kept, except those at or after the first step this logger writes, which a resumed run repeats.
    The file is small (one row per round) and rewritten atomically at every step, so it is never torn.
    """

    def __init__(self, root_dir: str | Path, name: str = "logs") -> None:
        super().__init__()
        self.path = Path(root_dir) / name / "metrics.csv"
        self._rows: list[dict[str, Any]] | None = None  # read from the file at the first step

    @property
    def name(self) -> str:
        """The logger's name: the run's folder name."""
        return "csv"

    @property
    def version(self) -> str:
        """The CSV logger has one version per run folder."""
        return ""

    @property
    def root_dir(self) -> str:
        """Where ``logs/metrics.csv`` is written."""
        return str(self.path.parent.parent)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The run folder's config.yaml holds them; nothing to add to the metrics file."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Keep the round's metrics; the file is rewritten with every round once."""
        if self._rows is None:
            old = list(csv.DictReader(io.StringIO(self.path.read_text()))) if self.path.is_file() else []
            first = step if step is not None else len(old)
            self._rows = [row for row in old if row.get("step", "") != "" and int(row["step"]) < first]
        step = len(self._rows) if step is None else step
        values = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        if self._rows and self._rows[-1]["step"] == step:  # more of the same round (its final metrics): one row
            self._rows[-1].update(values)
        else:
            self._rows.append({**values, "step": step})
        columns = [*sorted({key for row in self._rows for key in row} - {"step"}), "step"]
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=columns, restval="")
        writer.writeheader()
        for row in self._rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
        atomic_write_text(self.path, table.getvalue())


def wandb_mode(configured: str = "offline") -> str:
    """``WANDB_MODE`` if set, else the config's ``wandb_mode``: uploads happen only when asked for, never
    because the machine happens to be logged in."""
    return os.environ.get("WANDB_MODE") or configured


@dataclass(frozen=True)
class WandbSettings:
    """Where a run's W&B run goes: the project, the experiment (``group``) and this process's role."""

    project: str = "feddymem"
    mode: str = "offline"  # offline | online | disabled (WANDB_MODE overrides)
    group: str = ""  # the experiment: the run folder's name, so a resumed run and every role share it
    job_type: str = "server"  # server | site


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of the run in ``run_dir``: made once and kept in ``logs/wandb_run_id``, so that a
    resumed run continues the same W&B run."""
    path = run_dir / "logs" / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(path, run_id + "\n")
    return run_id


def make_loggers(
    kind: str, run_dir: Path, run_name: str, config: dict[str, Any], wandb: WandbSettings | None = None
) -> list:
    """Loggers for ``logger=csv|wandb|tensorboard|mlflow|none``; each keeps the CSV log too (``logs/``)."""
    if kind == "none":
        return []
    loggers: list = [RoundCSVLogger(run_dir)]
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        w = wandb or WandbSettings()
        mode = wandb_mode(w.mode)
        loggers.append(
            WandbLogger(
                project=w.project,
                name=run_name,
                save_dir=str(run_dir),
                offline=mode == "offline",
                mode=mode,
                config=config,
                log_model=False,
                id=wandb_run_id(run_dir),
                resume="allow",
                group=w.group or run_name,
                job_type=w.job_type,
            )
        )
    elif kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    elif kind == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        # A file store in the run folder: no server, nothing to install beyond the client. MLflow 3 keeps it
        # behind this switch (a database backend is its new default).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        loggers.append(
            MLFlowLogger(
                experiment_name=(wandb or WandbSettings()).project,
                run_name=run_name,
                tracking_uri=(run_dir / "mlruns").resolve().as_uri(),
            )
        )
    return loggers


def find_wandb(loggers: list):
    """The W&B logger among ``loggers``, or ``None``."""
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
    pixels = img.permute(1, 2, 0).numpy()
    heat = colormaps["jet"](np.clip(anomaly_map.cpu().numpy() / max(vmax, 1e-12), 0, 1))[..., :3]
    overlay = 0.5 * pixels + 0.5 * heat
    gt = np.repeat((mask.cpu().numpy() if mask is not None else np.zeros(pixels.shape[:2]))[..., None], 3, axis=2)
    gap = np.ones((pixels.shape[0], 4, 3))
    return (np.concatenate([pixels, gap, overlay, gap, gt], axis=1) * 255).astype(np.uint8)
