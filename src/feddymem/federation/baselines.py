"""The FedAvg / FedProx baselines' pieces: averaging generator parameters and the proximal term.

FedDyMem itself never averages parameters; these exist so that the benchmarks compare it with the
usual alternatives through the same orchestrator (``method=fedavg`` / ``method=fedprox``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def average_parameters(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts with the same names and shapes (FedAvg's server step)."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states and {len(weights)} weights")
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for name, first in states[0].items():
        stacked = torch.stack([s[name].double() for s in states])
        out[name] = torch.tensordot(w, stacked, dims=1).to(first.dtype)
    return out


def proximal_term(params: Iterable[tuple[str, torch.Tensor]], anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ ||w - w_global||² over named parameters (FedProx adds mu/2 times this to the local loss)."""
    terms = [((p - anchor[name].to(p)) ** 2).sum() for name, p in params]
    return torch.stack(terms).sum() if terms else torch.zeros(())
