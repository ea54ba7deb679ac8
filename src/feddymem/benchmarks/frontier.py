"""The privacy–accuracy frontier of a privacy study's results: every upload setting's image AUROC beside the
membership AUC of the attack on it, per data set, as a table and a plot, and the knee — the most accurate
setting whose membership AUC stays at or under a limit on every data set (``privacy.profile=strict``).

``feddymem bench frontier --results benchmarks/privacy/frontier/results.json``
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FrontierPoint:
    """One upload setting on one data set: what it costs in accuracy, what it leaks."""

    dataset: str
    method: str
    overrides: str
    image_auroc: float
    membership_auc: float
    items: int | None
    patches_per_item: float | None
    bytes_up: float | None


def frontier_points(results: dict[str, Any]) -> list[FrontierPoint]:
    """The (run, attack) pairs of ``results`` (a ``results.json`` of ``suite``) that have both numbers."""
    runs = {(r["dataset"], r["method"]): r for r in results["runs"]}
    privacy = results.get("privacy") or {}
    points = []
    for dataset, report in privacy.items() if isinstance(privacy, dict) else []:
        for row in report.get("rows", []):
            run = runs.get((dataset, row["upload"]))
            if run is None or row.get("membership_auc") is None:
                continue
            points.append(
                FrontierPoint(
                    dataset,
                    row["upload"],
                    " ".join(run.get("overrides") or []) or "(defaults)",
                    float(run["mean_image_auroc"]),
                    float(row["membership_auc"]),
                    row.get("items"),
                    row.get("patches_per_item"),
                    run.get("bytes_up_per_client_round"),
                )
            )
    return points


def knee(points: list[FrontierPoint], limit: float = 0.70) -> str | None:
    """The setting with membership AUC ≤ ``limit`` on every data set it ran on that has the highest image
    AUROC averaged over the data sets; None when no setting stays under the limit everywhere."""
    datasets = {p.dataset for p in points}
    by_method: dict[str, list[FrontierPoint]] = {}
    for p in points:
        by_method.setdefault(p.method, []).append(p)
    safe = {
        m: float(np.mean([p.image_auroc for p in ps]))
        for m, ps in by_method.items()
        if {p.dataset for p in ps} == datasets and all(p.membership_auc <= limit for p in ps)
    }
    return max(safe, key=lambda m: safe[m]) if safe else None


def frontier_table(points: list[FrontierPoint], limit: float = 0.70) -> str:
    """Markdown: one table per data set, rows by membership AUC; the knee named under them."""
    lines = []
    for dataset in sorted({p.dataset for p in points}):
        lines += [
            f"### {dataset}",
            "",
            "| setting | overrides | image AUROC | membership AUC | items uploaded | patches / item | up / round |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in sorted((p for p in points if p.dataset == dataset), key=lambda p: -p.membership_auc):
            mark = "" if p.membership_auc <= limit else " ✗"
            up = f"{p.bytes_up / 2**20:.2f} MB" if p.bytes_up else "–"
            per_item = f"{p.patches_per_item:.1f}" if p.patches_per_item else "–"
            lines.append(
                f"| {p.method} | `{p.overrides}` | {p.image_auroc:.4f} | {p.membership_auc:.3f}{mark} | "
                f"{p.items or '–'} | {per_item} | {up} |"
            )
        lines.append("")
    chosen = knee(points, limit)
    lines.append(
        f"Knee (membership AUC ≤ {limit:.2f} on every set, highest mean image AUROC): "
        + (f"**{chosen}**." if chosen else "none of these settings.")
    )
    return "\n".join(lines) + "\n"


def plot_frontier(points: list[FrontierPoint], path: Path, limit: float = 0.70) -> Path:
    """Image AUROC against membership AUC, one panel per data set, every setting labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({p.dataset for p in points})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        mine = [p for p in points if p.dataset == dataset]
        ax.scatter([p.membership_auc for p in mine], [p.image_auroc for p in mine], color="tab:blue")
        for p in mine:
            ax.annotate(
                p.method, (p.membership_auc, p.image_auroc), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.axvline(limit, color="tab:red", linestyle="--", linewidth=1, label=f"membership AUC {limit:.2f}")
        ax.set(title=dataset, xlabel="membership AUC (0.5 = nothing leaks)", ylabel="mean image AUROC")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
