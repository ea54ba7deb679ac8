"""Exact AUROC on raw anomaly scores.

torchmetrics' ``BinaryAUROC`` treats scores outside [0, 1] as logits and applies a sigmoid, which
saturates for distance scores (every image would score 1.0). This metric keeps the raw scores and
ranks them exactly (ties averaged) with scikit-learn.
"""

from __future__ import annotations

import torch
from sklearn.metrics import roc_auc_score
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class AUROC(Metric):
    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        self.scores.append(scores.detach().flatten().float())
        self.labels.append(labels.detach().flatten().to(torch.uint8))

    def compute(self) -> torch.Tensor:
        """NaN when only one class is present."""
        labels = dim_zero_cat(self.labels).cpu().numpy()
        if labels.min() == labels.max():
            return torch.tensor(float("nan"))
        return torch.tensor(roc_auc_score(labels, dim_zero_cat(self.scores).cpu().double().numpy()))
