import pytest
import torch

from feddymem.memory.reduce import (
    MemoryBank,
    MemoryReduceSettings,
    cluster_mean,
    distinct_items,
    fit_weights,
    greedy_coreset,
    image_groups_of,
    position_mean,
    reduce_memory,
    side_by_side,
    split_parts,
)


def test_reduce_of_copies_of_one_image_returns_that_image():
    image = torch.randn(1, 6, 4, 5)
    bank = reduce_memory(image.repeat(7, 1, 1, 1), MemoryReduceSettings("position_mean"))
    assert bank.items.shape == (20, 6) and bank.num_images == 7
    assert torch.allclose(bank.items, image[0].flatten(1).T, atol=1e-6)
    assert torch.all(bank.weights == 7)


def test_position_mean_is_weighted_average_per_position():
    emb = torch.stack([torch.zeros(2, 2, 2), torch.ones(2, 2, 2)])
    assert torch.allclose(position_mean(emb), torch.full((4, 2), 0.5))
    assert torch.allclose(position_mean(emb, torch.tensor([3.0, 1.0])), torch.full((4, 2), 0.25))


def test_cluster_mean_items_are_exact_member_means_and_counts():
    torch.manual_seed(0)
    a = torch.randn(50, 3) * 0.01 + torch.tensor([5.0, 0, 0])
    b = torch.randn(30, 3) * 0.01 - torch.tensor([5.0, 0, 0])
    items, mass = cluster_mean(torch.cat([a, b]), 2, iters=10)
    order = items[:, 0].argsort(descending=True)
    assert torch.allclose(items[order], torch.stack([a.mean(0), b.mean(0)]), atol=1e-5)
    assert mass[order].tolist() == [50.0, 30.0]


def test_min_cluster_size_drops_small_clusters():
    points = torch.cat([torch.zeros(20, 2), torch.tensor([[100.0, 100.0]])])
    items, mass = cluster_mean(points, 2, iters=10, min_cluster_size=2)
    assert items.shape == (1, 2) and mass.item() == 20.0


def test_fit_weights_downweight_outliers():
    memory = torch.zeros(4, 3)
    emb = torch.zeros(3, 3, 2, 2)
    emb[2] += 10.0
    w = fit_weights(emb, memory)
    assert w[0] == w[1] == 1.0 and w[2] < 1e-3


def test_position_weighted_ignores_outlier_given_global_memory():
    normal = torch.zeros(4, 3, 2, 2)
    outlier = torch.full((1, 3, 2, 2), 10.0)
    emb = torch.cat([normal, outlier])
    plain = reduce_memory(emb, MemoryReduceSettings("position_mean"))
    weighted = reduce_memory(emb, MemoryReduceSettings("position_weighted"), global_memory=torch.zeros(1, 3))
    assert plain.items.abs().mean() > 1.0 > 1e-3 > weighted.items.abs().mean()


def test_second_stage_and_size_shrink_the_upload():
    emb = torch.randn(5, 4, 6, 6)
    assert (
        reduce_memory(emb, MemoryReduceSettings("position_mean", local_kmeans_ratio=4, kmeans_iters=5)).items.shape[0]
        == 9
    )
    bank = reduce_memory(emb, MemoryReduceSettings("cluster_mean", size=10, kmeans_iters=5))
    assert bank.items.shape[0] <= 10 and bank.weights.sum() == 5 * 36
    assert bank.nbytes == bank.items.nelement() * 4 + bank.weights.nelement() * 4


def test_coreset_reduce_uploads_real_patches_at_the_ratio():
    emb = torch.randn(4, 8, 5, 5)
    bank = reduce_memory(emb, MemoryReduceSettings("coreset", coreset_ratio=0.1))
    patches = emb.permute(0, 2, 3, 1).reshape(-1, 8)
    assert bank.items.shape == (10, 8) and torch.all(bank.weights == 1) and bank.num_images == 4
    assert all((patches == item).all(1).any() for item in bank.items)  # raw patches, not averages


