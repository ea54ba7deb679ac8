"""Each federation strategy on small synthetic tensors: no backbone, no data set, no engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from feddymem.config import load_config
from feddymem.federation.messages import ServerLimits, ServerReply
from feddymem.federation.strategies import (
    Centralized,
    FedAvg,
    FedProx,
    Local,
    PatchCore,
    Strategy,
    make_strategy,
)
from feddymem.federation.upload import UploadRejected
from feddymem.memory.reduce import MemoryBank, side_by_side, split_parts

DIM = 8


class FakeClient:
    """A ClientSide with a 1×1 conv generator and a memory of random items around ``centre``."""

    def __init__(self, centre: float, items: int = 40, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.generator = nn.Conv2d(DIM, DIM, 1)
        self.centre, self.items, self.memory, self.builds = centre, items, None, 0

    def generator_state(self):
        return self.generator.state_dict()

    def load_generator(self, state):
        self.generator.load_state_dict(state)

    def set_memory(self, items):
        self.memory = items

    def build_memory(self):
        self.builds += 1
        items = self.centre + 0.1 * torch.randn(self.items, DIM)
        return MemoryBank(items, torch.full((self.items,), 3.0), num_images=5)


def _cfg(*overrides):
    return load_config(["dataset=shared_industrial", "server.size=16", "server.kmeans_iters=5", *overrides])


def _limits(client: FakeClient) -> ServerLimits:
    return ServerLimits(
        memory_dim=DIM, max_items=1000, max_bytes=2**20, global_items=16, generator=client.generator_state()
    )


def test_make_strategy_picks_by_method_name():
    for method, kind in [
        ("feddymem", Strategy),
        ("local", Local),
        ("centralized", Centralized),
        ("patchcore", PatchCore),
        ("fedavg", FedAvg),
        ("fedprox", FedProx),
    ]:
        strategy = make_strategy(_cfg(f"method={method}"))
        assert type(strategy) is kind and strategy.name == method
    assert PatchCore.pooled and not PatchCore.trains and PatchCore.single_round
    assert Centralized.pooled and Centralized.trains and not Local.pooled


def test_feddymem_sends_reduced_memories_and_hands_back_a_kmeans_memory():
    strategy = make_strategy(_cfg())
    clients = {k: FakeClient(centre=float(k), seed=k) for k in range(3)}
    uploads = {k: strategy.client_update(c, 0) for k, c in clients.items()}
    assert all(
        u.memory_items == 40 and u.num_images == 5 and isinstance(u.payload, MemoryBank) for u in uploads.values()
    )
    for k, u in uploads.items():
        strategy.validate(k, u.payload, _limits(clients[k]))
    payloads = {k: u.payload for k, u in uploads.items()}
    reply = strategy.aggregate(payloads, {0: 5, 1: 5, 2: 5}, 0, None, _limits(clients[0]))
    assert reply.participants == [0, 1, 2] and reply.memory.shape == (16, DIM) and reply.generator is None
    # The K-means centroids cover the three clients' clusters.
    nearest = torch.cdist(reply.memory, torch.tensor([[0.0] * DIM, [1.0] * DIM, [2.0] * DIM])).argmin(1)
    assert set(nearest.tolist()) == {0, 1, 2}
    strategy.apply(clients[0], reply)
    assert torch.equal(clients[0].memory, reply.memory)


def test_feddymem_rebuild_once_sends_nothing_after_round_0():
    strategy = make_strategy(_cfg("memory.rebuild=once"))
    client = FakeClient(0.0)
    assert strategy.uploads_in(0) and not strategy.uploads_in(1)
    assert strategy.client_update(client, 1).payload is None and client.builds == 0


def test_server_rejects_malformed_memories():
    strategy, client = make_strategy(_cfg()), FakeClient(0.0)
    bad = MemoryBank(torch.full((4, DIM), float("nan")), torch.ones(4), 1)
    with pytest.raises(UploadRejected, match="client 3 rejected: non-finite"):
        strategy.validate(3, bad, _limits(client))
    with pytest.raises(UploadRejected, match="expected a memory bank"):
        strategy.validate(3, {"w": torch.ones(1)}, _limits(client))


def test_local_and_centralized_keep_their_memory_and_send_nothing():
    for method in ("local", "centralized", "patchcore"):
        strategy, client = make_strategy(_cfg(f"method={method}")), FakeClient(1.0)
        update = strategy.client_update(client, 0)
        assert update.payload is None and update.memory_items == 40 and client.memory.shape == (40, DIM)
        assert not strategy.uploads_in(0)


def test_fedavg_averages_generators_by_client_size_and_rebuilds_local_memories():
    strategy = make_strategy(_cfg("method=fedavg"))
    clients = {k: FakeClient(0.0, seed=k) for k in range(2)}
    uploads = {k: strategy.client_update(c, 1).payload for k, c in clients.items()}
    uploads[0]["weight"].add_(100.0)  # the upload is a copy: the client's own weights must not change
    assert not torch.equal(uploads[0]["weight"], clients[0].generator.weight)
    for k in clients:
        strategy.validate(k, uploads[k], _limits(clients[k]))
    reply = strategy.aggregate(uploads, {0: 1, 1: 3}, 1, None, _limits(clients[0]))
    expected = 0.25 * uploads[0]["weight"] + 0.75 * uploads[1]["weight"]
    assert torch.allclose(reply.generator["weight"], expected) and reply.memory is None
    strategy.apply(clients[1], reply)
    assert torch.allclose(clients[1].generator.weight, expected) and clients[1].builds == 1
    wrong = {"weight": torch.ones(2, 2), "bias": uploads[0]["bias"]}
    with pytest.raises(UploadRejected, match="'weight' is \\(2, 2\\)"):
        strategy.validate(0, wrong, _limits(clients[0]))
    assert make_strategy(_cfg("method=fedavg")).prox_mu == 0.0


def test_fedprox_is_fedavg_with_a_proximal_weight():
    strategy = make_strategy(_cfg("method=fedprox", "federation.prox_mu=0.3"))
    assert isinstance(strategy, FedAvg) and strategy.prox_mu == pytest.approx(0.3)
    reply = ServerReply([0], generator=FakeClient(0.0).generator_state())
    client = FakeClient(0.0, seed=5)
    strategy.apply(client, reply)
    assert torch.equal(client.generator.weight, reply.generator["weight"])


def test_patch_and_context_parts_are_aggregated_each_on_its_own():
    strategy = make_strategy(_cfg())
    clients = {k: FakeClient(centre=float(k), seed=k) for k in range(3)}
    # Each upload: patch items around the client's centre, context items around −10 × it, side by side.
    payloads = {}
    for k, c in clients.items():
        patch = c.build_memory()
        context = MemoryBank(-10 * patch.items[:20], patch.weights[:20], patch.num_images)
        payloads[k] = side_by_side([patch, context])
    limits = ServerLimits(memory_dim=2 * DIM, memory_parts=2, max_items=1000, max_bytes=2**20, global_items=16)
    for k, bank in payloads.items():
        strategy.validate(k, bank, limits)
    reply = strategy.aggregate(payloads, {0: 5, 1: 5, 2: 5}, 0, None, limits)
    assert reply.memory.shape == (16, 2 * DIM)
    # The patch half is exactly the K-means of the patch items alone (a joint K-means would differ).
    alone = strategy.aggregate(
        {k: split_parts(b, 2)[0] for k, b in payloads.items()}, {0: 5, 1: 5, 2: 5}, 0, None, _limits(clients[0])
    )
    assert torch.equal(reply.memory[:, :DIM], alone.memory)
    # The context half covers the three clients' context clusters, and only them.
    targets = torch.tensor([[0.0] * DIM, [-10.0] * DIM, [-20.0] * DIM])
    assert set(torch.cdist(reply.memory[:, DIM:], targets).argmin(1).tolist()) == {0, 1, 2}
