import pytest

from feddymem.data.partition import hold_out, partition_clients, per_product_sample
from feddymem.data.products import ProductSplit, Sample
from feddymem.errors import DataError


def _products(sizes):
    return [
        ProductSplit(
            f"p{j}", train=[Sample(f"p{j}/{i}", 0, f"p{j}") for i in range(n)], test=[Sample(f"p{j}/t", 1, f"p{j}")]
        )
        for j, n in enumerate(sizes)
    ]


def test_dirichlet_split_is_seeded_complete_and_skewed():
    products = _products([200, 100])
    clients = partition_clients(products, 5, alpha=0.5, seed=3, min_train=5)
    again = partition_clients(products, 5, alpha=0.5, seed=3, min_train=5)
    assert [c.train for c in clients] == [c.train for c in again]
    paths = [s.path for c in clients for s in c.train]
    assert len(paths) == 300 == len(set(paths))  # every image once
    assert all(len(c.train) >= 5 for c in clients)
    shares = [c.counts().get("p0", 0) for c in clients]
    assert max(shares) > 2 * min(shares)  # alpha 0.5 is skewed
    for c in clients:  # test set = test images of the products held
        assert {s.product for s in c.test} == set(c.products)


def test_table_partition():
    clients = partition_clients(_products([10, 20]), 2, method="table", table=[[1.0, 0.0], [0.0, 1.0]])
    assert clients[0].products == ["p0"] and len(clients[0].train) == 10
    assert clients[1].products == ["p1"] and len(clients[1].train) == 20


def test_client_without_images_is_an_error():
    with pytest.raises(DataError, match="client 1 receives 0 training images"):
        partition_clients(_products([10]), 2, method="table", table=[[1.0], [0.0]])
    with pytest.raises(DataError, match="cannot give each of 50 clients at least 5"):
        partition_clients(_products([20]), 50, alpha=0.5, min_train=5, max_tries=5)


def test_hold_out_takes_a_seeded_share_of_every_product_and_never_all_of_it():
    clients = partition_clients(_products([200, 100, 3]), 3, method="table", table=[[1, 0, 0], [0, 1, 0], [0, 0.5, 1]])
    before = {c.client_id: {s.path for s in c.train} for c in clients}
    hold_out(clients, 0.1, seed=1)
    again = partition_clients(_products([200, 100, 3]), 3, method="table", table=[[1, 0, 0], [0, 1, 0], [0, 0.5, 1]])
    hold_out(again, 0.1, seed=1)
    assert [c.holdout for c in clients] == [c.holdout for c in again]
    for c in clients:
        held, kept = {s.path for s in c.holdout}, {s.path for s in c.train}
        assert not held & kept and held | kept == before[c.client_id]  # a split, nothing lost
        for product, n in {p: sum(s.product == p for s in c.train + c.holdout) for p in c.products}.items():
            h = sum(s.product == product for s in c.holdout)
            assert h == (max(1, round(0.1 * n)) if n >= 2 else 0) and h < n
    assert [len(c.holdout) for c in clients] == [20, 7, 3 + 1]  # 200 → 20; 67 → 7; 33 → 3 and 3 → 1
    unchanged = partition_clients(_products([20]), 2)
    hold_out(unchanged, 0.0)
    assert all(not c.holdout for c in unchanged) and sum(len(c.train) for c in unchanged) == 20


def test_per_product_sample_takes_at_most_the_limit_of_each_product_seeded():
    samples = [Sample(f"a{i}.png", 0, "a") for i in range(10)] + [Sample(f"b{i}.png", 0, "b") for i in range(2)]
    sample = per_product_sample(samples, 4, seed=1)
    assert sample == sorted(sample) and len(set(sample)) == 6
    assert sum(samples[i].product == "a" for i in sample) == 4 and {10, 11} <= set(sample)  # b: both
    assert per_product_sample(samples, 4, seed=1) == sample and per_product_sample(samples, 4, seed=2) != sample
    assert per_product_sample(samples, 0) == list(range(12))  # 0: every sample
