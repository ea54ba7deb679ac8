"""ε from Opacus's RDP accountant: monotone in the noise and the releases, below the textbook RDP bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from feddymem.privacy.accountant import epsilon


def test_no_release_costs_nothing_and_no_noise_protects_nothing():
    assert epsilon(1.0, 0, 1e-5) == 0.0
    assert epsilon(0.0, 3, 1e-5) == math.inf


@pytest.mark.parametrize("sigma,releases", [(1.0, 4), (2.0, 8), (4.0, 1)])
def test_epsilon_is_at_most_the_plain_rdp_conversion(sigma, releases):
    delta = 1e-5
    # Composition of T Gaussian mechanisms: RDP ε(α) = T·α / (2σ²); (ε, δ) ≤ min_α ε(α) + log(1/δ) / (α − 1).
    alphas = np.linspace(1.01, 200, 20000)
    bound = float(np.min(releases * alphas / (2 * sigma**2) + math.log(1 / delta) / (alphas - 1)))
    eps = epsilon(sigma, releases, delta)
    assert 0 < eps <= bound + 1e-6
    assert eps > 0.5 * bound  # the same order: the accountant is not returning something unrelated


def test_more_noise_less_epsilon_more_releases_more_epsilon():
    assert epsilon(2.0, 4, 1e-5) < epsilon(1.0, 4, 1e-5)
    assert epsilon(1.0, 8, 1e-5) > epsilon(1.0, 4, 1e-5)
    assert epsilon(1.0, 4, 1e-3) < epsilon(1.0, 4, 1e-6)
