"""The baselines and ablations through the real orchestrator: what crosses the client boundary for each."""

from __future__ import annotations

import pytest
import torch

from conftest import FAST
from feddymem.config import load_config
from feddymem.errors import FedDyMemError
from feddymem.federation.baselines import average_parameters, proximal_term
from feddymem.federation.orchestrator import FederatedOrchestrator
from feddymem.federation.upload import payload_bytes
from feddymem.io import load_checkpoint
from feddymem.trained import load_trained


def _run(tmp_path, yaml, name, *extra):
    cfg = load_config([f"dataset={yaml}", "data.num_clients=3", *FAST, *extra])
    orch = FederatedOrchestrator(cfg, tmp_path / name)
    return orch, orch.run()


def _generator_bytes(orch) -> int:
    return payload_bytes(orch.clients[0].module.model.generator.state_dict())


def test_average_parameters_and_proximal_term():
    a, b = {"w": torch.zeros(2, 2)}, {"w": torch.ones(2, 2)}
    assert torch.allclose(average_parameters([a, b], [3, 1])["w"], torch.full((2, 2), 0.25))
    with pytest.raises(ValueError, match="one weight per state"):
        average_parameters([a, b], [1])
    params = [("w", torch.ones(2, 2, requires_grad=True))]
    term = proximal_term(params, a)
    assert term.item() == 4.0 and term.requires_grad


def test_local_clients_share_nothing_and_keep_their_own_memory(tmp_path, synthetic_yaml):
    orch, summary = _run(tmp_path, synthetic_yaml, "local", "method=local", "federation.rounds=1")
    assert all(r["bytes_up"] == 0 and r["bytes_down"] == 0 for r in summary["rounds"])
    assert (
        orch.global_memory is None
        and load_checkpoint(tmp_path / "local/checkpoints/last.ckpt")["global_memory"] is None
    )
    memories = [c.module.model.memory for c in orch.clients]
    assert not torch.equal(memories[0], memories[1])
    assert all(0 <= c["image_auroc"] <= 1 for c in summary["final"]["clients"].values())


def test_centralized_trains_one_model_on_pooled_data(tmp_path, synthetic_yaml):
    orch, summary = _run(tmp_path, synthetic_yaml, "central", "method=centralized", "federation.rounds=1")
    pooled = sum(len(c.train) for c in orch.all_clients)
    assert len({id(c.module) for c in orch.clients}) == 1
    assert all(len(c.train_set) == len(c.memory_set) == pooled for c in orch.clients)
    assert all(0 < len(c.normal_set) == len(c.data.holdout) < pooled for c in orch.clients)  # own held-out images
    last = summary["rounds"][-1]["clients"]
    assert last[0]["time_s"] > 0 and last[1]["time_s"] == last[2]["time_s"] == 0.0
    assert set(last) == {0, 1, 2} and all("image_auroc" in c for c in last.values())
    assert summary["rounds"][-1]["bytes_up"] == 0


def test_fedavg_averages_generators_and_keeps_local_memories(tmp_path, synthetic_yaml):
    orch, summary = _run(tmp_path, synthetic_yaml, "fedavg", "method=fedavg", "federation.rounds=1")
    for client in orch.clients:
        state = client.module.model.generator.state_dict()
        assert all(torch.equal(state[k].cpu(), v) for k, v in orch.global_generator.items())
    assert not torch.equal(orch.clients[0].module.model.memory, orch.clients[1].module.model.memory)
    per_client = summary["rounds"][-1]["clients"][0]
    assert per_client["bytes_up"] == per_client["bytes_down"] == _generator_bytes(orch)
    assert orch.global_memory is None
    with pytest.raises(FedDyMemError, match="has no global memory .method=fedavg.*--client K"):
        load_trained(tmp_path / "fedavg/checkpoints/last.ckpt", None)
    assert load_trained(tmp_path / "fedavg/checkpoints/last.ckpt", 1).model.has_memory


