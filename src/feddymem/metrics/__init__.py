"""Anomaly-detection metrics: image and pixel AUROC (torchmetrics) and AUPRO."""

from feddymem.metrics.aupro import AUPRO, aupro_score
from feddymem.metrics.auroc import AUROC, auroc_score

__all__ = ["AUPRO", "AUROC", "aupro_score", "auroc_score"]
