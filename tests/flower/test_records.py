"""Flower records of FedDyMem's messages and of a client's state between messages."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")  # the optional extra feddymem[flower]; make test installs it

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from conftest import FAST
from feddymem.config import load_config
from feddymem.data.check import plan_data
from feddymem.errors import ConfigError
from feddymem.federation.client import (
    KeptState,
    build_clients,
)
from feddymem.federation.messages import ClientResult, Upload
from feddymem.federation.strategies import make_strategy
from feddymem.federation.wire import MalformedMessage, decode_result, encode_result
from feddymem.flower.records import from_records, load_client_state, save_client_state, to_records
from feddymem.memory.reduce import MemoryBank


def test_a_result_crosses_flower_records_exactly():
    bank = MemoryBank(torch.randn(6, 4), torch.rand(6) + 1, num_images=2)
    result = ClientResult(1, Upload(bank, 6, 2), train_loss=0.5, time_s=2.0)
    content = to_records(encode_result(result))
    assert isinstance(content["arrays"], ArrayRecord) and isinstance(content["metrics"], MetricRecord)
    assert isinstance(content["config"], ConfigRecord)
    back = decode_result(from_records(content), client_id=1)
    assert torch.equal(back.upload.payload.items, bank.items) and torch.equal(back.upload.payload.weights, bank.weights)
    assert back.train_loss == 0.5 and back.upload.memory_items == 6
    with pytest.raises(MalformedMessage, match="needs an ArrayRecord 'arrays' and a MetricRecord 'metrics'"):
        from_records(RecordDict({"config": ConfigRecord({"payload": "memory"})}))


def test_client_state_survives_between_messages(synthetic_yaml):
    cfg = load_config([f"dataset={synthetic_yaml}", "data.num_clients=2", *FAST])
    plan, strategy = plan_data(cfg), make_strategy(cfg)
    client = build_clients(cfg, plan.clients, [1], strategy)[0]
    with torch.no_grad():
        client.module.model.generator.conv.weight.add_(0.5)
    client.module.set_global_memory(torch.randn(10, client.module.model.memory_dim))
    params = [p for group in client.optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    client.optimizer.step()  # an AdamW state with step counts and moments
    client.kept = KeptState(3, 0.75, client.module.trainable_state())
    client.anchor = {"conv.weight": torch.ones(2, 2)}
    state = RecordDict()
    save_client_state(client, state)
    fresh = build_clients(cfg, plan.clients, [1], strategy)[0]  # the next message's ClientApp
    load_client_state(fresh, state)
    for name, value in client.module.trainable_state().items():
        assert torch.equal(fresh.module.trainable_state()[name], value), name
    before, after = client.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert before.keys() == after.keys() and all(
        torch.equal(before[i][k], after[i][k]) for i in before for k in before[i]
    )
    assert (
        fresh.kept.round == 3
        and fresh.kept.criterion == 0.75
        and torch.equal(fresh.anchor["conv.weight"], torch.ones(2, 2))
    )
    assert np.isclose(float(fresh.optimizer.param_groups[0]["lr"]), cfg.optim.lr)


def test_a_site_with_its_own_data_description_takes_all_of_it(synthetic_root, synthetic_yaml, tmp_path):
    from feddymem.config import to_yaml
    from feddymem.flower.site import site_setup
    from synthetic import dataset_yaml, make_product

    server = load_config([f"dataset={synthetic_yaml}", "data.num_clients=3", *FAST])
    yaml = to_yaml(server)
    sha = hashlib.sha256(yaml.encode()).hexdigest()
    message = RecordDict({"setup": ConfigRecord({"config-yaml": yaml, "config-sha": sha})})  # query.identify
    state = RecordDict()

    # Without a description: share K of the server's partition, as under Fabric.
    _, client_id, plan, share = site_setup(message, {"client-id": 2}, state)
    assert client_id == share == 2 and plan.clients[2].train == plan_data(server).clients[2].train
    # With one: every training image of the site's own products is its share, under its client id.
    own = make_product(tmp_path, "site_product", n_train=5, seed=9)
    site_yaml = dataset_yaml(tmp_path, [own], num_clients=1)
    cfg, client_id, plan, share = site_setup(message, {"client-id": 2, "dataset": str(site_yaml)}, state)
    assert client_id == 2 and share == 0 and plan.clients[0].client_id == 2
    assert {s.product for s in plan.clients[0].train} == {"site_product"}
    assert len(plan.clients[0].train) + len(plan.clients[0].holdout) == 5
    assert cfg.model == server.model and cfg.memory == server.memory  # the method is the server's
    with pytest.raises(ConfigError, match="start it with --node-config 'client-id=K'"):
        site_setup(message, {}, state)
    # Later messages name the config by its digest only: the site's state holds the text.
    later = RecordDict({"setup": ConfigRecord({"config-sha": sha})})
    assert site_setup(later, {"client-id": 1}, state)[0].model == server.model
    with pytest.raises(MalformedMessage, match="has not been sent the run's config"):
        site_setup(later, {"client-id": 1}, RecordDict())  # a site that never saw query.identify
    forged = RecordDict({"setup": ConfigRecord({"config-yaml": yaml + "#", "config-sha": sha})})
    with pytest.raises(MalformedMessage, match="does not match its 'config-sha'"):
        site_setup(forged, {"client-id": 1}, RecordDict())
