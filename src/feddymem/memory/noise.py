"""Differentially private memory-reduce: Gaussian noise on the sums and counts a client uploads.

The protected unit is one **image** of the client: the guarantee holds whatever else the client holds
and whatever the server knows. Every released statistic is a sum over patches, so one image changes it
by a bounded amount once each patch is clipped to ``clip_norm`` C and each image contributes at most
``m`` patches (``patches_per_image``, default all H·W):

* ``cluster_mean``: DP-Lloyd. Every iteration assigns the clipped patches to the current centroids and
  releases, per centroid, the noisy sum of its patches and the noisy count (one Gaussian mechanism on
  the stacked vector (sums, C·counts); one patch moves it by at most √2·C, one image by m·√2·C, since in
  the worst case all its patches fall into one cluster). The next centroids are the released noisy
  means, so no iteration sees anything but earlier releases. The first centroids are the global memory
  the server sent (post-processing of earlier releases), or, without one (round 0), drawn from a noisy
  mean and variance of the patches (one more release, sensitivity m·√3·C).
* ``position_mean``: each image contributes exactly one patch to each of the H·W positions, so the
  stacked vector of per-position sums and C·counts moves by at most √(H·W)·√2·C: one release.

Each release adds N(0, (σ·Δ)²) to every coordinate (σ = ``noise_multiplier``, Δ the sensitivity above),
so the whole upload is a composition of Gaussian mechanisms with noise multiplier σ; the accountant
(:mod:`feddymem.privacy.accountant`) turns the count of releases into (ε, δ). Items are released noisy
sums divided by noisy counts; clusters whose noisy count is below ``min_cluster_size`` plus two noise
standard deviations are dropped (post-processing: it costs no privacy).

The noise comes from a generator seeded by the operating system, never from the run's seed: noise that
repeated from round to round would cancel in the differences between rounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from feddymem.memory.search import MemoryIndex


@dataclass(frozen=True)
class NoiseSettings:
    """``privacy``'s knobs for one client's memory-reduce."""

    noise_multiplier: float = 0.0  # σ: noise standard deviation / sensitivity (0 = off)
    clip_norm: float = 50.0  # C: every patch embedding is scaled to at most this L2 norm
    patches_per_image: int = 0  # m: patches each image contributes, drawn at random (0 = every patch)
    iters: int = 3  # DP-Lloyd iterations per round (cluster_mean): each one is a release

    @property
    def enabled(self) -> bool:
        """Whether uploads get noise."""
        return self.noise_multiplier > 0


@dataclass
class NoisyItems:
    """Released items (M, D), their noisy patch counts (M,) and how many Gaussian releases made them."""

    items: torch.Tensor
    weights: torch.Tensor
    releases: int


def clip_rows(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale every row of ``x`` down to L2 norm ``max_norm`` at most (rows below it are unchanged)."""
    norms = x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x * (max_norm / norms).clamp(max=1.0)


def _noise_generator() -> torch.Generator:
    generator = torch.Generator()
    generator.seed()  # from the OS: fresh noise every call, whatever the run's seed
    return generator


def _image_patches(embeddings: torch.Tensor, settings: NoiseSettings, generator: torch.Generator) -> torch.Tensor:
    """(N, D, H, W) → (N·m, D) clipped patches, m of each image (all H·W when ``patches_per_image`` is 0)."""
    n, d, h, w = embeddings.shape
    per_image = embeddings.float().flatten(2).transpose(1, 2)  # (N, H·W, D)
    m = settings.patches_per_image
    if 0 < m < h * w:
        picks = torch.rand(n, h * w, generator=generator).argsort(dim=1)[:, :m]
        per_image = torch.gather(per_image, 1, picks[:, :, None].expand(-1, -1, d))
    return clip_rows(per_image.reshape(-1, d), settings.clip_norm)


def patches_per_image(settings: NoiseSettings, positions: int) -> int:
    """m: the patches one image contributes."""
    m = settings.patches_per_image
    return m if 0 < m < positions else positions


