"""Two runs of one experiment on different engines agree: the same rounds, bytes and kept states, and the
same numbers up to float rounding (features extracted in other batches)."""

from __future__ import annotations

from typing import Any

import numpy as np

REL = 1e-5


def close(a: Any, b: Any) -> bool:
    """``a`` and ``b`` equal, floats within ``REL`` (relative; absolute below 1), NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return (np.isnan(a) and np.isnan(b)) or abs(a - b) <= REL * max(1.0, abs(a), abs(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


CLIENT_KEYS = ("memory_items", "train_loss", "criterion", "product_thresholds", "normalizer", "products")


def assert_same_run(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Two ``metrics.json`` of one experiment: every round and every client's kept result agree."""
    assert len(ours["rounds"]) == len(theirs["rounds"])
    for mine, other in zip(ours["rounds"], theirs["rounds"], strict=True):
        assert mine["participants"] == other["participants"]
        assert mine["bytes_up"] == other["bytes_up"] and mine["bytes_down"] == other["bytes_down"]
        for key in ("threshold", "mean_image_auroc", "mean_criterion"):
            assert close(mine.get(key), other.get(key)), (mine["round"], key, mine.get(key), other.get(key))
        for cid, line in other["clients"].items():
            for key in CLIENT_KEYS:
                assert close(mine["clients"][cid].get(key), line.get(key)), (mine["round"], cid, key)
    for cid, line in theirs["final"]["clients"].items():
        for key in ("image_auroc", "kept_round", "threshold", "products"):
            assert close(ours["final"]["clients"][cid].get(key), line.get(key)), (cid, key)