def test_coreset_on_real_features_picks_distinct_patches_and_shrinks_the_coverage_radius(fedmodel):
    # Real EfficientNet-Lite0 patches of real magnetic-tile images: picks have very different norms, the
    # case where leaving |c|² out of the distance update made picks repeat (114 distinct of 14,974).

    from conftest import SHARED_DATA
    from feddymem.data.datasets import ImageDataset
    from feddymem.data.products import load_product

    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    split = load_product(
        {"name": "tile", "layout": "mvtec", "root": "industrial/magnetic_tile"}, data_root=str(SHARED_DATA)
    )
    ds = ImageDataset(split.train[:12], 224, 224)
    with torch.no_grad():
        features = fedmodel.extract(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    patches = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    picks = greedy_coreset(patches, 400, seed=0)
    assert len(set(picks.tolist())) == 400

    def coverage_radius(n: int) -> float:  # farthest patch from its nearest pick, in the full space
        return float(torch.cdist(patches, patches[picks[:n]]).min(dim=1).values.max())

    radii = [coverage_radius(n) for n in (25, 100, 400)]
    assert radii[0] > radii[1] > radii[2]
    # k-center beats a random subset of the same size at covering the bank.
    random = torch.randperm(len(patches), generator=torch.Generator().manual_seed(0))[:400]
    assert radii[2] < float(torch.cdist(patches, patches[random]).min(dim=1).values.max())


def test_a_memory_larger_than_the_patches_never_uploads_raw_patches():
    # 2 images × 16 positions = 32 patches, asked for 100 items: capped so every item averages >= 4 patches.
    torch.manual_seed(0)
    emb = torch.randn(2, 8, 4, 4)
    bank = reduce_memory(emb, MemoryReduceSettings("cluster_mean", size=100, min_cluster_size=4, kmeans_iters=10))
    assert 1 <= bank.items.shape[0] <= 8
    assert torch.all(bank.weights >= 4) and bank.weights.sum() <= 32
    patches = emb.permute(0, 2, 3, 1).reshape(-1, 8)
    assert not any((patches == item).all(1).any() for item in bank.items)


def test_when_no_cluster_is_large_enough_the_upload_is_the_mean_of_all_patches():
    points = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    items, mass = cluster_mean(points, 3, iters=5, min_cluster_size=3)
    assert torch.allclose(items, points.mean(0, keepdim=True)) and mass.tolist() == [3.0]

    with pytest.raises(ValueError, match="averages 4"):
        cluster_mean(points, 3, iters=5, min_cluster_size=4)


def test_min_images_per_item_drops_items_made_of_one_images_patches():
    # Image 0: four patches far from everything else (one image's outlier region); images 1-7 share the rest.
    g = torch.Generator().manual_seed(0)
    emb = 0.01 * torch.randn(8, 4, 2, 2, generator=g)
    emb[1:, 0] += torch.tensor([0.0, 5.0]).repeat(4)[:7, None, None]  # two groups among images 1-7
    emb[0] += 50.0
    kept = reduce_memory(emb, MemoryReduceSettings("cluster_mean", size=3, min_cluster_size=3, kmeans_iters=10))
    assert (kept.items.mean(dim=1) > 40).any()  # image 0's patches make an item of their own
    private = reduce_memory(
        emb, MemoryReduceSettings("cluster_mean", size=3, min_cluster_size=3, kmeans_iters=10, min_images_per_item=2)
    )
    assert not (private.items.mean(dim=1) > 40).any() and private.items.shape[0] >= 1
    assert private.weights.sum() == 28  # the other seven images' patches, all kept
    with pytest.raises(ValueError, match="of 9 or more images"):
        reduce_memory(emb, MemoryReduceSettings("cluster_mean", size=3, min_cluster_size=3, min_images_per_item=9))


def test_per_product_coreset_mean_shares_the_items_by_patches_not_by_spread():
    # Product a: 6 images, all patches nearly one point; product b: 3 images, widely spread, far away.
    # One k-center over both spends its items on b's spread; per product, a gets its share of the patches.
    g = torch.Generator().manual_seed(0)
    emb = torch.cat([0.01 * torch.randn(6, 4, 4, 4, generator=g), 100.0 + 5.0 * torch.randn(3, 4, 4, 4, generator=g)])
    products = ["a"] * 6 + ["b"] * 3
    whole = reduce_memory(emb, MemoryReduceSettings("coreset_mean", coreset_ratio=9 / 144, min_cluster_size=3))
    split = reduce_memory(
        emb, MemoryReduceSettings("coreset_mean", coreset_ratio=9 / 144, min_cluster_size=3), image_groups=products
    )
    near_a = [int((bank.items.norm(dim=1) < 1).sum()) for bank in (whole, split)]
    assert whole.items.shape[0] == split.items.shape[0] == 9 and near_a == [1, 6]
    assert torch.all(split.weights == 3) and split.num_images == 9
    assert all(item.norm() < 1 or bool((item > 80).all()) for item in split.items)  # no item mixes a and b
    # The raw coreset splits the same way.
    raw = reduce_memory(emb, MemoryReduceSettings("coreset", coreset_ratio=9 / 144), image_groups=products)
    assert int((raw.items.norm(dim=1) < 1).sum()) == 6


def test_a_product_with_fewer_images_than_an_item_averages_joins_the_largest():
    emb = torch.randn(11, 4, 4, 4)
    products = ["a"] * 6 + ["b"] * 3 + ["c"] * 2  # c's 2 images cannot make an item of 3 images on their own
    bank = reduce_memory(
        emb, MemoryReduceSettings("coreset_mean", coreset_ratio=0.05, min_cluster_size=3), image_groups=products
    )
    assert bank.items.shape[0] == round(0.05 * 176) and torch.all(bank.weights == 3)
    assert [len(i) for i in image_groups_of(products, 11, 3)] == [8, 3]
    with pytest.raises(ValueError, match="image_groups has 2 labels for 11 images"):
        reduce_memory(emb, MemoryReduceSettings("coreset_mean"), image_groups=["a", "b"])


def test_parts_side_by_side_repeat_the_shorter_part_and_split_back():
    patch = MemoryBank(torch.arange(10.0).view(5, 2), torch.full((5,), 3.0), num_images=4, releases=1)
    context = MemoryBank(-torch.arange(4.0).view(2, 2), torch.ones(2), num_images=4, releases=1)
    both = side_by_side([patch, context])
    assert both.items.shape == (5, 4) and both.releases == 2  # each part is a release of its own
    assert torch.equal(both.weights, patch.weights) and both.num_images == 4
    # The context part's two items, cyclically: a repeated item changes no nearest distance.
    assert torch.equal(both.items[:, 2:], context.items[[0, 1, 0, 1, 0]])
    first, second = split_parts(both, 2)
    assert torch.equal(first.items, patch.items) and torch.equal(second.items, context.items[[0, 1, 0, 1, 0]])
    # Before aggregation the repeats go, their weights summed: K-means meets no exact ties.
    distinct = distinct_items(second)
    assert distinct.items.shape == (2, 2) and sorted(distinct.weights.tolist()) == [6.0, 9.0]
