"""The Fabric orchestrator: faults, bad uploads, resume and world-size invariance, with real runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST
from feddymem.config import load_config
from feddymem.errors import ConfigError, DataError
from feddymem.federation.client_runner import ClientRunner
from feddymem.federation.orchestrator import FederatedOrchestrator
from feddymem.federation.server import TooFewClients
from feddymem.io import load_checkpoint
from feddymem.memory.reduce import MemoryBank, MemoryReduceSettings, reduce_memory

ROOT = Path(__file__).resolve().parents[2]


def _cfg(yaml, *extra):
    return load_config([f"dataset={yaml}", "data.num_clients=3", *FAST, *extra])


def test_failing_client_is_left_out_and_bad_upload_rejected(tmp_path, synthetic_yaml, monkeypatch, caplog):
    orch = FederatedOrchestrator(
        _cfg(synthetic_yaml, "federation.rounds=2", "federation.min_clients=2"), tmp_path / "run"
    )
    real_training, real_upload = ClientRunner.local_training, ClientRunner.build_memory

    def flaky_training(runner, client, round_idx, deadline):
        if client.id == 1 and round_idx == 1:
            raise RuntimeError("site 1 lost its disk")
        return real_training(runner, client, round_idx, deadline)

    def poisoned_upload(runner, client):
        bank = real_upload(runner, client)
        if client.id == 2 and len(orch.driver.history) == 2:  # round 2
            return MemoryBank(torch.full_like(bank.items, float("nan")), bank.weights, bank.num_images)
        return bank

    monkeypatch.setattr(ClientRunner, "local_training", flaky_training)
    monkeypatch.setattr(ClientRunner, "build_memory", poisoned_upload)
    summary = orch.run()
    rounds = summary["rounds"]
    assert rounds[0]["participants"] == [0, 1, 2]
    assert rounds[1]["participants"] == [0, 2]
    assert "site 1 lost its disk" in rounds[1]["clients"][1]["error"]
    assert rounds[2]["participants"] == [0, 1]
    assert "upload of client 2 rejected: non-finite" in rounds[2]["clients"][2]["error"]
    assert rounds[1]["clients"][1]["bytes_up"] == 0 and "image_auroc" in rounds[1]["clients"][1]
    assert "client 1 left out of round 1" in caplog.text


def test_too_few_clients_stops_with_clear_error(tmp_path, synthetic_yaml, monkeypatch):
    orch = FederatedOrchestrator(
        _cfg(synthetic_yaml, "federation.rounds=1", "federation.min_clients=3"), tmp_path / "run"
    )

    def broken(runner, client):
        raise OSError("network down")

    monkeypatch.setattr(ClientRunner, "build_memory", broken)
    with pytest.raises(TooFewClients, match=r"round 0: 0 valid uploads, federation.min_clients is 3 .*network down"):
        orch.run()


def test_failing_client_in_a_round_without_uploads_does_not_stop_the_run(tmp_path, synthetic_yaml, monkeypatch):
    """memory.rebuild=once: nothing is uploaded after round 0, so a failing client cannot count against
    federation.min_clients there; it is recorded and left out."""
    orch = FederatedOrchestrator(
        _cfg(synthetic_yaml, "federation.rounds=2", "federation.min_clients=3", "memory.rebuild=once"), tmp_path / "r"
    )
    real_training = ClientRunner.local_training

    def flaky_training(runner, client, round_idx, deadline):
        if client.id == 1 and round_idx == 1:
            raise RuntimeError("site 1 rebooted")
        return real_training(runner, client, round_idx, deadline)

    monkeypatch.setattr(ClientRunner, "local_training", flaky_training)
    rounds = orch.run()["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert "site 1 rebooted" in rounds[1]["clients"][1]["error"] and "error" not in rounds[2]["clients"][1]


def test_cached_features_without_workers_and_one_backbone_per_process(tmp_path, synthetic_yaml):
    from feddymem.data.feature_cache import CachedFeatureDataset

    orch = FederatedOrchestrator(_cfg(synthetic_yaml, "optim.num_workers=2"), tmp_path / "r")
    orch.setup()
    client = orch.clients[0]
    loaders = orch.runner.loaders
    cached = loaders.cached(client.memory_set, "t")
    assert isinstance(cached, CachedFeatureDataset)
    assert loaders.loader(cached, shuffle=False).num_workers == 0  # the cache's hits stay in this process
    assert loaders.loader(client.memory_set, shuffle=False).num_workers == 2  # decoding images: workers help
    # One frozen backbone per process, shared by its clients; their generators are their own.
    extractors = {id(c.module.model.feature_extractor) for c in orch.clients}
    generators = {id(c.module.model.generator) for c in orch.clients}
    assert len(orch.clients) == 3 and len(extractors) == 1 and len(generators) == 3


def test_default_coreset_mean_uploads_items_of_three_images_and_refuses_clients_with_fewer(tmp_path, synthetic_yaml):
    # The default memory-reduce, end to end: every uploaded item averages one patch of each of 3 images.
    cfg = _cfg(synthetic_yaml, "memory.reduce=coreset_mean", "memory.min_cluster_size=3", "memory.coreset_ratio=0.05")
    orch = FederatedOrchestrator(cfg, tmp_path / "r")
    orch.setup()
    for client in orch.clients:
        bank = orch.runner.build_memory(client)
        patches = len(client.memory_set) * 12 * 12  # 96 px → a 12×12 patch grid (stride 8)
        assert bank.items.shape[0] == round(0.05 * patches) and torch.all(bank.weights == 3)
    summary = orch.run()
    assert all(0.5 < c["image_auroc"] <= 1.0 for c in summary["final"]["clients"].values())
    # A client with fewer training images than an item averages is refused before anything runs.
    few = _cfg(synthetic_yaml, "memory.reduce=coreset_mean", "memory.min_images_per_item=50")
    with pytest.raises(DataError, match=r"client 0 keeps \d+ training images .* averages 50 images per item"):
        FederatedOrchestrator(few, tmp_path / "few").setup()
    # PatchCore builds its memory with a raw coreset: the same data is no reason to refuse it.
    patchcore = _cfg(synthetic_yaml, "method=patchcore", "memory.min_images_per_item=50")
    FederatedOrchestrator(patchcore, tmp_path / "pc").setup()
    # memory.per_product: the client's products are reduced one by one.
    split_cfg = _cfg(
        synthetic_yaml,
        "memory.reduce=coreset_mean",
        "memory.min_cluster_size=3",
        "memory.coreset_ratio=0.05",
        "memory.per_product=true",
    )
    split = FederatedOrchestrator(split_cfg, tmp_path / "per_product")
    split.setup()
    client = max(split.clients, key=lambda c: min(c.data.counts().values()) if len(c.data.counts()) == 2 else 0)
    assert min(client.data.counts().values()) >= 3  # a client with both products, each large enough
    loader = split.runner.loaders.loader(split.runner.loaders.cached(client.memory_set, "t"), shuffle=False)
    embeddings, products = client.module.embed_batches(loader), [s.product for s in client.memory_set.samples]
    settings = MemoryReduceSettings("coreset_mean", coreset_ratio=0.05, min_cluster_size=3)
    per_product = reduce_memory(embeddings, settings, seed=split_cfg.seed, image_groups=products).items
    d = embeddings.shape[1]  # the patch part (the context part beside it is reduced the same way)
    assert torch.equal(split.runner.build_memory(client).items[:, :d], per_product)
    assert not torch.equal(reduce_memory(embeddings, settings, seed=split_cfg.seed).items, per_product)


@pytest.mark.parametrize("method", ["centralized", "patchcore"])
def test_a_pooling_method_on_several_processes_is_refused_before_anything_starts(tmp_path, synthetic_yaml, method):
    cfg = _cfg(synthetic_yaml, f"method={method}", "federation.devices=2")
    with pytest.raises(ConfigError, match=f"method={method} pools all data in one process; got 2 processes"):
        FederatedOrchestrator(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_slow_client_times_out(tmp_path, synthetic_yaml):
    orch = FederatedOrchestrator(
        _cfg(synthetic_yaml, "federation.rounds=1", "federation.client_timeout_s=1e-6"), tmp_path / "run"
    )
    with pytest.raises(TooFewClients, match="ClientTimeout: client 0 ran past"):
        orch.run()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(args, env_extra=None, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "MASTER_PORT", "MASTER_ADDR", "NODE_RANK")}
    env.update(env_extra or {})
    return subprocess.Popen(
        [sys.executable, "-m", "feddymem.cli", "train", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _final(run: Path):
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    metrics = json.loads((run / "metrics.json").read_text())
    return ckpt, [
        {k: (c["image_auroc"], c["pixel_auroc"], c["aupro"]) for k, c in r["clients"].items()}
        for r in metrics["rounds"]
    ]


def _cli_args(yaml, tmp_path, rounds, *extra):
    """Command-line overrides shared by the subprocess runs: 3 synthetic clients on the CPU."""
    return [
        f"dataset={yaml}",
        "data.num_clients=3",
        f"federation.rounds={rounds}",
        *FAST,
        f"output_dir={tmp_path}",
        "federation.accelerator=cpu",
        *extra,
    ]


@pytest.mark.e2e
def test_world_size_invariance_one_vs_two_processes(tmp_path, synthetic_yaml):
    # With the context part: its aggregation must not depend on the processes either.
    common = _cli_args(synthetic_yaml, tmp_path, 1, "model.scoring.context=9")
    _finish(_train([*common, "name=one", "federation.devices=1"]))
    _finish(_train([*common, "name=two", "federation.devices=2"], env_extra={"MASTER_PORT": str(_free_port())}))
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"] == 2
    one, auroc_one = _final(tmp_path / "one")
    two, auroc_two = _final(tmp_path / "two")
    assert torch.allclose(one["global_memory"], two["global_memory"], atol=1e-5)
    for round_one, round_two in zip(auroc_one, auroc_two, strict=True):
        for k in round_one:
            assert round_one[k] == pytest.approx(round_two[k], abs=1e-6)
    for k in range(3):  # each client trained alone: the same generator on 1 or 2 processes
        assert torch.allclose(
            one["clients"][k]["model"]["generator.conv.weight"],
            two["clients"][k]["model"]["generator.conv.weight"],
            atol=1e-6,
        )


@pytest.mark.e2e
def test_two_nodes_on_loopback_complete_a_round(tmp_path, synthetic_yaml):
    port = str(_free_port())
    args = _cli_args(
        synthetic_yaml,
        tmp_path,
        1,
        "name=nodes",
        "federation.num_nodes=2",
        "federation.devices=1",
        "federation.collective_timeout_s=120",
    )
    nodes = [
        _train(args, env_extra={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(rank)})
        for rank in (0, 1)
    ]
    _finish(nodes[0])
    _finish(nodes[1])
    assert json.loads((tmp_path / "nodes" / "metrics.json").read_text())["world_size"] == 2
    ckpt, aurocs = _final(tmp_path / "nodes")
    assert ckpt["round"] == 1 and set(ckpt["clients"]) == {0, 1, 2} and len(aurocs) == 2


@pytest.mark.e2e
def test_kill_mid_round_and_resume_matches_uninterrupted(tmp_path, synthetic_yaml):
    common = _cli_args(synthetic_yaml, tmp_path, 3, "federation.local_epochs=2", "checkpoint.keep=all")
    _finish(_train([*common, "name=straight"]))
    victim = _train([*common, "name=killed", "logger=csv"], start_new_session=True)
    ckpt1 = tmp_path / "killed" / "checkpoints" / "round_001.ckpt"
    deadline = time.monotonic() + 240
    while not ckpt1.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)  # mid round 2
    victim.communicate()
    assert not (tmp_path / "killed" / "checkpoints" / "round_003.ckpt").exists()
    _finish(_train([f"resume={tmp_path / 'killed'}", "quiet=true"]))
    straight, auroc_straight = _final(tmp_path / "straight")
    resumed, auroc_resumed = _final(tmp_path / "killed")
    assert resumed["round"] == straight["round"] == 3
    assert torch.equal(resumed["global_memory"], straight["global_memory"])
    assert auroc_resumed == auroc_straight
    # The CSV log keeps the rounds logged before the kill, and has each round once.
    rows = (tmp_path / "killed" / "logs" / "metrics.csv").read_text().splitlines()
    steps = [int(line.rsplit(",", 1)[1]) for line in rows[1:]]
    assert rows[0].endswith(",step") and steps == [0, 1, 2, 3]
