"""Memory generator (SPEC §2): a 1×1 CoordConv from patch descriptors to the memory space."""

from __future__ import annotations

import torch
from torch import nn


def coordinate_channels(batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Two channels holding each position's row and column in [-1, 1]."""
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_y, grid_x]).unsqueeze(0).expand(batch, -1, -1, -1)


class MemoryGenerator(nn.Module):
    """1×1 CoordConv: append (y, x) coordinates, then a 1×1 conv C(+2) → D, with D = C / γ_d."""

    def __init__(
        self, in_channels: int, reduction: int = 1, coord_channels: bool = True, init: str = "identity"
    ) -> None:
        super().__init__()
        if init not in ("identity", "random"):
            raise ValueError(f"generator init must be 'identity' or 'random', got '{init}'")
        self.coord_channels, self.init = coord_channels, init
        self.out_channels = max(1, in_channels // reduction)
        self.conv = nn.Conv2d(in_channels + (2 if coord_channels else 0), self.out_channels, kernel_size=1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``identity``: start as a distance-preserving map, identity when D = C, orthonormal rows otherwise.
        ``random``: PyTorch's default (Kaiming-uniform) initialisation, as CFA does.

        A random 1×1 conv distorts the backbone's patch geometry before any training; with ``identity``
        round 0 (untrained generators) scores like the backbone features themselves.
        """
        if self.init == "random":
            self.conv.reset_parameters()
            return
        weight = self.conv.weight.view(self.out_channels, -1)
        weight.zero_()
        in_channels = weight.shape[1] - (2 if self.coord_channels else 0)
        if self.out_channels == in_channels:
            weight[:, :in_channels] = torch.eye(in_channels)
        else:
            nn.init.orthogonal_(weight[:, :in_channels])
        assert self.conv.bias is not None  # nn.Conv2d(bias=True)
        self.conv.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Patch descriptors (B, C, H, W) → memory-space embeddings (B, D, H, W)."""
        if self.coord_channels:
            b, _, h, w = features.shape
            features = torch.cat([features, coordinate_channels(b, h, w, features.device, features.dtype)], dim=1)
        return self.conv(features)
