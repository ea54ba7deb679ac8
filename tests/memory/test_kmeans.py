import faiss
import pytest
import torch

from feddymem.memory.kmeans import kmeans, resolve_gpu


def test_faiss_kmeans_finds_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(40, 2) for c in centres])
    result = kmeans(points, 3, iters=20, restarts=5)
    found = result.centroids[result.centroids[:, 0].argsort()]
    assert torch.cdist(found, centres).min(dim=1).values.max() < 0.2
    assert result.assignments.shape == (120,) and result.objective > 0
    assert not result.gpu or faiss.get_num_gpus() > 0


def test_fewer_points_than_clusters_is_clamped():
    result = kmeans(torch.randn(5, 4), 50)
    assert result.centroids.shape == (5, 4)


def test_weights_pull_centroid():
    points = torch.tensor([[0.0], [1.0]])
    heavy = kmeans(points, 1, weights=torch.tensor([9.0, 1.0]), iters=5)
    assert abs(heavy.centroids.item() - 0.1) < 1e-5


def test_warm_start_from_previous_centroids():
    torch.manual_seed(0)
    points = torch.randn(500, 8)
    first = kmeans(points, 16, iters=25, seed=1)
    warm = kmeans(points, 16, iters=1, init=first.centroids, seed=2)
    cold = kmeans(points, 16, iters=1, seed=2)
    assert warm.objective <= first.objective * 1.01 < cold.objective


def test_gpu_setting():
    assert resolve_gpu("false") is False
    assert resolve_gpu("auto") == (faiss.get_num_gpus() > 0)
    if faiss.get_num_gpus() == 0:
        with pytest.raises(RuntimeError, match="FAISS sees no GPU"):
            resolve_gpu("true")
