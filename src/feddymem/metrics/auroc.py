"""Exact AUROC on raw anomaly scores.

torchmetrics' ``BinaryAUROC`` treats scores outside [0, 1] as logits and applies a sigmoid, which
saturates for distance scores (every image would score 1.0). This metric keeps the raw scores and
ranks them exactly (ties count one half), as scikit-learn's ``roc_auc_score`` does, but by sorting the
two classes and counting with binary search: about 8× faster on the tens of millions of pixels of a
pixel AUROC.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def auroc_score(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact AUROC = P(score of an anomaly > score of a normal) + ½ P(equal); NaN with only one class."""
    scores, labels = np.asarray(scores).ravel(), np.asarray(labels).ravel().astype(bool)
    positives, negatives = np.sort(scores[labels]), np.sort(scores[~labels])
    if positives.size == 0 or negatives.size == 0:
        return float("nan")
    below = np.searchsorted(negatives, positives, side="left").sum(dtype=np.int64)
    not_above = np.searchsorted(negatives, positives, side="right").sum(dtype=np.int64)
    return float((below + 0.5 * (not_above - below)) / (positives.size * negatives.size))


class AUROC(Metric):
    """Exact AUROC of raw scores (no binning), for images or pixels."""

    scores: list[torch.Tensor]
    labels: list[torch.Tensor]

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """Add scores and their binary labels."""
        self.scores.append(scores.detach().flatten().float())
        self.labels.append(labels.detach().flatten().to(torch.uint8))

    def compute(self) -> torch.Tensor:
        """NaN when only one class is present."""
        labels = dim_zero_cat(self.labels).cpu().numpy()
        return torch.tensor(auroc_score(dim_zero_cat(self.scores).cpu().numpy(), labels))
