import math

import numpy as np
import pytest
import torch

from feddymem.metrics import AUPRO, AUROC, ScoreNormalizer, aupro_score, auroc_score


def test_aupro_perfect_random_and_inverted():
    masks = np.zeros((2, 32, 32))
    masks[0, 5:10, 5:10] = 1
    masks[1, 20:30, 1:4] = 1
    assert aupro_score(masks, masks) == 1.0
    assert aupro_score(-masks, masks) == 0.0
    rng = np.random.default_rng(0)
    assert 0.1 < aupro_score(rng.random((2, 32, 32)), masks) < 0.2  # ≈ 0.15 for a random map
    assert math.isnan(aupro_score(rng.random((1, 8, 8)), np.zeros((1, 8, 8))))


def test_aupro_weights_regions_equally():
    # One big region fully found, one small region missed: PRO ≈ 0.5, however large the big one.
    masks = np.zeros((1, 64, 64))
    masks[0, :30, :30] = 1
    masks[0, 50:52, 50:52] = 1
    maps = np.full((1, 64, 64), 0.5)
    maps[0, :30, :30] = 1
    maps[0, 50:52, 50:52] = 0  # scored below every normal pixel
    assert abs(aupro_score(maps, masks) - 0.5) < 0.02


def test_metric_wrappers_accumulate_batches():
    auroc, aupro = AUROC(), AUPRO()
    auroc.update(torch.tensor([10.0, 20.0]), torch.tensor([0, 1]))
    auroc.update(torch.tensor([15.0, 300.0]), torch.tensor([0, 1]))
    assert auroc.compute().item() == 1.0  # raw scores far outside [0, 1] are ranked, not squashed
    masks = torch.zeros(2, 16, 16)
    masks[0, 2:6, 2:6] = 1
    aupro.update(masks * 5, masks)
    assert aupro.compute().item() == 1.0
    only_normal = AUROC()
    only_normal.update(torch.tensor([1.0]), torch.tensor([0]))
    assert math.isnan(only_normal.compute().item())


def test_normal_threshold_from_normal_scores_only():
    from feddymem.metrics.threshold import normal_threshold

    scores = np.arange(1, 101, dtype=float)  # normal images only: no anomaly needed
    assert normal_threshold(scores, percentile=99.0) == pytest.approx(99.01)
    assert normal_threshold(scores, k_sigma=3.0) == pytest.approx(scores.mean() + 3 * scores.std())
    with pytest.raises(ValueError, match="at least one normal score"):
        normal_threshold([])


def test_one_threshold_for_all_sites_from_their_summaries_alone():
    from feddymem.metrics.threshold import NormalScores, normal_threshold, pooled_threshold

    rng = np.random.default_rng(0)
    sites = [rng.normal(m, s, n) for m, s, n in ((1.0, 0.2, 40), (1.5, 0.5, 10), (0.8, 0.1, 25))]
    pooled = np.concatenate(sites)
    # mean + k·std is exact from counts and moments: the same as over every score pooled.
    summaries = [NormalScores.of(s, k_sigma=3.0) for s in sites]
    assert summaries[1].count == 10 and summaries[1].threshold == pytest.approx(normal_threshold(sites[1], k_sigma=3.0))
    assert pooled_threshold(summaries, k_sigma=3.0) == pytest.approx(normal_threshold(pooled, k_sigma=3.0))
    # A percentile is not: the sites' own thresholds, averaged by count.
    summaries = [NormalScores.of(s, 99.0) for s in sites]
    expected = sum(len(s) * normal_threshold(s, 99.0) for s in sites) / len(pooled)
    assert pooled_threshold(summaries) == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least one normal score"):
        pooled_threshold([NormalScores(0, 0.0, 0.0, 0.0)])


def test_auroc_score_matches_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    from feddymem.metrics import auroc_score

    rng = np.random.default_rng(0)
    for n in (7, 500, 20_000):
        scores = rng.integers(0, 6, n).astype(np.float32)  # many ties
        labels = rng.random(n) < 0.3
        labels[:2] = [True, False]
        assert auroc_score(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert np.isnan(auroc_score(np.ones(4), np.zeros(4)))


def test_per_product_normalisation_puts_two_products_on_one_scale():
    # Product "a" scores around 1, product "b" around 100 (ten times the spread): raw pooled ranking fails.
    rng = np.random.default_rng(0)
    held_a, held_b = rng.normal(1, 0.1, 50), rng.normal(100, 1.0, 50)
    normalizer = ScoreNormalizer.fit(np.r_[held_a, held_b], ["a"] * 50 + ["b"] * 50)
    assert normalizer.params("a") == pytest.approx((1, 0.1), rel=0.2)
    assert normalizer.params("b") == pytest.approx((100, 1.0), rel=0.2)
    normal_a, normal_b = rng.normal(1, 0.1, 100), rng.normal(100, 1.0, 100)
    anomalous_a, anomalous_b = rng.normal(1.5, 0.1, 100), rng.normal(105, 1.0, 100)
    scores = np.r_[normal_a, normal_b, anomalous_a, anomalous_b]
    products = ["a"] * 100 + ["b"] * 100 + ["a"] * 100 + ["b"] * 100
    labels = np.r_[np.zeros(200), np.ones(200)]
    assert auroc_score(scores, labels) < 0.8  # every b image above every a image
    assert auroc_score(normalizer(scores, products), labels) > 0.99
    # One held-out image of a product: its spread comes from the pooled scores; unseen products too.
    single = ScoreNormalizer.fit([1.0, 2.0, 3.0, 10.0], ["a", "a", "a", "b"])
    assert single.params("b") == (10.0, pytest.approx(np.std([1.0, 2.0, 3.0, 10.0])))
    assert single.params("c") == single.pooled
    assert single.to_dict() == {"a": [2.0, pytest.approx(np.std([1.0, 2.0, 3.0]))], "b": [10.0, single.pooled[1]]}
    # Its state (plain lists, pooled fallback included) gives the same normaliser back.
    again = ScoreNormalizer.from_state(single.state())
    assert again == single and again.params("c") == single.pooled
