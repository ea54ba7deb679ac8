"""What an upload leaks, measured by attacks a curious server could run.

**Feature inversion.** The server trains a decoder from patch embeddings (the frozen backbone and the
client's generator: the space uploads live in) back to pixels, on its *own* public normal images of the
same kind. Every embedding at grid cell (i, j) is decoded to the image window centred on that cell (twice
the cell, so that SSIM has room). It is applied to

* one image's own embeddings, cell by cell, tiled back into an image (the worst case: what a per-image
  upload would leak), scored against the image itself and, as the floor, against an unrelated image of
  the same kind;
* the items of an upload (the un-reduced coreset bank, or a memory-reduced upload): each reconstruction
  is matched to its closest window in the client's images and, as the floor, in as many unrelated
  images of the same kind. A reconstruction that matches the client's images no better than unrelated
  ones reveals the kind of image, not the client's.

**Membership inference.** Given an upload and a candidate image, the server embeds the candidate's
patches and measures their distance to the nearest uploaded item: members (images the memory was built
from) should be closer than non-members. The attack's AUC, per product and weighted by members; 0.5 means
the upload does not tell them apart. Two statistics are tried, the mean and the minimum over the
candidate's patches, and the larger AUC is reported (the defender's worst case).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

from feddymem.memory.search import MemoryIndex


def image_windows(images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Images (N, C, S, S) in [0, 1] → (N, H·W, C, 2s, 2s): the window centred on every grid cell (stride s)."""
    n, channels, size, _ = images.shape
    stride = size // grid[0]
    padded = F.pad(images, [stride // 2] * 4, mode="reflect")
    windows = padded.unfold(2, 2 * stride, stride).unfold(3, 2 * stride, stride)  # (N, C, H, W, 2s, 2s)
    windows = windows[:, :, : grid[0], : grid[1]]
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(n, grid[0] * grid[1], channels, 2 * stride, 2 * stride)


class InversionDecoder(nn.Module):
    """An MLP from one patch embedding (D,) to the pixel window (C, 2s, 2s) around its cell."""

    shift: torch.Tensor  # buffers: the public embeddings' mean and spread, to standardise the input
    scale: torch.Tensor

    def __init__(self, dim: int, window_shape: tuple[int, int, int], hidden: int = 1024) -> None:
        super().__init__()
        self.window_shape = window_shape
        out = int(np.prod(window_shape))
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out)
        )
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(P, D) → (P, C, 2s, 2s) in [0, 1]."""
        out = torch.sigmoid(self.net((embeddings - self.shift) / self.scale))
        return out.view(-1, *self.window_shape)


def train_decoder(
    embeddings: torch.Tensor,
    windows: torch.Tensor,
    *,
    epochs: int = 8,
    batch: int = 512,
    lr: float = 1e-3,
    seed: int = 0,
    steps: int = 0,
) -> InversionDecoder:
    """Fit a decoder on the server's public pairs: embeddings (P, D) → windows (P, C, 2s, 2s); ``steps``
    optimiser steps (0: ``epochs`` passes, at least 400 steps, so that a small public set is still learned)."""
    torch.manual_seed(seed)
    decoder = InversionDecoder(embeddings.shape[1], tuple(windows.shape[1:]))  # type: ignore[arg-type]
    decoder.shift.copy_(embeddings.mean(0))
    decoder.scale.copy_(embeddings.std(0).clamp_min(1e-6))
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    steps = steps or max(400, epochs * (embeddings.shape[0] // batch))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    target = windows.flatten(1)
    for _ in range(steps):
        pick = torch.randint(embeddings.shape[0], (batch,))
        loss = F.mse_loss(decoder(embeddings[pick]).flatten(1), target[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return decoder.eval()


@torch.no_grad()
def decode(decoder: InversionDecoder, embeddings: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Windows (P, C, 2s, 2s) of the embeddings (P, D)."""
    return torch.cat([decoder(embeddings[i : i + chunk].float()) for i in range(0, embeddings.shape[0], chunk)])


