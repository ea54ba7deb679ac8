"""A real Flower federation loses a site mid-run: its SuperNode is killed. The SuperLink answers for
the missing node, the coordinator finishes the round with the site that is left (``federation.min_clients``),
names the lost site in the record, and the run goes on to its end. Then the site comes back and the run is
resumed for another round: the lost site rejoins from the state it saved last."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from conftest import FAST
from feddymem.config import load_config
from feddymem.flower.local import APP_DIR, loopback_federation, run_config_file, submit


def _answered(audit: Path, kind: str) -> int:
    """How many ``kind`` replies a site's audit log holds."""
    if not audit.is_file():
        return 0
    lines = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    return sum(line["direction"] == "out" and line["type"] == kind for line in lines)


@pytest.mark.e2e
def test_a_site_lost_mid_run_is_named_the_run_finishes_and_resumes_with_it_back(tmp_path, synthetic_yaml):
    settings = [
        f"dataset={synthetic_yaml}",
        "data.num_clients=2",
        *FAST,
        "federation.min_clients=1",
        "federation.eval_every=0",  # kept states are scored at the end: the lost site's never is
    ]
    cfg = load_config([*settings, "federation.rounds=2"])
    sites = tmp_path / "sites"
    nodes = [f'client-id={k} out="{sites / f"site_{k}"}" cache-dir="{sites / "features"}"' for k in range(2)]
    run_dir = tmp_path / "run"
    with loopback_federation(2, nodes, tls=False, authenticate=False, workdir=tmp_path) as fed:
        command = [str(Path(sys.executable).parent / "flwr"), "run", str(APP_DIR), "local"]
        command += ["--run-config", str(run_config_file(cfg, run_dir, fed.home)), "--stream"]
        with (tmp_path / "flwr_run.log").open("wb") as out:
            run = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=fed.env)
        try:
            deadline = time.monotonic() + 300
            while not (run_dir / "metrics.json").is_file() and time.monotonic() < deadline:
                assert run.poll() is None, (tmp_path / "flwr_run.log").read_text()[-2000:]
                time.sleep(0.1)
            fed.supernodes[1].kill()  # site 1's SuperNode, once round 0 is recorded
            run.wait(timeout=600)
        finally:
            if run.poll() is None:
                run.kill()
    summary = json.loads((run_dir / "metrics.json").read_text())
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[0]["participants"] == [0, 1]
    assert "kept_round" in rounds[0]["clients"]["1"]  # round 0 was complete when site 1 went
    # Round 1 may have had its upload before the kill, not its evaluation; round 2 had neither.
    assert "client 1" in rounds[1]["clients"]["1"]["error"]
    assert rounds[2]["participants"] == [0] and not rounds[2]["clients"]["1"]["uploaded"]
    assert "client 1" in rounds[2]["clients"]["1"]["error"]
    for record in rounds[1:]:
        assert record["clients"]["0"]["uploaded"] and not record["clients"]["0"].get("error")
    assert _answered(sites / "site_1" / "messages.jsonl", "evaluate") == 1  # it never answered again
    # The final mean is over the sites that were scored; the lost one keeps its round 0 and is named.
    assert summary["final"]["clients"]["1"]["kept_round"] == 0
    assert summary["final"]["mean_image_auroc"] == summary["final"]["clients"]["0"]["image_auroc"]
    assert summary["final"]["unscored_clients"] == ["1"]

    # Site 1 is back (a new SuperNode and worker on its own folder) and the run is resumed for one more round:
    # site 1 rejoins from the state it saved after round 0, site 0 goes on from round 2.
    resumed = load_config([*settings, "federation.rounds=3", f"resume={run_dir}"])
    with loopback_federation(2, nodes, tls=False, authenticate=False, workdir=tmp_path) as fed:
        submit(fed, resumed, run_dir, timeout=600)
    summary = json.loads((run_dir / "metrics.json").read_text())
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3] and rounds[3]["participants"] == [0, 1]
    for client in ("0", "1"):
        assert rounds[3]["clients"][client]["uploaded"] and not rounds[3]["clients"][client].get("error")
    assert _answered(sites / "site_1" / "messages.jsonl", "evaluate") == 2
    assert not summary["final"].get("unscored_clients")
    assert summary["final"]["mean_image_auroc"] > 0.5
