"""Nearest-memory search: differentiable torch distances for training, a FAISS index for scoring."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch


def squared_distances(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(P, D) × (M, D) → (P, M) squared Euclidean distances; differentiable and ONNX-exportable."""
    dist = queries.pow(2).sum(1, keepdim=True) + memory.pow(2).sum(1).unsqueeze(0) - 2.0 * queries @ memory.T
    return dist.clamp_min(0.0)


def faiss_gpu_available() -> bool:
    """Whether FAISS was built with GPU support and sees a GPU."""
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def as_float32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A C-contiguous float32 NumPy array, as FAISS wants."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class MemoryIndex:
    """L2 FAISS index over memory items (on the GPU when FAISS has one and ``gpu`` is true).

    Exact (flat) by default. With ``approximate_above`` > 0, a memory larger than that is searched with
    an inverted-file index (√M lists, ``nprobe`` of them visited per query): about √M / nprobe times
    fewer distances, which is what makes memories of 10⁴ items and more affordable on a CPU. A query
    whose visited lists hold fewer than k items is answered exactly. The lists come from a K-means over
    at most ``train_per_list`` items per list (FAISS's default 256; fewer trains faster, places the lists
    a little less well).
    """

    def __init__(
        self,
        memory: torch.Tensor | np.ndarray,
        gpu: bool = False,
        approximate_above: int = 0,
        nprobe: int = 8,
        train_per_list: int = 256,
    ) -> None:
        items = as_float32(memory)
        self.size, self.dim = items.shape
        self.flat: Any = faiss.IndexFlatL2(self.dim)  # on the GPU below when asked
        self.flat.add(items)
        self.approximate = 0 < approximate_above < self.size
        index: Any = self.flat  # flat, IVF or GPU: FAISS's classes share no typed base
        if self.approximate:
            lists = max(1, round(self.size**0.5))
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(self.dim), self.dim, lists)
            index.cp.seed = 0  # the coarse K-means: same lists for the same memory
            index.cp.min_points_per_centroid = 1
            index.cp.max_points_per_centroid = train_per_list  # the coarse K-means' sample: items per list
            index.train(items)
            index.add(items)
            index.nprobe = min(nprobe, lists)
        self.on_gpu = gpu and faiss_gpu_available()
        if self.on_gpu:
            resources = faiss.StandardGpuResources()
            probes = getattr(index, "nprobe", 0)
            index = faiss.index_cpu_to_gpu(resources, 0, index)
            if probes:  # on the copy too: the GPU visits as many lists as the CPU index would
                index.nprobe = probes
            self.flat = faiss.index_cpu_to_gpu(resources, 0, self.flat) if self.approximate else index
        self.index = index

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances and indices of the ``k`` nearest items, sorted, as tensors on ``queries``' device."""
        k = min(k, self.size)
        q = as_float32(queries)
        dist, idx = self.index.search(q, k)
        if self.approximate:
            short = np.flatnonzero((idx < 0).any(axis=1))
            if short.size:
                dist[short], idx[short] = self.flat.search(q[short], k)
        return torch.from_numpy(dist).to(queries.device), torch.from_numpy(idx).to(queries.device)


def nearest_neighbour_spread(items: torch.Tensor, sample: int = 512, seed: int = 0) -> float:
    """The standard deviation of the distance from memory items to their nearest other item.

    A memory's own scale, read without any image: how much "nearest distance" varies between normal
    patterns. Dividing a memory's scores by it puts memories of different features (the patch and the
    context memory) on one scale. Measured on the distinct items (a repeated item is not a neighbour),
    ``sample`` of them at most; 1.0 when that is undefined (fewer than two distinct items, no spread).
    """
    distinct = torch.unique(items.detach().float().cpu(), dim=0)
    if distinct.shape[0] < 2:
        return 1.0
    g = torch.Generator().manual_seed(seed)
    queries = distinct[torch.randperm(distinct.shape[0], generator=g)[:sample]]
    dist2, _ = MemoryIndex(distinct).search(queries, 2)  # the first neighbour is the item itself
    spread = float(dist2[:, 1].clamp_min(0).sqrt().std()) if queries.shape[0] > 1 else 0.0
    return spread if spread > 0 else 1.0
