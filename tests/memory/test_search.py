import numpy as np
import torch

from feddymem.memory.search import MemoryIndex, nearest_neighbour_spread


def _clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(40, dim, generator=g) * 4
    return centres[torch.randint(40, (n,), generator=g)] + torch.randn(n, dim, generator=g)


def test_approximate_index_finds_nearly_the_exact_nearest_distances_with_far_fewer_comparisons():
    memory, queries = _clustered(6000, 32, 0), _clustered(2000, 32, 1)
    exact = MemoryIndex(memory)
    approx = MemoryIndex(memory, approximate_above=4096, nprobe=8)
    assert not exact.approximate and approx.approximate
    d_exact, _ = exact.search(queries, 1)
    d_approx, i_approx = approx.search(queries, 1)
    # Never closer than the truth, and the truth for most queries; an approximate nearest is still near.
    assert torch.all(d_approx >= d_exact - 1e-3)
    assert (d_approx - d_exact).abs().le(1e-3).float().mean() > 0.8
    assert float(d_approx.sqrt().mean()) < 1.05 * float(d_exact.sqrt().mean())
    assert torch.allclose(d_approx[:, 0], (queries - memory[i_approx[:, 0]]).pow(2).sum(1), rtol=1e-4, atol=1e-3)
    # Small memories stay exact.
    assert not MemoryIndex(memory[:100], approximate_above=4096).approximate


def test_lists_trained_on_a_small_sample_still_find_the_nearest_items():
    memory, queries = _clustered(20000, 32, 3), _clustered(1000, 32, 4)
    small = MemoryIndex(memory, approximate_above=4096, train_per_list=32)
    assert small.index.cp.max_points_per_centroid == 32
    d_exact, _ = MemoryIndex(memory).search(queries, 1)
    d_small, _ = small.search(queries, 1)
    assert (d_small - d_exact).abs().le(1e-3).float().mean() > 0.8


def test_approximate_index_answers_every_query_even_when_visited_lists_are_short():
    memory = _clustered(5000, 8, 2)
    index = MemoryIndex(memory, approximate_above=100, nprobe=1)
    far = torch.full((5, 8), 1e3)  # far from every list: still k real neighbours, sorted
    dist, idx = index.search(far, 9)
    assert (idx >= 0).all() and np.all(np.diff(dist.numpy(), axis=1) >= 0)


def test_nearest_neighbour_spread_is_the_std_of_each_distinct_item_s_nearest_distance():
    # On a line at 0, 1, 3, 7: nearest distances 1, 1, 2, 4. A repeated item is not its own neighbour.
    line = torch.tensor([[0.0], [1.0], [3.0], [7.0], [7.0], [3.0]])
    assert nearest_neighbour_spread(line) == torch.tensor([1.0, 1.0, 2.0, 4.0]).std().item()
    # Scaling the memory scales its spread: scores divided by it do not depend on the features' scale.
    assert abs(nearest_neighbour_spread(10 * line) - 10 * nearest_neighbour_spread(line)) < 1e-4
    # Undefined (one distinct item; every nearest distance equal): 1, so a score is left as it is.
    assert nearest_neighbour_spread(torch.zeros(5, 3)) == 1.0
    assert nearest_neighbour_spread(torch.tensor([[0.0], [1.0], [2.0]])) == 1.0
