"""Per-product score normalisation from held-out normal images only.

Distances to the memory have a different scale for every product (a textured tile and a smooth wire
harness), so a client that holds several products cannot rank their images on one scale. Each score
is z-normalised by its product's held-out normal anomaly maps: location = the mean map value, scale =
the root-mean-square of the maps' per-image standard deviations. Map statistics rest on every pixel of
every held-out image, so they are stable with the handful of held-out images a small client has (image
scores, one per image, were not: with 3–4 held-out images per product the pooled AUROC fell).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ScoreNormalizer:
    """product → (location, scale); products it has not seen use the statistics of all held-out maps."""

    stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    pooled: tuple[float, float] = (0.0, 1.0)

    @classmethod
    def fit(
        cls, map_means: Sequence[float] | np.ndarray, map_stds: Sequence[float] | np.ndarray, products: Sequence[str]
    ) -> ScoreNormalizer:
        """Statistics of held-out normal anomaly maps: each image's map mean and standard deviation, and its product."""
        means = np.asarray(map_means, dtype=np.float64).ravel()
        stds = np.asarray(map_stds, dtype=np.float64).ravel()
        names = np.asarray(list(products))
        if means.size == 0:
            raise ValueError("score normalisation needs at least one held-out normal image")
        if not means.size == stds.size == names.size:
            raise ValueError(f"{means.size} map means, {stds.size} standard deviations, {names.size} products")

        def location_scale(selected: np.ndarray) -> tuple[float, float]:
            scale = float(np.sqrt(np.mean(stds[selected] ** 2)))
            return float(means[selected].mean()), scale if scale > 0 else max(abs(float(means.mean())), 1e-12)

        stats = {p: location_scale(names == p) for p in dict.fromkeys(names.tolist())}
        return cls(stats, location_scale(np.ones(means.size, dtype=bool)))

    def params(self, product: str) -> tuple[float, float]:
        return self.stats.get(product, self.pooled)

    def __call__(self, scores: Sequence[float] | np.ndarray, products: Sequence[str]) -> np.ndarray:
        """(score − location) / scale of each score's product."""
        values = np.asarray(scores, dtype=np.float64).ravel()
        loc, scale = np.array([self.params(p) for p in products], dtype=np.float64).reshape(-1, 2).T
        return (values - loc) / scale

    def to_dict(self) -> dict[str, list[float]]:
        """Plain lists, safe in a ``weights_only`` checkpoint."""
        return {p: [loc, scale] for p, (loc, scale) in self.stats.items()}
