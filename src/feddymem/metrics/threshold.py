"""Decision thresholds from normal images only (no anomalies are needed, or available, at a site)."""

from __future__ import annotations

import numpy as np


def normal_threshold(scores, percentile: float = 99.0, k_sigma: float | None = None) -> float:
    """The ``percentile`` of normal scores, or mean + ``k_sigma``·std when ``k_sigma`` is given."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("a threshold needs at least one normal score")
    if k_sigma is not None:
        return float(values.mean() + k_sigma * values.std())
    return float(np.percentile(values, percentile))
