"""Decision thresholds from normal images only (no anomalies are needed, or available, at a site)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def normal_threshold(scores, percentile: float = 99.0, k_sigma: float | None = None) -> float:
    """The ``percentile`` of normal scores, or mean + ``k_sigma``·std when ``k_sigma`` is given."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("a threshold needs at least one normal score")
    if k_sigma is not None:
        return float(values.mean() + k_sigma * values.std())
    return float(np.percentile(values, percentile))


@dataclass(frozen=True)
class NormalScores:
    """What a site tells about its held-out normal scores instead of the scores themselves: how many,
    their mean and standard deviation, and its own threshold (:func:`normal_threshold`)."""

    count: int
    mean: float
    std: float
    threshold: float

    @classmethod
    def of(cls, scores, percentile: float = 99.0, k_sigma: float | None = None) -> NormalScores:
        """The summary of ``scores`` with the threshold at ``percentile`` (or mean + ``k_sigma``·std)."""
        values = np.asarray(scores, dtype=np.float64).ravel()
        threshold = normal_threshold(values, percentile, k_sigma)
        return cls(int(values.size), float(values.mean()), float(values.std()), threshold)


def pooled_threshold(summaries: list[NormalScores], k_sigma: float | None = None) -> float:
    """One threshold for every site's images from the sites' summaries: with ``k_sigma``, mean + k·std of
    all their scores pooled (exact, from the counts and moments); else the sites' percentile thresholds
    averaged by count (a percentile of the pooled scores would need every score)."""
    counts = np.array([s.count for s in summaries], dtype=np.float64)
    if counts.sum() == 0:
        raise ValueError("a threshold needs at least one normal score")
    weights = counts / counts.sum()
    if k_sigma is not None:
        means = np.array([s.mean for s in summaries])
        second = np.array([s.std**2 + s.mean**2 for s in summaries])
        mean = float(weights @ means)
        return mean + k_sigma * float(np.sqrt(max(weights @ second - mean**2, 0.0)))
    return float(weights @ np.array([s.threshold for s in summaries]))
