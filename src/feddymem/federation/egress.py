"""What a site lets leave it, decided and enforced at the site.

By default only what the method needs and aggregate numbers leave a site: memory items with their counts
and privacy releases, the generator's parameters for the methods that average them (``fedavg``,
``fedprox``), and numbers (AUROC per product, criterion, loss, thresholds, bytes, times, the summary of its
held-out normal scores). No pixels, no file paths, no per-image scores. A site opts in to the anomaly-map
panels of a dashboard (``share-panels``) and to its per-image test scores with their paths
(``share-scores``, the coordinator's ``scores.csv``) in its own node config; the coordinator cannot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from feddymem.federation.messages import ClientEvaluation, ClientResult, TestSetMetrics

# A string that names a file: a separator or a drive, or an image's extension.
_PATH_LIKE = re.compile(r"[/\\]|^[A-Za-z]:|\.(png|jpe?g|bmp|tiff?|gif|webp|npy|dcm)$", re.IGNORECASE)


def _flag(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class EgressPolicy:
    """A site's rules for its outgoing messages (``share-panels`` / ``share-scores`` in its node config)."""

    panels: bool = False  # anomaly-map strips of a few test images (pixels) and their paths
    scores: bool = False  # every test image's path, label and score

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> EgressPolicy:
        """The site's policy from its node config: both off unless the site says ``true``."""
        return cls(panels=_flag(node_config.get("share-panels")), scores=_flag(node_config.get("share-scores")))

    def test(self, test: TestSetMetrics | None) -> TestSetMetrics | None:
        """The test metrics as they may leave: without the per-image scores unless the site shares them."""
        if test is None or self.scores:
            return test
        return replace(test, scores=[])

    def evaluation(self, evaluation: ClientEvaluation) -> ClientEvaluation:
        """The evaluation as it may leave: no panels and no per-image scores unless the site shares them."""
        return replace(
            evaluation,
            test=self.test(evaluation.test),
            kept_test=self.test(evaluation.kept_test),
            panel=evaluation.panel if self.panels else None,
        )

    def result(self, result: ClientResult) -> ClientResult:
        """The round's result as it may leave: an error message keeps its words, not the files it names."""
        if result.error is None or self.scores:
            return result
        return replace(result, error=redact_paths(result.error))

    def problems(self, arrays: dict[str, np.ndarray], strings: dict[str, str]) -> list[str]:
        """Why an outgoing message breaks this policy (empty when it does not): an image-shaped array
        (H × W × 3 or 4 of bytes) or a path-like string, unless the site shares panels or scores."""
        found = []
        if not self.panels:
            found += [f"array '{k}' {a.shape} is image-shaped" for k, a in arrays.items() if is_image_shaped(a)]
        if not (self.panels or self.scores):
            found += [f"string '{k}' names a file" for k, v in strings.items() if _PATH_LIKE.search(v)]
        return found


def redact_paths(text: str) -> str:
    """``text`` with every word that names a file replaced by ``<file>``."""
    return " ".join("<file>" if _PATH_LIKE.search(word.strip("'\"()[],:;")) else word for word in text.split(" "))


def is_image_shaped(array: np.ndarray) -> bool:
    """Whether ``array`` looks like pixels: 8-bit, or H × W (× 1, 3 or 4) with both sides above 8."""
    if array.dtype == np.uint8 and array.size > 64:
        return True
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        return min(array.shape[:2]) > 8
    return False