def tile(windows: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(H·W, C, 2s, 2s) windows of one image → the image (C, H·s, W·s) from each window's central cell."""
    _, channels, win, _ = windows.shape
    s = win // 2
    centre = windows[:, :, s // 2 : s // 2 + s, s // 2 : s // 2 + s]
    centre = centre.reshape(grid[0], grid[1], channels, s, s).permute(2, 0, 3, 1, 4)
    return centre.reshape(channels, grid[0] * s, grid[1] * s)


@dataclass
class Similarity:
    """PSNR (dB) and SSIM of reconstructions against what they are compared with."""

    psnr: float
    ssim: float


def similarity(reconstructions: torch.Tensor, references: torch.Tensor, kernel: int = 7) -> Similarity:
    """Mean PSNR and SSIM of every reconstruction (B, C, h, w) against its reference, both in [0, 1]."""
    mse = (reconstructions - references).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    psnr = float((10 * torch.log10(1.0 / mse)).mean())
    ssim = structural_similarity_index_measure(
        reconstructions, references, data_range=1.0, kernel_size=kernel, reduction="elementwise_mean"
    )
    return Similarity(psnr, float(ssim))  # type: ignore[arg-type]


def closest_windows(reconstructions: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """For each reconstruction (B, C, h, w), the candidate window (among (P, C, h, w)) nearest in pixels."""
    index = MemoryIndex(candidates.flatten(1))
    nearest = index.search(reconstructions.flatten(1), 1)[1][:, 0]
    return candidates[nearest]


@dataclass
class InversionResult:
    """An inversion attack's scores against the client's images and against unrelated ones (the floor).

    ``identified``: the share of reconstructions closer (in pixels) to the client's image or window than to
    the unrelated one; 0.5 when the reconstructions tell nothing about the client. ``p_value``: the chance
    of that share or more if each were a coin toss (one-sided binomial test)."""

    client: Similarity
    floor: Similarity
    identified: float
    p_value: float

    @property
    def beats_floor(self) -> bool:
        """Whether reconstructions point at the client's images: identified well above chance (p < 0.01)."""
        return self.p_value < 0.01 and self.client.psnr > self.floor.psnr


def _identification(
    reconstructions: torch.Tensor, client: torch.Tensor, unrelated: torch.Tensor
) -> tuple[float, float]:
    closer = (reconstructions - client).pow(2).flatten(1).mean(1) < (reconstructions - unrelated).pow(2).flatten(
        1
    ).mean(1)
    wins = int(closer.sum())
    return wins / len(closer), float(binomtest(wins, len(closer), 0.5, alternative="greater").pvalue)


def invert_images(
    decoder: InversionDecoder,
    embeddings: torch.Tensor,
    originals: torch.Tensor,
    unrelated: torch.Tensor,
) -> tuple[InversionResult, torch.Tensor]:
    """Attack (a): each image's own embeddings (N, D, H, W) decoded and tiled; scored against the originals
    (N, C, S, S) and against unrelated images of the same kind (N, C, S, S). Also returns the reconstructions."""
    h, w = embeddings.shape[-2:]
    images = torch.stack([tile(decode(decoder, e.flatten(1).T), (h, w)) for e in embeddings])
    size = images.shape[-1]
    originals, unrelated = (x[..., :size, :size] for x in (originals, unrelated))
    return (
        InversionResult(
            similarity(images, originals, 11),
            similarity(images, unrelated, 11),
            *_identification(images, originals, unrelated),
        ),
        images,
    )


def invert_items(
    decoder: InversionDecoder, items: torch.Tensor, client_windows: torch.Tensor, unrelated_windows: torch.Tensor
) -> tuple[InversionResult, torch.Tensor, torch.Tensor]:
    """Attacks (b) and (c): every uploaded item (M, D) decoded to a window and matched to its closest window
    of the client's images and of unrelated images (each (P, C, 2s, 2s)). Also returns the reconstructions
    and their matches in the client's images."""
    reconstructions = decode(decoder, items)
    matches = closest_windows(reconstructions, client_windows)
    floor = closest_windows(reconstructions, unrelated_windows)
    return (
        InversionResult(
            similarity(reconstructions, matches),
            similarity(reconstructions, floor),
            *_identification(reconstructions, matches, floor),
        ),
        reconstructions,
        matches,
    )


# --- membership inference -----------------------------------------------------------------------------
def distance_to_upload(embeddings: torch.Tensor, items: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """For each image (N, D, H, W): the mean and the minimum over its patches of the squared distance to the
    nearest uploaded item."""
    index = MemoryIndex(items)
    means, mins = [], []
    for e in embeddings:
        nearest = index.search(e.flatten(1).T.contiguous(), 1)[0][:, 0]
        means.append(float(nearest.mean()))
        mins.append(float(nearest.min()))
    return np.array(means), np.array(mins)


def membership_auc(
    items: torch.Tensor,
    members: torch.Tensor,
    non_members: torch.Tensor,
    member_products: list[str],
    non_member_products: list[str],
) -> float:
    """The attack's AUC (members closer to the upload than non-members), per product weighted by members;
    the larger of the mean- and the minimum-distance statistic. NaN when no product has both kinds."""
    stats_in, stats_out = distance_to_upload(members, items), distance_to_upload(non_members, items)
    best = float("nan")
    for s_in, s_out in zip(stats_in, stats_out, strict=True):
        aucs, weights = [], []
        for product in sorted(set(member_products)):
            a = s_in[[p == product for p in member_products]]
            b = s_out[[p == product for p in non_member_products]]
            if len(a) and len(b):
                labels = np.r_[np.ones(len(a)), np.zeros(len(b))]
                aucs.append(roc_auc_score(labels, -np.r_[a, b]))  # closer = more likely a member
                weights.append(len(a))
        if aucs:
            auc = float(np.average(aucs, weights=weights))
            best = auc if best != best else max(best, auc)
    return best
