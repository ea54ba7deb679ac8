"""Per-product score normalisation from held-out normal images only.

Distances to the memory have a different scale for every product (a textured tile and a smooth wire
harness), so a client that holds several products cannot rank their images on one scale. Each
product's scores are z-normalised by the mean and standard deviation of its normal images' scores: a
score then says how unusual an image is *for its product*.

The orchestrator fits it on a client's held-out normal images and a sample of its training images
(``model.scoring.normalize_images`` per product): with only the 3–10 held-out images of a small client the
estimates were too noisy (ELPV, one run, 2-product clients:
0.918–0.933 pooled AUROC with held-out images only, 0.931–0.933 with all normal images, 0.923–0.925
without normalisation; statistics of anomaly-map pixels instead of image scores: 0.916–0.928).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ScoreNormalizer:
    """product → (location, scale); products it has not seen are scaled by the pooled statistics."""

    stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    pooled: tuple[float, float] = (0.0, 1.0)

    @classmethod
    def fit(cls, scores: Sequence[float] | np.ndarray, products: Sequence[str]) -> ScoreNormalizer:
        """Statistics of normal images' ``scores`` with their ``products``.

        A product with a single held-out image (or zero spread) takes the pooled standard deviation.
        """
        values = np.asarray(scores, dtype=np.float64).ravel()
        names = np.asarray(list(products))
        if values.size == 0:
            raise ValueError("score normalisation needs at least one normal image's score")
        if values.size != names.size:
            raise ValueError(f"{values.size} scores for {names.size} product names")
        spread = values.std() if values.size > 1 else 0.0
        # float(): NumPy scalars would not load from a weights_only checkpoint
        pooled_scale = float(spread) if spread > 0 else float(max(abs(values.mean()), 1e-12))
        stats = {}
        for product in dict.fromkeys(names.tolist()):
            own = values[names == product]
            scale = float(own.std()) if own.size > 1 and own.std() > 0 else pooled_scale
            stats[product] = (float(own.mean()), scale)
        return cls(stats, (float(values.mean()), pooled_scale))

    def params(self, product: str) -> tuple[float, float]:
        """(mean, std) of ``product``'s normal scores; (0, 1) for an unseen product."""
        return self.stats.get(product, self.pooled)

    def __call__(self, scores: Sequence[float] | np.ndarray, products: Sequence[str]) -> np.ndarray:
        """(score − location) / scale of each score's product."""
        values = np.asarray(scores, dtype=np.float64).ravel()
        loc, scale = np.array([self.params(p) for p in products], dtype=np.float64).reshape(-1, 2).T
        return (values - loc) / scale

    def to_dict(self) -> dict[str, list[float]]:
        """Each product's [location, scale] as plain lists (what a client reports; the pooled fallback is left out)."""
        return {p: [loc, scale] for p, (loc, scale) in self.stats.items()}

    def state(self) -> dict[str, dict[str, list[float]] | list[float]]:
        """Everything, the pooled fallback included, as plain lists: safe in a ``weights_only`` checkpoint."""
        return {"stats": self.to_dict(), "pooled": list(self.pooled)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ScoreNormalizer:
        """The normaliser :meth:`state` describes."""
        stats = {p: (float(loc), float(scale)) for p, (loc, scale) in state["stats"].items()}
        loc, scale = state["pooled"]
        return cls(stats, (float(loc), float(scale)))
