"""Closer to real sites: the SuperLink and each SuperNode in a network namespace of its own, joined by veth
pairs, with TLS (a certificate for the veth addresses) and SuperNode authentication. Needs root and
``ip netns``; skipped with the reason elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("flwr")

from conftest import FAST
from feddymem.config import load_config
from feddymem.flower.local import Namespaces, loopback_federation, netns_unavailable, submit

UNAVAILABLE = netns_unavailable()


@pytest.mark.e2e
@pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")
def test_sites_in_their_own_network_namespaces_reach_the_superlink_over_veth_only(tmp_path, synthetic_yaml):
    cfg = load_config([f"dataset={synthetic_yaml}", "data.num_clients=2", "federation.rounds=1", *FAST])
    features = tmp_path / "sites" / "features"
    nodes = [f'client-id={k} out="{tmp_path / "sites" / f"site_{k}"}" cache-dir="{features}"' for k in range(2)]
    # Without workers (workers=0), as a site runs that starts only its SuperNode: every message in the
    # fresh process Flower starts for it.
    with loopback_federation(2, nodes, tls=True, authenticate=True, workdir=tmp_path, netns=True, workers=0) as fed:
        superlink_ns = fed.coordinator[-1]
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        sites = [line.split()[0] for line in listed.splitlines() if line.startswith(superlink_ns.removesuffix("link"))]
        assert len(sites) == 3  # the SuperLink's namespace and one per site
        # From a site's namespace the SuperLink is not on loopback; over the veth it is.
        site = superlink_ns.removesuffix("link") + "s0"
        probe = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 2)"
        for host, reachable in (("127.0.0.1", False), (Namespaces.link_address(0), True)):
            command = [*Namespaces.run_in(site), sys.executable, "-c", probe, host, str(fed.port)]
            assert (subprocess.run(command, capture_output=True, check=False).returncode == 0) is reachable, host
        submit(fed, cfg, tmp_path / "run", timeout=600)
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["engine"] == "flower" and summary["sites"] == 2
    assert [r["participants"] for r in summary["rounds"]] == [[0, 1], [0, 1]]
    assert all("image_auroc" in c for c in summary["final"]["clients"].values())
    # Every message ran in a fresh process: after a site's first round its features came from its disk cache.
    for k in range(2):
        lines = [json.loads(line) for line in (tmp_path / "sites" / f"site_{k}" / "features.jsonl").open()]
        assert [line["type"] for line in lines] == ["train", "evaluate", "train", "evaluate"], lines
        assert all(line["extracted"] == 0 and line["from_disk"] > 0 for line in lines[2:]), lines
    assert not fed.workers
    # The namespaces are gone with the federation.
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert superlink_ns not in listed
