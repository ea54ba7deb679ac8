"""FAISS K-means with weights, warm start and clamping, on the GPU when asked and available."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch

from feddymem.memory.search import as_float32, faiss_gpu_available


@dataclass
class KMeansResult:
    """Centroids, each point's assignment, the objective and where it ran."""

    centroids: torch.Tensor  # (k, D) float32
    objective: float  # final weighted sum of squared distances to the nearest centroid
    assignments: torch.Tensor  # (N,) index of each point's centroid
    gpu: bool  # whether FAISS ran on the GPU


def resolve_gpu(setting: str | bool) -> bool:
    """``auto`` → a FAISS GPU exists; ``true`` demands one; ``false`` never."""
    if setting in (True, "true"):
        if not faiss_gpu_available():
            raise RuntimeError("server.gpu=true but FAISS sees no GPU (is faiss-gpu installed?)")
        return True
    if setting in (False, "false"):
        return False
    return faiss_gpu_available()


def kmeans(
    points: torch.Tensor | np.ndarray,
    k: int,
    *,
    iters: int = 20,
    seed: int = 0,
    weights: torch.Tensor | np.ndarray | None = None,
    init: torch.Tensor | np.ndarray | None = None,
    gpu: bool = False,
    max_points_per_centroid: int = 256,
    restarts: int = 1,
    assign_all: bool = True,
) -> KMeansResult:
    """Cluster ``points`` (N, D) into ``min(k, N)`` centroids.

    ``init`` warm-starts from given centroids when it has the right shape. FAISS subsamples to
    ``max_points_per_centroid``·k points for the iterations; assignments cover every point, unless
    ``assign_all`` is False: then no assignments are returned and the objective is the last iteration's
    (on the points the iterations used), which saves a search of all N points against k centroids.
    """
    x = as_float32(points)
    n, dim = x.shape
    if n == 0:
        raise ValueError("K-means needs at least one point")
    k = max(1, min(int(k), n))
    w = None if weights is None else as_float32(weights).reshape(-1)
    if w is not None and w.shape[0] != n:
        raise ValueError(f"{w.shape[0]} weights for {n} points")
    start = None if init is None else as_float32(init)
    if start is not None and start.shape != (k, dim):
        start = None
    use_gpu = gpu and faiss_gpu_available()
    km = faiss.Kmeans(
        dim,
        k,
        niter=iters,
        seed=seed,
        gpu=use_gpu,
        verbose=False,
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,
        nredo=1 if start is not None else max(1, restarts),
    )
    km.train(x, weights=w, init_centroids=start)
    assert km.centroids is not None  # set by train()
    centroids = torch.from_numpy(km.centroids.copy())
    if not assign_all:
        assert km.obj is not None  # the objective of every iteration, set by train()
        return KMeansResult(centroids, float(km.obj[-1]), torch.empty(0, dtype=torch.long), use_gpu)
    dist, assign = km.index.search(x, 1)
    objective = float((dist[:, 0] * (w if w is not None else 1.0)).sum())
    return KMeansResult(centroids, objective, torch.from_numpy(assign[:, 0]), use_gpu)
