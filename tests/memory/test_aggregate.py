import pytest
import torch

from feddymem.memory.aggregate import aggregate, coreset_aggregate, mean_aggregate
from feddymem.memory.reduce import MemoryBank


def _bank(value: float, n_items: int, n_images: int) -> MemoryBank:
    return MemoryBank(torch.full((n_items, 2), value), torch.full((n_items,), float(n_images)), n_images)


def test_global_memory_weighted_by_client_size():
    uploads = [_bank(0.0, 4, 90), _bank(1.0, 4, 10)]
    by_size = aggregate(uploads, 1, weight_by_client_size=True, iters=5)
    equal = aggregate(uploads, 1, weight_by_client_size=False, iters=5)
    assert by_size.items.shape == (1, 2) and abs(by_size.items[0, 0].item() - 0.1) < 1e-4
    assert abs(equal.items[0, 0].item() - 0.5) < 1e-4
    assert by_size.num_points == 8


def test_size_clamped_and_warm_started():
    torch.manual_seed(0)
    uploads = [MemoryBank(torch.randn(30, 4), torch.ones(30), 1) for _ in range(3)]
    first = aggregate(uploads, 200, iters=5)
    assert first.items.shape == (90, 4)
    second = aggregate(uploads, 8, iters=10)
    warm = aggregate(uploads, 8, previous=second.items, iters=1)
    assert warm.objective <= second.objective * 1.01


def test_server_mean_is_item_by_item_weighted_mean():
    uploads = [_bank(0.0, 4, 30), _bank(1.0, 4, 10)]
    by_size = mean_aggregate(uploads)
    assert by_size.items.shape == (4, 2) and torch.allclose(by_size.items, torch.full((4, 2), 0.25))
    assert torch.allclose(mean_aggregate(uploads, weight_by_client_size=False).items, torch.full((4, 2), 0.5))
    with pytest.raises(ValueError, match=r"one shape .*\(3, 2\), \(4, 2\)"):
        mean_aggregate([_bank(0.0, 4, 1), _bank(0.0, 3, 1)])


def test_coreset_aggregation_keeps_a_rare_upload_that_kmeans_averages_away():
    # 300 items in a tight blob and one rare but normal pattern far away, over two clients.
    torch.manual_seed(0)
    blob = torch.randn(300, 4) * 0.1
    rare = torch.tensor([[20.0, 0.0, 0.0, 0.0]])
    uploads = [
        MemoryBank(blob[:150], torch.ones(150), 10),
        MemoryBank(torch.cat([blob[150:], rare]), torch.ones(151), 10),
    ]
    result = coreset_aggregate(uploads, 8, seed=1)
    assert result.items.shape == (8, 4) and result.num_points == 301
    assert (result.items == rare).all(dim=1).any()  # kept as it was uploaded
    assert result.objective < 1.0  # every upload is within the coverage radius of a chosen item


def test_many_uploads_are_clustered_on_a_bounded_sample():
    generator = torch.Generator().manual_seed(0)
    uploads = [MemoryBank(torch.randn(500, 8, generator=generator), torch.ones(500), 5) for _ in range(8)]
    points = torch.cat([u.items for u in uploads])
    full = aggregate(uploads, 16, iters=5)
    # A sample of one item per centroid: every centroid is then an uploaded item itself, not a mean.
    sampled = aggregate(uploads, 16, iters=5, max_points=16)
    assert sampled.items.shape == full.items.shape == (16, 8) and sampled.num_points == 4000

    def farthest(centroids: torch.Tensor) -> float:  # the largest distance of a centroid to its nearest item
        exact = torch.cdist(centroids, points, compute_mode="donot_use_mm_for_euclid_dist")
        return float(exact.min(dim=1).values.max())

    assert farthest(sampled.items) < 1e-5
    assert farthest(full.items) > 0.1  # all 4000 items: the centroids are means
    assert torch.equal(aggregate(uploads, 16, iters=5, max_points=16).items, sampled.items)  # seeded
    # Under the bound nothing changes: every item takes part, as without one.
    assert torch.equal(aggregate(uploads, 16, iters=5, max_points=4000).items, full.items)
