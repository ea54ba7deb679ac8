"""(ε, δ) of noisy uploads, from Opacus's Rényi-DP accountant.

A client's uploads are a composition of Gaussian mechanisms, every one with the same noise multiplier σ
(:mod:`feddymem.memory.noise`) and no subsampling (each release sees every image of the client). The
RDP accountant composes them exactly and converts to (ε, δ); ε depends only on σ, δ and how many releases
were made, so a round's ε and the run's ε come from the release counts the clients report.
"""

from __future__ import annotations

import math

from opacus.accountants import RDPAccountant


def epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """ε after ``releases`` Gaussian mechanisms of noise multiplier σ at ``delta``; ``inf`` without noise,
    0 with no release."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), 1.0, int(releases))]  # (σ, sample rate, steps)
    return float(accountant.get_epsilon(delta))
