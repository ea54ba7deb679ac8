"""One test set's metrics from scores and maps: image AUROC, and pixel AUROC and AUPRO where masks exist.

Every model measured by the project goes through this: the FedDyMem module's ``test_step`` and the
benchmarks' reference models (anomalib's PatchCore), so one implementation measures every row.
"""

from __future__ import annotations

import torch
from torch import nn

from feddymem.metrics.aupro import AUPRO
from feddymem.metrics.auroc import AUROC


class AnomalyMetrics(nn.Module):
    """Accumulates image scores, anomaly maps and masks batch by batch; ``compute`` gives the metrics and resets.

    ``metric_kwargs`` go to each torchmetrics metric (``sync_on_compute=False`` for a federated client that
    must not merge its metrics with other processes' clients).
    """

    def __init__(self, **metric_kwargs) -> None:
        super().__init__()
        self.image_auroc = AUROC(**metric_kwargs)
        self.pixel_auroc = AUROC(**metric_kwargs)
        self.aupro = AUPRO(**metric_kwargs)
        self.has_masks = False

    def update(
        self,
        scores: torch.Tensor,
        maps: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor,
        has_mask: torch.Tensor | None = None,
    ) -> None:
        """Scores (B,), maps and masks (B, H, W), labels (B,) (1 = anomalous); ``has_mask`` (B,): whether an
        anomalous image's mask is known (default: a non-empty mask)."""
        labels = torch.as_tensor(labels, device=scores.device).long()
        self.image_auroc.update(scores, labels)
        masks = masks.to(maps.device)
        known_mask = masks.flatten(1).any(1) if has_mask is None else torch.as_tensor(has_mask, device=maps.device)
        # Pixel metrics only where the truth is known: normal images, and anomalous ones with a mask.
        known = (labels.to(maps.device) == 0) | known_mask
        if masks[known].any():
            self.has_masks = True
        if known.any():
            self.pixel_auroc.update(maps[known], masks[known])
            self.aupro.update(maps[known], masks[known])

    def compute(self) -> dict[str, float]:
        """Image AUROC, and pixel AUROC and AUPRO when the test set has masks; resets the state."""
        results = {"image_auroc": float(self.image_auroc.compute())}
        if self.has_masks:
            results["pixel_auroc"] = float(self.pixel_auroc.compute())
            results["aupro"] = float(self.aupro.compute())
        self.reset()
        return results

    def reset(self) -> None:
        """Forget every batch."""
        for metric in (self.image_auroc, self.pixel_auroc, self.aupro):
            metric.reset()
        self.has_masks = False
