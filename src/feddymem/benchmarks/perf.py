"""Side-by-side timings: server K-means (FAISS vs scikit-learn), scoring (FAISS vs torch.cdist),
feature cache (first pass vs cached pass) and throughput of memory building and scoring."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from feddymem.memory.kmeans import kmeans
from feddymem.memory.search import MemoryIndex, faiss_gpu_available


def timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def synthetic_uploads(clients: int, items: int, dim: int, seed: int = 0) -> np.ndarray:
    """Clustered points shaped like uploads, for timing without data (``feddymem bench kmeans``)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim)).astype(np.float32)
    points = centres[rng.integers(0, 64, clients * items)] + 0.3 * rng.normal(size=(clients * items, dim))
    return points.astype(np.float32)


def replicate(points: np.ndarray, times: int, seed: int = 0) -> np.ndarray:
    """``times`` noisy copies of real uploads (1 % of their spread): "10× the clients" without 10× the data."""
    if times == 1:
        return points
    rng = np.random.default_rng(seed)
    noise = 0.01 * points.std(0, keepdims=True)
    copies = [points] + [points + noise * rng.standard_normal(points.shape) for _ in range(times - 1)]
    return np.concatenate(copies).astype(np.float32)


def compare_kmeans(points: np.ndarray, k: int, iters: int = 20, sklearn: bool = True) -> dict[str, Any]:
    """Seconds for one server K-means of ``points`` into ``k`` centroids: FAISS (CPU, and GPU if any) vs
    scikit-learn (one initialisation, the same iterations, no early stop)."""
    x = np.ascontiguousarray(points, dtype=np.float32)
    k = min(k, x.shape[0])  # as the server's K-means: never more centroids than points
    out: dict[str, Any] = {"points": int(x.shape[0]), "dim": int(x.shape[1]), "k": k, "iters": iters}
    every_point = max(1, x.shape[0] // k + 1)  # no FAISS subsampling: both cluster every point
    out["faiss_cpu_s"] = timed(lambda: kmeans(x, k, iters=iters, gpu=False, max_points_per_centroid=every_point))
    out["faiss_gpu_s"] = None
    if faiss_gpu_available():
        kmeans(x[: 10 * k], k, iters=2, gpu=True)  # warm-up: CUDA context and kernels
        out["faiss_gpu_s"] = timed(lambda: kmeans(x, k, iters=iters, gpu=True, max_points_per_centroid=every_point))
    out["sklearn_s"] = None
    if sklearn:
        from sklearn.cluster import KMeans

        fit = KMeans(k, n_init=1, max_iter=iters, tol=0.0, random_state=0).fit
        out["sklearn_s"] = timed(lambda: fit(x))
        out["speedup_cpu"] = out["sklearn_s"] / out["faiss_cpu_s"]
    return out


def compare_scoring(queries: torch.Tensor, memory: torch.Tensor, k: int = 3, repeat: int = 3) -> dict[str, Any]:
    """Seconds for the k nearest memory items of every query patch: FAISS flat index vs torch.cdist + topk."""
    index = MemoryIndex(memory)

    def with_cdist() -> torch.Tensor:
        return torch.topk(torch.cdist(queries, memory), k, dim=1, largest=False).values

    faiss_s = timed(lambda: index.search(queries, k), repeat)
    cdist_s = timed(with_cdist, repeat)
    # Same answer both ways (FAISS returns squared distances).
    agree = torch.allclose(index.search(queries, k)[0].clamp_min(0).sqrt(), with_cdist(), rtol=1e-3, atol=1e-3)
    return {
        "queries": int(queries.shape[0]),
        "memory_items": int(memory.shape[0]),
        "dim": int(memory.shape[1]),
        "faiss_s": faiss_s,
        "cdist_s": cdist_s,
        "speedup": cdist_s / faiss_s,
        "same_result": bool(agree),
    }
