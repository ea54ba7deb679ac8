"""Server aggregation (SPEC §4): concatenate the uploads and cluster them with FAISS K-means.

:func:`mean_aggregate` is the ablation "mean instead of K-means": the weighted mean of position-aligned
uploads, item by item.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from feddymem.memory.coreset import greedy_coreset
from feddymem.memory.kmeans import kmeans
from feddymem.memory.reduce import MemoryBank
from feddymem.memory.search import squared_distances


@dataclass
class GlobalMemory:
    """The server's global memory and the statistics of its aggregation."""

    items: torch.Tensor  # (n_g, D)
    objective: float  # K-means objective of the final iteration
    num_points: int  # uploaded items clustered
    gpu: bool


def aggregate(
    uploads: list[MemoryBank],
    size: int,
    *,
    previous: torch.Tensor | None = None,
    weight_by_client_size: bool = True,
    iters: int = 20,
    seed: int = 0,
    gpu: bool = False,
    max_points: int | None = None,
) -> GlobalMemory:
    """K-means of all uploaded items into ``size`` centroids (clamped to the number of items).

    Item weights are the number of patches each averages, so clients count by their size; with
    ``weight_by_client_size=False`` every client's weights are rescaled to the same total.
    ``previous`` (the last global memory) warm-starts the iterations. With more than ``max_points`` items
    the iterations run on a seeded sample of that many (FAISS's subsampling, weights kept) and the
    objective is the sample's: the cost of a round stops growing with the number of sites.
    """
    if not uploads:
        raise ValueError("no uploads to aggregate")
    points = torch.cat([u.items.float().cpu() for u in uploads])
    if weight_by_client_size:
        weights = torch.cat([u.weights.float().cpu() for u in uploads])
    else:
        weights = torch.cat([u.weights.float().cpu() / u.weights.float().sum() for u in uploads])
    weights = weights / weights.mean()  # a scale FAISS handles well
    n, k = points.shape[0], max(1, min(size, points.shape[0]))
    sampled = max_points is not None and n > max_points
    bound = max_points if max_points is not None else n
    result = kmeans(
        points,
        size,
        iters=iters,
        seed=seed,
        weights=weights,
        init=previous,
        gpu=gpu,
        # Every item takes part, unless there are more than max_points: then FAISS samples k·(max_points // k).
        max_points_per_centroid=max(1, bound // k) if sampled else max(256, n // k + 1),
        assign_all=not sampled,
    )
    return GlobalMemory(result.centroids, result.objective, n, result.gpu)


def coreset_aggregate(uploads: list[MemoryBank], size: int, *, seed: int = 0) -> GlobalMemory:
    """A greedy k-center coreset of all uploaded items (``size`` of them, at most all).

    K-means replaces rare items by the mean of their neighbourhood; k-center keeps the items that are
    farthest from everything already chosen, so rare normal patterns stay in the global memory. The
    items are still the clients' averages (no raw patch is ever uploaded). Objective: the coverage
    radius², the largest squared distance of an uploaded item to its nearest chosen one.
    """
    if not uploads:
        raise ValueError("no uploads to aggregate")
    points = torch.cat([u.items.float().cpu() for u in uploads])
    picks = greedy_coreset(points, size, seed=seed)
    items = points[picks].contiguous()
    radius2 = float(squared_distances(points, items).min(dim=1).values.max())
    return GlobalMemory(items, radius2, points.shape[0], False)


def mean_aggregate(uploads: list[MemoryBank], *, weight_by_client_size: bool = True) -> GlobalMemory:
    """Item-by-item weighted mean of uploads that are aligned by patch position (reduce=position_*).

    Client k's weight is its number of images (or 1 with ``weight_by_client_size=False``).
    """
    if not uploads:
        raise ValueError("no uploads to aggregate")
    shapes = {tuple(u.items.shape) for u in uploads}
    if len(shapes) != 1:
        raise ValueError(f"server mean needs uploads of one shape (aligned by position), got {sorted(shapes)}")
    stacked = torch.stack([u.items.float().cpu() for u in uploads])
    w = torch.tensor([float(u.num_images) if weight_by_client_size else 1.0 for u in uploads])
    items = torch.einsum("k,kmd->md", w / w.sum(), stacked)
    return GlobalMemory(items.contiguous(), float("nan"), int(stacked.shape[0] * stacked.shape[1]), False)
