"""``feddymem report runs/<name>``: PNG plots of a run from its metrics, scores and last checkpoint.

Writes into ``runs/<name>/report/``: ``auroc_per_round.png`` (image AUROC per round per client),
``bytes_per_round.png`` (upload and download), ``roc_curves.png`` (final round, per client) and
``anomaly_maps.png`` (a grid of test images: input | heatmap overlay | mask, from the last checkpoint).
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.metrics import roc_curve

from feddymem.errors import FedDyMemError
from feddymem.io import claim_output_dir, read_json, save_figure
from feddymem.metrics.auroc import auroc_score


def _read_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise FedDyMemError(f"no metrics.json in {run_dir}: is it a FedDyMem run folder?")
    return read_json(path, "the run's metrics")


def plot_auroc(metrics: dict, out: Path) -> Path:
    """Image AUROC per round and client, as a PNG in ``out``."""
    rounds = [r["round"] for r in metrics["rounds"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    # Test-set AUROC exists for the rounds that scored the test set (federation.eval_every); the held-out
    # criterion (normal images and cut-paste anomalies only) exists for every round.
    for cid in metrics["rounds"][0]["clients"]:
        # Missing metrics are null in metrics.json: float arrays turn them into NaN.
        values = np.array([r["clients"][cid].get("image_auroc", np.nan) for r in metrics["rounds"]], dtype=float)
        if not np.all(np.isnan(values)):
            ax.plot(rounds, values, marker="o", label=f"client {cid}")
    means = np.array([r.get("mean_image_auroc", np.nan) for r in metrics["rounds"]], dtype=float)
    if not np.all(np.isnan(means)):
        ax.plot(rounds, means, "k--", lw=2, label="mean (test set)")
    criteria = np.array([r.get("mean_criterion", np.nan) for r in metrics["rounds"]], dtype=float)
    ax.plot(rounds, criteria, "k:", marker="s", lw=2, label="mean held-out criterion")
    final = metrics.get("final", {}).get("mean_image_auroc")
    if final is not None and final == final:
        ax.axhline(final, color="tab:red", lw=1, label=f"kept states, test set ({final:.3f})")
    ax.set(xlabel="round", ylabel="AUROC", title="Image AUROC per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "auroc_per_round.png")


def plot_bytes(metrics: dict, out: Path) -> Path:
    """Bytes up and down per round, as a PNG in ``out``."""
    rounds = np.array([r["round"] for r in metrics["rounds"]])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(rounds - 0.2, [r["bytes_up"] / 2**20 for r in metrics["rounds"]], 0.4, label="up (all clients)")
    ax.bar(rounds + 0.2, [r["bytes_down"] / 2**20 for r in metrics["rounds"]], 0.4, label="down (all clients)")
    ax.set(xlabel="round", ylabel="MB", title="Bytes per round (only memory crosses the network)")
    ax.legend()
    return _save(fig, out / "bytes_per_round.png")


def plot_roc(run_dir: Path, out: Path) -> Path | None:
    """ROC curves per client from ``scores.csv`` (``None`` without it, or when it holds no rows: over Flower
    only the sites that share their per-image scores have rows)."""
    path = run_dir / "scores.csv"
    if not path.is_file():
        return None
    rows = list(csv.DictReader(path.open()))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    for cid in sorted({r["client"] for r in rows}, key=int):
        labels = np.array([int(r["label"]) for r in rows if r["client"] == cid])
        scores = np.array([float(r["score"]) for r in rows if r["client"] == cid])
        if labels.min() == labels.max():
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"client {cid} (AUROC {auroc_score(scores, labels):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, final round")
    ax.legend(fontsize=8)
    return _save(fig, out / "roc_curves.png")


def plot_anomaly_maps(run_dir: Path, out: Path, client_id: int = 0, count: int = 8) -> Path | None:
    """Rebuild a client from the last checkpoint and draw its maps on test images (half normal, half not)."""
    from feddymem.data.check import plan_data
    from feddymem.data.datasets import ImageDataset
    from feddymem.logging.experiment import heatmap_panel
    from feddymem.trained import load_trained

    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt_path.is_file():
        return None
    trained = load_trained(ckpt_path, client_id)
    model, cfg = trained.model, trained.config
    test = plan_data(cfg).clients[client_id].test
    normal = [s for s in test if s.label == 0][: count // 2]
    anomalous = [s for s in test if s.label == 1][: count - len(normal)]
    extractor = model.feature_extractor
    ds = ImageDataset(normal + anomalous, cfg.data.image_size, cfg.data.crop_size, extractor.mean, extractor.std)
    items = [ds[i] for i in range(len(ds))]
    with torch.no_grad():
        maps, scores = model(torch.stack([it["image"] for it in items]))
    vmax = float(maps.max())
    fig, axes = plt.subplots(len(items), 1, figsize=(7, 2.4 * len(items)))
    for ax, item, amap, score in zip(np.atleast_1d(axes), items, maps, scores, strict=True):
        ax.imshow(
            heatmap_panel(
                item["image"], amap, item["mask"] if item["has_mask"] else None, extractor.mean, extractor.std, vmax
            )
        )
        kind = "anomalous" if item["label"] else "normal"
        ax.set_title(f"{kind}, score {float(score):.3f}: {Path(item['path']).name}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"client {client_id}: input | anomaly map | ground truth", fontsize=10)
    return _save(fig, out / "anomaly_maps.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return save_figure(fig, path)


def write_report(run_dir: str | Path, client_id: int = 0) -> list[Path]:
    """Draw every plot for ``run_dir``; returns the PNG paths."""
    run_dir = Path(run_dir)
    metrics = _read_metrics(run_dir)
    out = claim_output_dir(run_dir / "report", "report folder")
    paths = [
        plot_auroc(metrics, out),
        plot_bytes(metrics, out),
        plot_roc(run_dir, out),
        plot_anomaly_maps(run_dir, out, client_id),
    ]
    return [p for p in paths if p is not None]
