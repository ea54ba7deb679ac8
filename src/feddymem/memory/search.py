"""Nearest-memory search: differentiable torch distances for training, a FAISS index for scoring."""

from __future__ import annotations

import faiss
import numpy as np
import torch


def squared_distances(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(P, D) × (M, D) → (P, M) squared Euclidean distances; differentiable and ONNX-exportable."""
    dist = queries.pow(2).sum(1, keepdim=True) + memory.pow(2).sum(1).unsqueeze(0) - 2.0 * queries @ memory.T
    return dist.clamp_min(0.0)


def faiss_gpu_available() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def as_float32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class MemoryIndex:
    """Exact L2 FAISS index over memory items (on the GPU when FAISS has one and ``gpu`` is true)."""

    def __init__(self, memory: torch.Tensor | np.ndarray, gpu: bool = False) -> None:
        items = as_float32(memory)
        self.size, self.dim = items.shape
        index = faiss.IndexFlatL2(self.dim)
        if gpu and faiss_gpu_available():
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(items)
        self.index = index

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances and indices of the ``k`` nearest items, sorted, as tensors on ``queries``' device."""
        k = min(k, self.size)
        dist, idx = self.index.search(as_float32(queries), k)
        return torch.from_numpy(dist).to(queries.device), torch.from_numpy(idx).to(queries.device)
