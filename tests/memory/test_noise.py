"""Noisy memory-reduce: clipping, calibrated noise, fresh randomness, release counts, what it refuses."""

from __future__ import annotations

import math

import pytest
import torch

from feddymem.config import load_config
from feddymem.errors import ConfigError
from feddymem.federation.strategies import make_strategy
from feddymem.memory import noise as mechanism
from feddymem.memory.noise import NoiseSettings, clip_rows, private_cluster_mean, private_position_mean
from feddymem.memory.reduce import MemoryReduceSettings, reduce_memory


@pytest.fixture
def seeded_noise(monkeypatch):
    """Repeatable noise for tests that check its statistics (the library draws it from the OS)."""
    monkeypatch.setattr(mechanism, "_noise_generator", lambda: torch.Generator().manual_seed(0))


def test_clip_rows_bounds_every_norm_and_leaves_short_rows_alone():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped = clip_rows(x, 1.0)
    assert torch.allclose(clipped[0], torch.tensor([0.6, 0.8]))
    assert torch.equal(clipped[1:], x[1:])


def test_position_mean_noise_has_the_calibrated_standard_deviation(seeded_noise):
    # All-zero embeddings: every released value is noise / noisy count, count ≈ N images.
    n, d, h, w = 400, 8, 4, 4
    settings = NoiseSettings(noise_multiplier=2.0, clip_norm=0.5)
    released = private_position_mean(torch.zeros(n, d, h, w), settings)
    assert released.releases == 1 and released.items.shape == (h * w, d)
    # One image moves the stacked (sums, C·counts) vector by √(H·W)·√2·C.
    expected = settings.noise_multiplier * math.sqrt(h * w) * math.sqrt(2) * settings.clip_norm / n
    assert float(released.items.std()) == pytest.approx(expected, rel=0.2)
    assert float(released.weights.mean()) == pytest.approx(n, rel=0.05)


def test_noise_is_fresh_on_every_call_whatever_the_seed():
    emb = torch.randn(30, 4, 3, 3)
    settings = NoiseSettings(1.0, 5.0)
    a = reduce_memory(emb, MemoryReduceSettings("position_mean", noise=settings), seed=0)
    b = reduce_memory(emb, MemoryReduceSettings("position_mean", noise=settings), seed=0)
    assert not torch.equal(a.items, b.items)  # repeated noise would cancel between rounds


def test_dp_lloyd_counts_its_releases_and_recovers_well_separated_clusters(seeded_noise):
    # Four tight clusters far apart; tiny noise: the noisy Lloyd iterations find them.
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 10
    patches = centres.repeat_interleave(200, 0) + 0.01 * torch.randn(800, 4, generator=g)
    emb = patches.view(200, 4, 4).permute(0, 2, 1).reshape(200, 4, 2, 2)  # 200 images of 4 patches
    settings = NoiseSettings(noise_multiplier=1e-4, clip_norm=20.0, iters=3)
    released = private_cluster_mean(emb, 4, settings, init=centres + 1.0)
    assert released.releases == 3  # one per Lloyd iteration; the given init costs nothing
    assert torch.cdist(released.items, centres).min(dim=1).values.max() < 0.05
    assert released.weights.sum() == pytest.approx(800, rel=1e-3)
    round0 = private_cluster_mean(emb, 16, settings)
    assert round0.releases == 4  # plus the noisy moments that place the first centroids


def test_patches_per_image_caps_what_each_image_contributes(seeded_noise):
    emb = torch.randn(50, 4, 8, 8)
    settings = NoiseSettings(noise_multiplier=1e-4, clip_norm=100.0, patches_per_image=2, iters=1)
    released = private_cluster_mean(emb, 1, settings, init=torch.zeros(1, 4))  # one cluster: every patch
    assert released.releases == 1
    assert float(released.weights.sum()) == pytest.approx(100, rel=1e-3)  # 50 images × 2 patches


def test_strong_noise_drops_noisy_clusters_but_still_releases_something(seeded_noise):
    emb = torch.randn(20, 4, 4, 4)
    released = private_cluster_mean(emb, 64, NoiseSettings(noise_multiplier=1.0, clip_norm=1.0), min_cluster_size=3)
    assert 1 <= released.items.shape[0] < 64 and torch.isfinite(released.items).all()


def test_raw_patch_uploads_cannot_be_made_private():
    with pytest.raises(ValueError, match="not coreset"):
        reduce_memory(torch.randn(4, 4, 2, 2), MemoryReduceSettings("coreset", noise=NoiseSettings(1.0, 1.0)))
    with pytest.raises(ConfigError, match="privacy.noise_multiplier.*coreset"):
        load_config(["privacy.noise_multiplier=1", "memory.reduce=coreset"])
    with pytest.raises(ConfigError, match="privacy.noise_multiplier.*got coreset_mean"):  # the default reduce
        load_config(["privacy.noise_multiplier=1"])
    with pytest.raises(ConfigError, match="method=fedavg uploads no memory"):
        make_strategy(load_config(["privacy.noise_multiplier=1", "memory.reduce=cluster_mean", "method=fedavg"]))
