"""``feddymem bench engines``: a real Fabric run and a real Flower run on loopback, back to back, in one table."""

import json

import pytest

pytest.importorskip("flwr")

from conftest import FAST
from feddymem.cli import main


@pytest.mark.e2e
def test_bench_engines_runs_both_and_writes_one_table(tmp_path, synthetic_yaml):
    # The kept states scored at the end: under Flower with the last evaluation, under Fabric afterwards.
    overrides = [f"dataset={synthetic_yaml}", "data.num_clients=2", "federation.rounds=1", *FAST]
    overrides.append("federation.eval_every=0")
    code = main(["bench", "engines", *overrides, "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")])
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    fabric, flower = results["rows"]
    assert (fabric["engine"], flower["engine"]) == ("fabric", "flower")
    for row in (fabric, flower):
        assert row["rounds"] == 2 and row["wall_s"] > row["round0_s"] > 0 and row["later_round_s"] > 0
        assert row["final_scoring_s"] > 0
        assert 0.0 <= row["mean_image_auroc"] <= 1.0
    # The same experiment: the same bytes on the wire and the same accuracy (float rounding apart).
    assert flower["bytes_up_per_client_round"] == fabric["bytes_up_per_client_round"] > 0
    assert flower["bytes_down_per_client_round"] == fabric["bytes_down_per_client_round"] > 0
    assert flower["mean_image_auroc"] == pytest.approx(fabric["mean_image_auroc"], abs=1e-4)
    # Flower's sites started from an empty feature cache of their own, inside the runs folder.
    assert list((tmp_path / "runs").glob("features-*/*/*/*.pt"))
    # The loopback federation's own logs stay with the Flower run (its temporary folder is gone).
    kept = {p.name for p in (tmp_path / "runs").glob("flower-*/logs/loopback/*.log")}
    assert {"superlink.log", "supernode0.log", "supernode1.log", "flwr_run.log"} <= kept
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| fabric |" in table and "| flower |" in table
    assert f"**{flower['wall_s'] / fabric['wall_s']:.2f}×**" in table
