"""Patch scores → pixel anomaly map and image score (SPEC §6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian kernel of ``sigma`` (4σ either side)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


class AnomalyMapGenerator(nn.Module):
    """Upsample a (B, h, w) patch-score grid bilinearly to the image size, then blur it with a Gaussian (σ).

    Both steps are linear and separable, so they fold into two small matrices: map = A_h · S · A_wᵀ
    with A (H × h) = blur ∘ upsample. That is a few matrix products per batch (fast, and exportable)
    instead of full-resolution convolutions.
    """

    kernel: torch.Tensor

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.sigma = sigma
        self.register_buffer("kernel", gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1), persistent=False)
        self._operators: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def operator(self, grid: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(size × grid) matrix on ``device``: 1-D bilinear upsampling (align_corners=False) then edge-padded blur."""
        key = (grid, size, torch.device(device))
        if key not in self._operators:
            # Made once on the CPU in float64 (whatever device the kernel buffer has moved to), kept per device.
            basis = torch.eye(grid, dtype=torch.float64).unsqueeze(1)  # grid unit signals of length grid
            up = F.interpolate(basis, size=size, mode="linear", align_corners=False)
            if self.sigma > 0:
                pad = self.kernel.numel() // 2
                kernel = self.kernel.detach().cpu().double().view(1, 1, -1)
                up = F.conv1d(F.pad(up, (pad, pad), mode="replicate"), kernel)
            self._operators[key] = up.squeeze(1).T.contiguous().float().to(key[2])
        return self._operators[key]

    def forward(self, patch_scores: torch.Tensor, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h, w) → (anomaly maps (B, H, W), image scores = each map's maximum (B,))."""
        # int(): under ONNX tracing sizes are traced values; the grid is fixed there (export resizes its
        # input), so the operators made beforehand are found and enter the graph as constants.
        device = patch_scores.device
        a_h = self.operator(int(patch_scores.shape[-2]), int(image_size[0]), device).to(patch_scores)
        a_w = self.operator(int(patch_scores.shape[-1]), int(image_size[1]), device).to(patch_scores)
        return apply_operators(patch_scores, a_h, a_w)


def apply_operators(
    patch_scores: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """map = A_h · S · A_wᵀ; image score = the map's maximum."""
    maps = a_h @ patch_scores @ a_w.T
    return maps, maps.flatten(1).amax(dim=1)
