"""One round loop for both engines: the same experiment under Fabric and over Flower (in one process, the
coordinator's messages handed straight to the ClientApp) gives the same run, for every method that can run
across sites and for the settings the loop decides: early stop, final scoring of kept states, checkpoint
retention, logging."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("flwr")

from conftest import FAST
from feddymem.config import load_config
from feddymem.errors import FedDyMemError
from feddymem.federation.orchestrator import FederatedOrchestrator
from feddymem.flower.inprocess import run_in_process
from feddymem.io import load_checkpoint
from run_compare import assert_same_run

CASES = {
    # Kept states scored only at the end: over Flower their test metrics come with the last evaluation.
    "feddymem": ["federation.rounds=1", "federation.eval_every=0"],
    "local": ["method=local", "federation.rounds=1"],
    "fedavg": ["method=fedavg", "federation.rounds=1"],
    "fedprox": ["method=fedprox", "federation.rounds=1"],
    # Early stop after round 2 at the latest, kept states scored only at the end, every round's checkpoint kept.
    "patience_final_keep_all": [
        "federation.rounds=4",
        "selection.patience=1",
        "federation.eval_every=0",
        "checkpoint.keep=all",
        "logger=csv",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_both_engines_run_the_same_rounds(case, tmp_path, synthetic_yaml):
    cfg = load_config([f"dataset={synthetic_yaml}", "data.num_clients=2", *FAST, *CASES[case]])
    FederatedOrchestrator(cfg, tmp_path / "fabric").run()
    out = [tmp_path / "sites" / f"site_{k}" for k in range(2)]
    sites = [{"client-id": k, "cache-dir": str(tmp_path / "features"), "out": str(out[k])} for k in range(2)]
    summary = run_in_process(cfg, tmp_path / "flower", sites)
    fabric = json.loads((tmp_path / "fabric" / "metrics.json").read_text())
    flower = json.loads((tmp_path / "flower" / "metrics.json").read_text())
    assert summary["engine"] == "flower" and len(summary["rounds"]) == len(flower["rounds"])
    assert (flower["engine"], fabric["engine"]) == ("flower", "fabric")
    assert_same_run(flower, fabric)
    kept = sorted(p.name for p in (tmp_path / "fabric" / "checkpoints").iterdir())
    assert sorted(p.name for p in (tmp_path / "flower" / "checkpoints").iterdir()) == kept
    asked = {line["type"] for k in range(2) for line in map(json.loads, (out[k] / "messages.jsonl").open())}
    if case in ("feddymem", "patience_final_keep_all"):
        assert all("image_auroc" in c for c in flower["final"]["clients"].values())
        # One message fewer where the run reaches its last round; an early stop asks for them afterwards.
        assert ("query.final" in asked) == (case == "patience_final_keep_all"), asked
    if case == "patience_final_keep_all":
        assert len(fabric["rounds"]) < 5, "the early stop never came"
        assert kept == ["last.ckpt"] + [f"round_{r:03d}.ckpt" for r in range(len(fabric["rounds"]))]
        assert all("image_auroc" in c for c in flower["final"]["clients"].values())
        for run in ("fabric", "flower"):
            header = (tmp_path / run / "logs" / "metrics.csv").read_text().splitlines()[0]
            assert "final/mean_image_auroc" in header, run


@pytest.mark.slow
def test_a_flower_run_resumes_from_the_coordinators_and_each_sites_checkpoint(tmp_path, synthetic_yaml):
    common = [f"dataset={synthetic_yaml}", "data.num_clients=2", *FAST, "federation.local_epochs=2"]
    common.append("checkpoint.keep=all")  # every round's file: the coordinator can be set back a round

    def sites(run: str) -> list[dict[str, object]]:
        return [{"client-id": k, "out": str(tmp_path / run / "sites" / f"site_{k}")} for k in range(2)]

    run_in_process(load_config([*common, "federation.rounds=2"]), tmp_path / "straight", sites("straight"))
    run_in_process(load_config([*common, "federation.rounds=1"]), tmp_path / "stopped", sites("stopped"))
    resumed = load_config([*common, "federation.rounds=2", f"resume={tmp_path / 'stopped'}"])
    # Sites that lost their own checkpoints cannot resume; they say so, and the run's checkpoint is untouched.
    lost = [{"client-id": k, "out": str(tmp_path / "elsewhere" / f"site_{k}")} for k in range(2)]
    with pytest.raises(FedDyMemError, match="site 0 cannot resume: no checkpoint .*elsewhere"):
        run_in_process(resumed, tmp_path / "stopped", lost)
    # A new run with fresh SuperNodes: the coordinator and each site continue from their own checkpoints.
    run_in_process(resumed, tmp_path / "stopped", sites("stopped"))
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    again = json.loads((tmp_path / "stopped" / "metrics.json").read_text())
    assert [r["round"] for r in again["rounds"]] == [0, 1, 2]
    assert_same_run(again, straight)
    last = {run: load_checkpoint(tmp_path / run / "checkpoints" / "last.ckpt") for run in ("straight", "stopped")}
    assert torch.equal(last["stopped"]["global_memory"], last["straight"]["global_memory"])
    # The coordinator stopped after its sites saved round 2 but before it recorded it: on resume every site
    # goes back to the round before (the checkpoint it kept), and round 2 runs again to the same end.
    shutil.copytree(tmp_path / "straight", tmp_path / "lagging")
    lagging = tmp_path / "lagging"
    assert load_checkpoint(lagging / "sites" / "site_0" / "client_0.ckpt")["round"] == 2
    shutil.copy(lagging / "checkpoints" / "round_001.ckpt", lagging / "checkpoints" / "last.ckpt")
    (lagging / "checkpoints" / "round_002.ckpt").unlink()
    run_in_process(load_config([*common, "federation.rounds=2", f"resume={lagging}"]), lagging, sites("lagging"))
    assert_same_run(json.loads((lagging / "metrics.json").read_text()), straight)
