"""Anomaly-detection metrics: image and pixel AUROC (torchmetrics) and AUPRO."""

from feddymem.metrics.aupro import AUPRO, aupro_score
from feddymem.metrics.auroc import AUROC, auroc_score
from feddymem.metrics.normalize import ScoreNormalizer
from feddymem.metrics.test_set import TestSetMetrics

__all__ = ["AUPRO", "AUROC", "ScoreNormalizer", "TestSetMetrics", "aupro_score", "auroc_score"]
