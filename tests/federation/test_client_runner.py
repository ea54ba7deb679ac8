"""The client runner and the server without any engine: a whole round in plain Python on real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FAST
from feddymem.config import load_config
from feddymem.data.check import plan_data
from feddymem.data.feature_cache import FeatureCache
from feddymem.federation.client import Loaders, build_clients
from feddymem.federation.client_runner import ClientRunner
from feddymem.federation.evaluation import Evaluator
from feddymem.federation.server import Server
from feddymem.federation.strategies import make_strategy


def _runner(yaml, *extra):
    cfg = load_config([f"dataset={yaml}", "data.num_clients=2", "data.holdout_fraction=0.25", *FAST, *extra])
    plan = plan_data(cfg)
    strategy = make_strategy(cfg)
    clients = build_clients(cfg, plan.clients, [0, 1], strategy)
    loaders = Loaders(cfg, FeatureCache(clients[0].module.model.extract, batch_size=8))
    runner = ClientRunner(cfg, strategy, clients, loaders, Evaluator(cfg, loaders))
    return cfg, runner, Server(cfg, strategy, [len(c.train) for c in plan.clients])


def test_two_rounds_without_an_engine(synthetic_yaml):
    _, runner, server = _runner(synthetic_yaml, "federation.min_clients=2")
    for round_idx in (0, 1):
        before = [c.module.model.generator.conv.weight.detach().clone() for c in runner.clients]
        results = [runner.run_round(c, round_idx) for c in runner.training_clients()]
        assert all(r.error is None and r.upload.payload is not None for r in results)
        after = [c.module.model.generator.conv.weight for c in runner.clients]
        trained = [not torch.equal(b, a) for b, a in zip(before, after, strict=True)]
        assert trained == [round_idx > 0] * 2  # round 0 builds the first memory from untrained generators
        assert all((r.train_loss == r.train_loss) == (round_idx > 0) for r in results)  # NaN without training
        reply = server.step(results, round_idx)
        assert reply.error is None and reply.participants == [0, 1]
        seconds = runner.apply(reply)
        assert set(seconds) == {0, 1}
        for client in runner.clients:
            assert torch.equal(client.module.model.memory, reply.memory)  # every client scores with it
            ev = runner.evaluate(client, round_idx, tested=True)
            assert 0 <= ev.criterion <= 1 and ev.test is not None and 0 <= ev.test.image_auroc <= 1
            assert ev.normal.count == len(client.normal_set) and client.kept is not None
        record = server.record(
            round_idx,
            reply,
            results,
            [runner.evaluate(c, round_idx, True) for c in runner.clients],
            None,
        )
        assert record.bytes_up == sum(r.upload.payload.nbytes for r in results) > 0


def test_a_failing_or_slow_client_is_reported_not_raised(synthetic_yaml, monkeypatch):
    _, runner, _ = _runner(synthetic_yaml)
    client = runner.clients[1]

    def lost_disk():
        raise OSError("site 1 lost its disk")

    monkeypatch.setattr(type(client.memory_set), "__getitem__", lambda self, i: lost_disk())
    result = runner.run_round(client, 0)
    assert result.error == "OSError: site 1 lost its disk" and result.upload.payload is None
    monkeypatch.undo()

    _, slow, _ = _runner(synthetic_yaml, "federation.client_timeout_s=1e-6")
    result = slow.run_round(slow.clients[0], 1)
    assert result.error.startswith("ClientTimeout: client 0 ran past") and result.upload.payload is None


@pytest.mark.parametrize("keep", ["best", "last"])
def test_keep_best_keeps_the_earliest_of_equal_criteria_unless_told_to_keep_the_last(synthetic_yaml, keep):
    _, runner, _ = _runner(synthetic_yaml, f"selection.keep={keep}")
    client = runner.clients[0]
    kept = [runner.keep_best(client, r, c) for r, c in enumerate([0.7, 0.9, 0.9, 0.8, float("nan")])]
    assert kept == ([0, 1, 1, 1, 4] if keep == "best" else [0, 1, 2, 3, 4])  # NaN: nothing to judge by
    assert np.isnan(client.kept.criterion)


def test_the_kept_state_is_scored_with_the_normaliser_fitted_when_it_was_kept(synthetic_yaml, monkeypatch):
    _, runner, server = _runner(synthetic_yaml, "federation.min_clients=2")
    results = [runner.run_round(c, 0) for c in runner.training_clients()]
    runner.apply(server.step(results, 0))
    client = runner.clients[0]
    evaluation = runner.evaluate(client, 0, tested=True)
    assert client.kept.normalizer["stats"] == evaluation.normalizer
    assert client.kept.normalizer == runner.evaluator.held_out(client)[1].state()  # the pooled fallback too

    def refit(_client):
        raise AssertionError("the kept state's normaliser was fitted again")

    monkeypatch.setattr(runner.evaluator, "held_out", refit)
    kept, _ = runner.test_kept(client)
    assert kept.image_auroc == evaluation.test.image_auroc and kept.scores == evaluation.test.scores
    monkeypatch.undo()
    client.kept.normalizer = None  # an older checkpoint: fitted again, to the same scores
    assert runner.test_kept(client)[0].scores == evaluation.test.scores
