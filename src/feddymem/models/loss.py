"""Coupled-hypersphere metric loss (SPEC §5, after CFA, Lee et al. 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from feddymem.memory.search import squared_distances


class HypersphereLoss(nn.Module):
    """Pull each patch's K nearest memory items inside radius r, push the next J beyond r + margin.

    Distances are squared Euclidean; the radius r is learnable (stored as r, compared as r²).
    attract = mean relu(d_k - r²) over the K nearest; repel = mean relu(r² + margin - d_j) over the next J.
    """

    def __init__(
        self, k_nearest: int = 3, j_negatives: int = 3, margin: float = 0.1, radius_init: float = 1e-5
    ) -> None:
        super().__init__()
        self.k_nearest, self.j_negatives, self.margin = k_nearest, j_negatives, margin
        self.radius = nn.Parameter(torch.tensor(float(radius_init)))

    def forward(
        self, embeddings: torch.Tensor, memory: torch.Tensor, neighbours: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``embeddings``: (B, D, H, W) or (P, D); ``memory``: (M, D); ``neighbours``: optional (P, K + J)
        indices of each patch's nearest items, ascending (e.g. from a FAISS index). Returns the scalar loss."""
        patches = (
            embeddings.permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1]) if embeddings.dim() == 4 else embeddings
        )
        k = min(self.k_nearest, memory.shape[0])
        j = min(self.j_negatives, memory.shape[0] - k)
        # Find the K + J nearest items without autograd, then differentiate only through those distances: the
        # same gradient as through the full (P, M) matrix, without its backward pass (M is 10⁴ items and more).
        if neighbours is not None and neighbours.shape[1] == k + j:
            index = neighbours.to(patches.device)
        else:
            with torch.no_grad():
                index = torch.topk(squared_distances(patches, memory), k + j, dim=1, largest=False).indices
        nearest = (patches.unsqueeze(1) - memory[index]).pow(2).sum(dim=-1)  # (P, K + J), ascending
        r2 = self.radius.pow(2)
        attract = F.relu(nearest[:, :k] - r2).mean()
        if j == 0:
            return attract
        repel = F.relu(r2 + self.margin - nearest[:, k:]).mean()
        return attract + repel
