"""AUPRO: area under the per-region-overlap curve up to a false-positive rate limit (Bergmann et al.).

For each threshold, PRO is the mean over connected ground-truth regions of the fraction of the region
above the threshold; the curve is integrated against the pixel FPR on normal pixels from 0 to
``fpr_limit`` and divided by ``fpr_limit`` so that a perfect map scores 1.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def aupro_score(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3, num_thresholds: int = 300) -> float:
    """``maps`` and ``masks``: (N, H, W). Returns NaN when there is no anomalous or no normal pixel."""
    maps = np.asarray(maps, dtype=np.float32)  # the maps are float32 (fp16 in the metric state) anyway
    masks = np.asarray(masks) > 0
    normal = maps[~masks]
    if normal.size == 0 or not masks.any():
        return float("nan")
    # Candidate thresholds: normal-pixel quantiles (FPRs spread over [0, fpr_limit]), anomalous-pixel
    # quantiles (so ties in either class cannot hide a step of the curve) and +inf (the origin).
    fprs = np.linspace(0.0, fpr_limit, num_thresholds)
    thresholds = np.unique(
        np.concatenate(
            [
                np.quantile(normal, 1.0 - fprs),
                np.quantile(maps[masks], np.linspace(0.0, 1.0, num_thresholds)),
                [np.inf],
            ]
        )
    )
    normal_sorted = np.sort(normal)
    fpr = 1.0 - np.searchsorted(normal_sorted, thresholds, side="left") / normal_sorted.size
    overlaps = []
    for image_map, mask in zip(maps, masks, strict=True):
        if not mask.any():
            continue
        regions, count = ndimage.label(mask)
        for region in range(1, count + 1):
            values = np.sort(image_map[regions == region])
            overlaps.append(1.0 - np.searchsorted(values, thresholds, side="left") / values.size)
    pro = np.mean(overlaps, axis=0)
    order = np.lexsort((pro, fpr))
    x, y = fpr[order], pro[order]
    inside = x <= fpr_limit
    x, y = np.append(x[inside], fpr_limit), np.append(y[inside], np.interp(fpr_limit, x, y))
    return float(np.trapezoid(y, x) / fpr_limit)


class AUPRO(Metric):
    """torchmetrics wrapper around :func:`aupro_score`; keeps maps in fp16 to bound memory."""

    maps: list[torch.Tensor]
    masks: list[torch.Tensor]

    full_state_update = False
    higher_is_better = True

    def __init__(self, fpr_limit: float = 0.3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fpr_limit = fpr_limit
        self.add_state("maps", default=[], dist_reduce_fx="cat")
        self.add_state("masks", default=[], dist_reduce_fx="cat")

    def update(self, maps: torch.Tensor, masks: torch.Tensor) -> None:
        """Add anomaly maps and their binary masks."""
        self.maps.append(maps.detach().to(torch.float16))
        self.masks.append(masks.detach().to(torch.bool))

    def compute(self) -> torch.Tensor:
        """The normalised area under the PRO curve up to the FPR limit."""
        maps = dim_zero_cat(self.maps).float().cpu().numpy()
        masks = dim_zero_cat(self.masks).cpu().numpy()
        return torch.tensor(aupro_score(maps, masks, self.fpr_limit))
