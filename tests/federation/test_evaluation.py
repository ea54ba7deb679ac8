"""The held-out criterion's rule for scores that rank nothing (the real collapse end to end:
tests/federation/test_selection.py)."""

import numpy as np
import torch

from feddymem.federation.evaluation import scores_rank_nothing


def test_rounding_noise_of_a_generator_collapsed_onto_one_point_ranks_nothing():
    # Measured in a real run whose generator collapsed onto its bias (|b| = 0.0027, 152 channels): every
    # memory item is b up to float sums, and the image scores are float32 rounding noise between 2e-8 and 1e-6.
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(152, generator=g)
    memory = (0.0027 * bias / bias.norm()).repeat(144, 1)
    scores = np.r_[np.full(40, 9.5367431640625e-07), np.random.default_rng(0).uniform(2e-8, 9.5e-7, 40)]
    assert np.ptp(scores) > 1e-5 * np.abs(scores).max()  # a relative tolerance on the scores cannot absorb it ...
    assert scores_rank_nothing(scores, memory)  # ... the memory's own scale can
    assert not scores_rank_nothing(scores * 1e3, memory)  # a thousand times that is a ranking


def test_constant_scores_rank_nothing_and_small_real_spreads_do():
    memory = torch.randn(64, 160, generator=torch.Generator().manual_seed(1)) * 3  # items of norm ~38
    spread = np.abs(np.random.default_rng(0).normal(8.0, 2.0, 100))
    assert not scores_rank_nothing(spread, memory)
    assert not scores_rank_nothing(spread / 10, memory)  # small, yet above the rounding of a zero distance
    assert scores_rank_nothing(np.full(100, 7.25), memory)
    assert scores_rank_nothing(np.full(100, 7.25) * (1 + 1e-7 * np.arange(100)), torch.empty(0, 160))