@pytest.mark.slow
def test_fedprox_term_pulls_towards_the_global_generator_and_survives_resume(tmp_path, synthetic_yaml):
    lr = "optim.lr=1e-2"
    avg, _ = _run(tmp_path, synthetic_yaml, "avg", "method=fedavg", "federation.rounds=2", lr)
    prox, summary = _run(
        tmp_path,
        synthetic_yaml,
        "prox",
        "method=fedprox",
        "federation.prox_mu=100",
        "federation.rounds=2",
        lr,
        "checkpoint.keep=all",
    )
    start = load_checkpoint(tmp_path / "prox/checkpoints/round_001.ckpt")["global_generator"]

    def drift(orch):
        return sum(((orch.global_generator[k] - v) ** 2).sum().item() for k, v in start.items())

    assert 0 < drift(prox) < drift(avg)
    # Stopped after round 1 and resumed: the anchor comes back from the checkpoint, the result is the same.
    cfg = load_config(
        [
            f"dataset={synthetic_yaml}",
            "data.num_clients=3",
            *FAST,
            "method=fedprox",
            "federation.prox_mu=100",
            "federation.rounds=1",
            lr,
        ]
    )
    FederatedOrchestrator(cfg, tmp_path / "prox2").run()
    cfg.federation.rounds = 2
    resumed = FederatedOrchestrator(cfg, tmp_path / "prox2", resume=True)
    again = resumed.run()
    assert all(torch.equal(resumed.global_generator[k], v) for k, v in prox.global_generator.items())
    assert again["final"]["mean_image_auroc"] == summary["final"]["mean_image_auroc"]


def test_ablations_change_what_is_uploaded(tmp_path, synthetic_yaml):
    _, coreset = _run(
        tmp_path, synthetic_yaml, "coreset", "memory.reduce=coreset", "memory.coreset_ratio=0.05", "federation.rounds=0"
    )
    for c in coreset["rounds"][0]["clients"].values():
        assert c["memory_items"] == round(0.05 * c["memory_patches"])
    mean_orch, mean_run = _run(
        tmp_path,
        synthetic_yaml,
        "mean",
        "memory.reduce=position_mean",
        "server.aggregation=mean",
        "federation.rounds=0",
    )
    server = mean_run["rounds"][0]["server"]
    assert (
        server["global_items"] == mean_orch.server.limits.patch_positions
        and server["kmeans_objective"] != server["kmeans_objective"]
    )

    frozen, frozen_run = _run(tmp_path, synthetic_yaml, "frozen", "federation.local_epochs=0", "federation.rounds=1")
    d = frozen.clients[0].module.model.generator.out_channels
    identity = torch.eye(d)
    weight = frozen.clients[0].module.model.generator.state_dict()
    conv = next(v for k, v in weight.items() if v.dim() == 4)[:, :d, 0, 0]
    assert torch.equal(conv.cpu(), identity)
    assert frozen_run["rounds"][1]["clients"][0]["train_loss"] != frozen_run["rounds"][1]["clients"][0]["train_loss"]

    once, once_run = _run(
        tmp_path, synthetic_yaml, "once", "memory.rebuild=once", "federation.rounds=2", "checkpoint.keep=all"
    )
    assert [r["bytes_up"] > 0 for r in once_run["rounds"]] == [True, False, False]
    first = load_checkpoint(tmp_path / "once/checkpoints/round_000.ckpt")["global_memory"]
    assert torch.equal(once.global_memory, first)
    assert once_run["rounds"][2]["clients"][0]["train_loss"] == once_run["rounds"][2]["clients"][0]["train_loss"]


def test_patchcore_reference_keeps_a_coreset_of_raw_pooled_patches_and_does_not_train(tmp_path, synthetic_yaml):
    orch, summary = _run(
        tmp_path, synthetic_yaml, "patchcore", "method=patchcore", "memory.coreset_ratio=0.05", "federation.rounds=3"
    )
    assert [r["round"] for r in summary["rounds"]] == [0]  # nothing trains: round 0 is the model
    assert summary["rounds"][0]["bytes_up"] == 0 and orch.global_memory is None
    module = orch.clients[0].module
    assert module.model.score_method == "patchcore" and len({id(c.module) for c in orch.clients}) == 1
    pooled = orch.cache.wrap(orch.clients[0].memory_set)
    patches = torch.cat([pooled[i]["features"].flatten(1).T for i in range(len(pooled))])
    memory = module.model.memory
    assert memory.shape[0] == round(0.05 * patches.shape[0])
    exact = torch.cdist(memory, patches, compute_mode="donot_use_mm_for_euclid_dist")
    assert exact.min(dim=1).values.max() < 1e-3  # every item is a real patch (through the identity generator)
    assert all(0 <= c["image_auroc"] <= 1 for c in summary["final"]["clients"].values())
