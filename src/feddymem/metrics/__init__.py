"""Anomaly-detection metrics: image and pixel AUROC (torchmetrics) and AUPRO."""

from feddymem.metrics.anomaly_metrics import AnomalyMetrics
from feddymem.metrics.aupro import AUPRO, aupro_score
from feddymem.metrics.auroc import AUROC, auroc_score
from feddymem.metrics.normalize import ScoreNormalizer

__all__ = ["AUPRO", "AUROC", "AnomalyMetrics", "ScoreNormalizer", "aupro_score", "auroc_score"]
