"""A real Flower federation on loopback: SuperLink, two SuperNodes, TLS with a generated CA, SuperNode
authentication; the run equals the Fabric engine's, and a site whose key was never registered is refused."""

from __future__ import annotations

import json
import subprocess
import tempfile

import pytest
import torch

pytest.importorskip("flwr")

from conftest import FAST
from feddymem.config import load_config
from feddymem.federation.orchestrator import FederatedOrchestrator
from feddymem.flower.local import free_port, loopback_federation, loopback_workers, make_node_keys, submit
from feddymem.io import load_checkpoint
from feddymem.trained import load_trained
from run_compare import REL, assert_same_run


@pytest.mark.e2e
def test_flower_over_tls_matches_fabric_and_refuses_an_unregistered_site(tmp_path, synthetic_yaml):
    cfg = load_config([f"dataset={synthetic_yaml}", "data.num_clients=2", "federation.rounds=1", *FAST, "logger=csv"])
    FederatedOrchestrator(cfg, tmp_path / "fabric").run()
    fabric = json.loads((tmp_path / "fabric" / "metrics.json").read_text())
    features = tmp_path / "sites" / "features"  # one machine: both sites may share one feature cache
    nodes = [f'client-id={k} out="{tmp_path / "sites" / f"site_{k}"}" cache-dir="{features}"' for k in range(2)]
    with loopback_federation(2, nodes, tls=True, authenticate=True, workdir=tmp_path) as fed:
        private, _ = make_node_keys(fed.home / "intruder", "intruder")  # never registered
        command = ["flower-supernode", *fed.tls_args("supernode"), "--superlink", f"127.0.0.1:{fed.port}"]
        command += ["--port", str(free_port()), "--node-config", "client-id=1", "--max-retries", "1"]
        command += ["--auth-supernode-private-key", str(private)]
        log = fed.home / "intruder.log"
        with log.open("wb") as out:  # a file, not a pipe: the node's helper processes may keep a pipe open
            intruder = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=fed.env)
        try:
            assert intruder.wait(timeout=120) != 0
        finally:
            intruder.kill()
        assert "Failed to activate SuperNode" in log.read_text()
        assert fed.certificates and all(p.is_file() for p in fed.certificates.values())
        submit(fed, cfg, tmp_path / "flower", timeout=600)
        # The sites' SuperNodes are feddymem's paced ones (feddymem.flower.supernode), not Flower's 3 s poll.
        node_logs = [log.read_text() for log in fed.logs if log.stem.startswith("supernode")]
        assert len(node_logs) == 2 and not any("poll is kept" in text for text in node_logs)
        # One worker per site where the machine has two cores for each, else fewer that the sites share.
        assert len(fed.workers) == loopback_workers(2) and all(worker.poll() is None for worker in fed.workers)
    flower = json.loads((tmp_path / "flower" / "metrics.json").read_text())
    assert flower["engine"] == "flower" and flower["sites"] == 2
    assert len(flower["rounds"]) == 2 and flower["rounds"][0]["participants"] == [0, 1]
    assert flower["rounds"][0]["bytes_up"] > 0 and flower["rounds"][0]["bytes_down"] > 0
    assert_same_run(flower, fabric)
    ours = load_checkpoint(tmp_path / "flower" / "checkpoints" / "last.ckpt")
    theirs = load_checkpoint(tmp_path / "fabric" / "checkpoints" / "last.ckpt")
    assert torch.allclose(ours["global_memory"], theirs["global_memory"], rtol=REL, atol=1e-5)
    assert (tmp_path / "flower" / "config.yaml").is_file() and (tmp_path / "flower" / "logs" / "metrics.csv").is_file()
    # Each site's model, written on the site, loads as a Fabric run's client does (feddymem predict/export).
    for k in range(2):
        site = load_trained(tmp_path / "sites" / f"site_{k}" / f"client_{k}.ckpt", k)
        same = load_trained(tmp_path / "fabric" / "checkpoints" / "last.ckpt", k)
        assert site.threshold == pytest.approx(same.threshold, rel=REL)
        assert site.model.settings == same.model.settings
        for name, value in same.model.trainable_state().items():
            assert torch.allclose(site.model.trainable_state()[name], value, rtol=REL, atol=1e-5), name
    # A worker keeps each of its sites' features in memory between messages (and on disk, for later runs):
    # after a site's first round nothing is extracted or read back again.
    assert len(list(features.rglob("*.pt"))) > 0
    for k in range(2):
        lines = [json.loads(line) for line in (tmp_path / "sites" / f"site_{k}" / "features.jsonl").open()]
        assert [line["type"] for line in lines] == ["train", "evaluate", "train", "evaluate"], lines
        assert lines[0]["extracted"] + lines[0]["from_disk"] > 0
        assert all(line["extracted"] == line["from_disk"] == 0 < line["hits"] for line in lines[2:]), lines
    # What left each site, from its own audit log (both directions, every message): memory items and
    # numbers only, nothing image-shaped, no file paths, no per-image scores (the default egress policy).
    for k in range(2):
        lines = [json.loads(line) for line in (tmp_path / "sites" / f"site_{k}" / "messages.jsonl").open()]
        sent = [line for line in lines if line["direction"] == "out"]
        assert {line["direction"] for line in lines} == {"in", "out"}
        assert {line["type"] for line in sent} >= {"query.identify", "train", "evaluate"}
        for line in sent:
            arrays = line["records"]["arrays"]
            assert set(arrays) <= {"memory.items", "memory.weights"}, (line["type"], sorted(arrays))
            assert all(len(a["shape"]) <= 2 and a["dtype"] != "uint8" for a in arrays.values())
            strings = " ".join(line["records"]["config"].values())
            assert "/" not in strings and ".png" not in strings, (line["type"], strings)
            metrics = line["records"]["metrics"]
            assert not any(key.startswith(("test_path", "panel")) for key in metrics)


@pytest.mark.parametrize(("cores", "sites", "workers"), [(2, 5, 1), (1, 5, 1), (4, 5, 2), (16, 5, 5), (16, 2, 2)])
def test_loopback_sites_share_workers_with_fewer_than_two_cores_each(monkeypatch, cores, sites, workers):
    monkeypatch.setattr("feddymem.flower.local.os.cpu_count", lambda: cores)
    assert loopback_workers(sites) == workers


@pytest.mark.e2e
def test_a_federation_in_the_temporary_folder_is_removed_after_a_clean_stop_and_kept_after_an_error(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp puts the federation's folder
    with loopback_federation(1, ["client-id=0"], tls=False, authenticate=False, workers=0) as fed:
        assert fed.home.parent == tmp_path and (fed.home / "superlink.log").is_file()
    assert not fed.home.exists()
    failing = loopback_federation(1, ["client-id=0"], tls=False, authenticate=False, workers=0)
    with pytest.raises(RuntimeError, match="the run failed"), failing as fed:
        raise RuntimeError("the run failed")
    assert (fed.home / "superlink.log").is_file()  # kept to read what happened
    assert str(fed.home) in caplog.text
