"""anomalib's PatchCore as a bench row, run in its own environment (.venv-anomalib, built by `make test`),
and our AUPRO against anomalib's on real maps."""

import copy
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import FAST, SHARED_DATA
from feddymem.benchmarks.anomalib_patchcore import (
    AnomalibSettings,
    aupro_in_environment,
    coreset_pair_in_environment,
    run_in_environment,
)
from feddymem.benchmarks.plan import load_plan
from feddymem.benchmarks.suite import run_suite
from feddymem.config import load_config
from feddymem.data import ImageDataset, load_product
from feddymem.data.check import plan_data
from feddymem.logging.console import Reporter
from feddymem.memory.reduce import MemoryReduceSettings

ANOMALIB_PYTHON = Path(__file__).resolve().parents[2] / ".venv-anomalib" / "bin" / "python"
pytestmark = [
    pytest.mark.slow,  # each starts anomalib's environment
    pytest.mark.skipif(
        not ANOMALIB_PYTHON.is_file(), reason="anomalib's environment is missing: `make anomalib-env` builds it"
    ),
]


def test_anomalib_row_on_generated_data_uses_our_backbone_split_and_metrics(tmp_path, synthetic_yaml):
    overrides = [f"dataset={synthetic_yaml}", "data.num_clients=2", "data.holdout_fraction=0.25"]
    settings = AnomalibSettings(batch_size=8, coreset_selection="batched")  # anomalib's own loop: the suite's test
    row = run_in_environment(str(ANOMALIB_PYTHON), overrides, settings, tmp_path)
    plan = plan_data(load_config(overrides))
    train, held_out = (sum(len(getattr(c, k)) for c in plan.clients) for k in ("train", "holdout"))
    assert held_out > 0 and row["train_images"] == train  # the held-out normals are not trained on
    assert row["embedding_max_abs_diff"] < 1e-4  # anomalib's embedding is our extractor's, weights included
    assert row["scoring_memory_items"] == int(train * 12 * 12 * 0.1)  # its 10 % coreset of 96-px images' patches
    assert row["overrides"] == ["coreset_sampling_ratio=0.1", "num_neighbors=9", "coreset_selection=batched"]
    assert row["coreset_selection"] == "batched"
    assert set(row["clients"]) == {"0", "1"} and row["anomalib_version"] == "2.7.0"
    # Pasted defects on stripes: anomaly scores 3.7-4.8x the largest normal one under our model, so easy for it.
    for products in row["client_products"].values():
        assert products and all(p["image_auroc"] > 0.9 and p["pixel_auroc"] > 0.9 for p in products.values())
        assert all(0 < p["aupro"] <= 1 for p in products.values())
    assert row["fit_s"] > 0 and row["coreset_s"] > 0 and row["peak_rss_mb"] > 0
    # anomalib's own k-center loop, the same seed: the same coreset, so every metric the same to the last bit
    # (its projection draws from numpy too: unseeded, each run was a new draw)
    own = run_in_environment(str(ANOMALIB_PYTHON), overrides, AnomalibSettings(batch_size=8), tmp_path / "own")
    assert own["coreset_selection"] == "anomalib" and own["client_products"] == row["client_products"]


def test_batched_selection_picks_what_anomalibs_own_loop_picks(tmp_path):
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(40, 64, generator=g) * 3  # clustered and rectified, as patch features are
    embedding = (centres[torch.randint(40, (8000,), generator=g)] + torch.randn(8000, 64, generator=g)).relu()
    picks = coreset_pair_in_environment(str(ANOMALIB_PYTHON), embedding.numpy(), 0.05, tmp_path)
    theirs, ours = picks["anomalib"], picks["batched"]
    assert len(theirs) == len(ours) == 400 and len(set(ours)) == 400
    assert set(ours) == set(theirs)  # the same coreset, its first pick the same random draw
    # The same order but where two distances tie to float rounding (on 39,200 real head CT patches: 28 of 3,920).
    assert ours[0] == theirs[0] and sum(a == b for a, b in zip(ours, theirs, strict=True)) >= 0.95 * len(ours)


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED_DATA / "industrial/magnetic_tile").is_dir(), reason="../shared/data is not present")
def test_our_aupro_matches_anomalibs_on_real_maps(tmp_path, fedmodel):
    split = load_product({"name": "tile", "layout": "mvtec", "root": str(SHARED_DATA / "industrial/magnetic_tile")})
    defects = [s for s in split.test if s.label == 1 and s.mask][:40]
    good = [s for s in split.test if s.label == 0][:20]
    mean, std = fedmodel.feature_extractor.mean, fedmodel.feature_extractor.std
    model = copy.deepcopy(fedmodel)

    def batches(samples):
        return DataLoader(ImageDataset(samples, 224, 224, mean, std), batch_size=16)

    with torch.no_grad():
        train = torch.cat([model.embed(model.extract(b["image"])) for b in batches(split.train[:24])])
        model.set_memory(model.build_memory(train, MemoryReduceSettings("coreset", coreset_ratio=0.1)).items)
        scored = [(model(b["image"])[0], b["mask"]) for b in batches(defects + good)]
    maps, masks = (torch.cat([pair[i] for pair in scored]).numpy() for i in (0, 1))
    result = aupro_in_environment(str(ANOMALIB_PYTHON), maps, masks, tmp_path)
    assert 0.3 < result["ours"] < 1.0  # a real, imperfect map: the curve has a shape to get wrong
    assert abs(result["ours"] - result["anomalib"]) <= 0.005, result


def test_the_suite_runs_the_reference_row_beside_ours_and_keeps_it_on_resume(tmp_path, synthetic_yaml):
    plan_file = tmp_path / "bench.yaml"
    plan_file.write_text(
        "seed: 0\n"
        f"overrides: [federation.rounds=0, data.num_clients=2, {', '.join(FAST)}]\n"
        f"datasets: {{synthetic: ['dataset={synthetic_yaml}']}}\n"
        "methods: {patchcore: [method=patchcore, memory.coreset_ratio=0.1]}\n"
        f"reference: {{python: '{ANOMALIB_PYTHON}'}}\n"
        "perf: {dataset: none}\n"
    )
    out, runs = tmp_path / "bench", tmp_path / "runs"
    results = run_suite(load_plan(plan_file), out, runs, reporter=Reporter(quiet=True))
    rows = {r["method"]: r for r in results["runs"]}
    assert list(rows) == ["patchcore", "anomalib_patchcore"]
    ours, theirs = rows["patchcore"], rows["anomalib_patchcore"]
    assert theirs["scoring_memory_items"] == ours["scoring_memory_items"]  # both keep 10 % of the same patches
    assert set(theirs["product_image_auroc"]) == set(ours["product_image_auroc"])
    assert "| anomalib_patchcore | `coreset_sampling_ratio=0.1 num_neighbors=9` |" in (out / "results.md").read_text()
    again = run_suite(load_plan(plan_file), out, runs, reporter=Reporter(quiet=True), resume=True)
    assert [r["wall_s"] for r in again["runs"]] == [ours["wall_s"], theirs["wall_s"]]  # nothing ran again