def private_cluster_mean(
    embeddings: torch.Tensor,
    size: int,
    settings: NoiseSettings,
    *,
    init: torch.Tensor | None = None,
    min_cluster_size: int = 1,
) -> NoisyItems:
    """DP-Lloyd over a client's embeddings (N, D, H, W): ``size`` noisy cluster means (see the module)."""
    _, d, h, w = embeddings.shape
    generator = _noise_generator()
    x = _image_patches(embeddings, settings, generator)
    c, sigma = settings.clip_norm, settings.noise_multiplier
    m = patches_per_image(settings, h * w)
    std = sigma * m * math.sqrt(2) * c  # per Lloyd release: sums and C·counts, one image's worst case
    count_std = std / c
    keep_above = min_cluster_size + 2 * count_std  # a noisy count below this: the mean is mostly noise
    releases = 0
    if init is not None and init.numel():
        start = init.float().cpu()
        centroids = start[torch.randperm(start.shape[0], generator=generator)[: max(1, size)]]
    else:
        # Noisy first and second moments and count: per patch (x, x⊙x / C, C) has norm ≤ √3·C.
        moment_std = sigma * m * math.sqrt(3) * c
        total = x.sum(0) + moment_std * torch.randn(d, generator=generator)
        square = (x * x / c).sum(0) + moment_std * torch.randn(d, generator=generator)
        count = max(float(x.shape[0] + moment_std / c * float(torch.randn(1, generator=generator))), 1.0)
        releases += 1
        mean = total / count
        spread = (square * c / count - mean**2).clamp_min(1e-6).sqrt()
        # As many centroids as the noisy count can fill (post-processing), close around the mean: the first
        # assignment then splits the patches by direction from the mean, a data-independent partition.
        k = int(min(max(size, 1), max(1.0, count / (2 * keep_above))))
        centroids = mean + 0.1 * spread * torch.randn(k, d, generator=generator)
    sums = counts = torch.zeros(0)
    for _ in range(max(1, settings.iters)):
        assign = MemoryIndex(centroids).search(x, 1)[1][:, 0]
        k = centroids.shape[0]
        sums = torch.zeros(k, d).index_add_(0, assign, x) + std * torch.randn(k, d, generator=generator)
        counts = torch.bincount(assign, minlength=k).float() + count_std * torch.randn(k, generator=generator)
        releases += 1
        keep = counts >= keep_above
        if not keep.any():
            break
        centroids = sums[keep] / counts[keep, None]
    keep = counts >= keep_above
    if not keep.any():  # every cluster too noisy: one item, the mean of every released sum
        total_count = float(counts.sum())
        if total_count <= 0:
            raise ValueError(
                f"privacy noise (σ={sigma}, C={c}, {m} patches per image) swamps all {x.shape[0]} patches: "
                "no item can be released; lower privacy.noise_multiplier or privacy.patches_per_image"
            )
        return NoisyItems(sums.sum(0, keepdim=True) / total_count, torch.tensor([total_count]), releases)
    return NoisyItems((sums[keep] / counts[keep, None]).contiguous(), counts[keep].contiguous(), releases)


def private_position_mean(embeddings: torch.Tensor, settings: NoiseSettings) -> NoisyItems:
    """Noisy mean over images at every position (H·W items): one release (see the module)."""
    n, d, h, w = embeddings.shape
    generator = _noise_generator()
    x = clip_rows(embeddings.float().cpu().flatten(2).transpose(1, 2).reshape(-1, d), settings.clip_norm)
    x = x.view(n, h * w, d)
    c, sigma = settings.clip_norm, settings.noise_multiplier
    std = sigma * math.sqrt(h * w) * math.sqrt(2) * c
    sums = x.sum(0) + std * torch.randn(h * w, d, generator=generator)
    mass = n + std / c * torch.randn(h * w, generator=generator)
    mass = mass.clamp_min(1.0)  # post-processing: a position's mass is at least one image
    return NoisyItems((sums / mass[:, None]).contiguous(), mass.contiguous(), 1)
