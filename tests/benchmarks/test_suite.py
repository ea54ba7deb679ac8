"""The benchmark suite end to end on the synthetic data: real runs, real timings, real files."""

from __future__ import annotations

import json

import pytest

from conftest import FAST
from feddymem.benchmarks.plan import load_plan
from feddymem.benchmarks.suite import run_suite
from feddymem.cli import main
from feddymem.errors import ConfigError
from feddymem.logging.console import Reporter


def _plan(tmp_path, synthetic_yaml):
    path = tmp_path / "bench.yaml"
    path.write_text(
        "seed: 0\n"
        f"overrides: [federation.rounds=1, data.num_clients=3, {', '.join(FAST)}]\n"
        f"datasets: {{synthetic: ['dataset={synthetic_yaml}']}}\n"
        "methods: {feddymem: [], fedavg: [method=fedavg], no_reduce: [memory.reduce=coreset, "
        "memory.coreset_ratio=0.05], local: [method=local]}\n"
        "perf: {dataset: synthetic, kmeans_scales: [1, 2], scoring_images: 4, scoring_memory_sizes: [64],"
        " throughput_images: 8}\n"
    )
    return path


@pytest.mark.slow
def test_suite_writes_results_for_every_method(tmp_path, synthetic_yaml, synthetic_root):
    out = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                "suite",
                "--plan",
                str(_plan(tmp_path, synthetic_yaml)),
                "--out",
                str(out),
                "--runs",
                str(tmp_path / "runs"),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    runs = {r["method"]: r for r in results["runs"]}
    assert list(runs) == ["feddymem", "fedavg", "no_reduce", "local"]
    assert all(len(r["auroc_per_round"]) == 2 and r["peak_rss_mb"] > 100 for r in runs.values())
    assert runs["local"]["bytes_up_per_client_round"] == 0
    assert runs["feddymem"]["unreduced_bytes_per_client"] > runs["feddymem"]["bytes_up_per_client_round"]
    kmeans = results["perf"]["kmeans"]
    assert [k["scale"] for k in kmeans] == [1, 2] and kmeans[1]["points"] == 2 * kmeans[0]["points"]
    assert all(k["faiss_cpu_s"] > 0 and k["sklearn_s"] > 0 for k in kmeans)
    assert all(s["same_result"] for s in results["perf"]["scoring"])
    cache = results["cache"]["synthetic"]
    images = [p for p in synthetic_root.glob("*/*/*/*.png") if "ground_truth" not in p.parts]
    assert cache["images"] == len(images) and cache["speedup"] > 1  # every image, training images too
    md = (out / "results.md").read_text()
    assert "## synthetic" in md and "| fedavg | `method=fedavg` |" in md and "no GPU" in md
    assert "bank / FedDyMem" in md and "## Convergence" in md
    assert (out / "convergence.png").read_bytes()[:4] == b"\x89PNG"
    # render draws both again from results.json alone
    (out / "convergence.png").unlink()
    (out / "results.md").unlink()
    assert main(["bench", "render", "--out", str(out), "--plan", str(_plan(tmp_path, synthetic_yaml))]) == 0
    assert (out / "results.md").read_text() == md and (out / "convergence.png").read_bytes()[:4] == b"\x89PNG"


def test_plan_errors_name_the_key_and_the_choices(tmp_path, synthetic_yaml):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methodz: {}\n")
    with pytest.raises(ConfigError, match="unknown config key 'methodz'"):
        load_plan(bad)
    bad.write_text("reference: {python: x, coreset_selection: fast}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: reference.coreset_selection: 'fast' is not one of"):
        load_plan(bad)
    with pytest.raises(ConfigError, match="not in the benchmark plan: nope; it has feddymem, fedavg"):
        run_suite(load_plan(_plan(tmp_path, synthetic_yaml)), tmp_path / "o", tmp_path / "r", methods=["nope"])
    assert load_plan().methods["fedprox"] == ["method=fedprox", "federation.prox_mu=0.01", "federation.eval_every=1"]
    assert load_plan().seed == 0 and load_plan(seed=2).seed == 2  # --seed: the same rows at another seed


def test_a_plan_of_the_reference_row_alone_extracts_no_features(tmp_path, synthetic_yaml):
    plan = tmp_path / "reference.yaml"
    plan.write_text(
        f"datasets: {{synthetic: ['dataset={synthetic_yaml}']}}\nmethods: {{}}\n"
        f"reference: {{python: '{tmp_path / 'no-env/bin/python'}'}}\nperf: {{dataset: none}}\n"
    )
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="anomalib's environment not found"):  # the row was reached ...
        run_suite(load_plan(plan), tmp_path / "out", runs, reporter=Reporter(quiet=True))
    assert not (runs / "synthetic-features").exists()  # ... without extracting our features first


@pytest.mark.slow
def test_resume_keeps_the_finished_runs_and_runs_the_rest(tmp_path, synthetic_yaml):
    plan = load_plan(_plan(tmp_path, synthetic_yaml))
    plan.perf.dataset = "none"  # the timings are tested above
    out, runs = tmp_path / "bench", tmp_path / "runs"
    first = run_suite(plan, out, runs, methods=["local"])
    # the kept row ran on another machine, under a note: the resumed file names both
    saved = json.loads((out / "results.json").read_text())
    saved["machine"] |= {"cpu": "Another CPU", "cores": 64}
    saved["notes"] = ["Row local ran on the lab's server."]
    (out / "results.json").write_text(json.dumps(saved))
    second = run_suite(plan, out, runs, methods=["no_reduce", "local"], resume=True)
    md = (out / "results.md").read_text()
    assert "- Rows kept by `--resume` from an earlier machine: Another CPU, 64 cores" in md
    assert "Row local ran on the lab's server." in md and second["machine"]["cpu"] != "Another CPU"
    assert [r["method"] for r in second["runs"]] == ["no_reduce", "local"]  # the plan's order
    assert second["runs"][1] == first["runs"][0]  # kept as it was, not run again
    assert second["total_s"] > first["total_s"]
    assert "| no_reduce |" in (out / "results.md").read_text()
    plan.methods["local"] = ["method=local", "memory.coreset_ratio=0.05"]  # the row changed: it runs again
    third = run_suite(plan, out, runs, methods=["local"], resume=True)
    assert [r["overrides"] for r in third["runs"]] == [plan.methods["no_reduce"], plan.methods["local"]]
    plan.perf.dataset = "synthetic"  # every row is kept, but the perf section was never measured: it runs
    fourth = run_suite(plan, out, runs, methods=["no_reduce", "local"], resume=True)
    assert fourth["runs"] == third["runs"] and fourth["perf"]["kmeans"][0]["faiss_cpu_s"] > 0
    # a resume on another data set only (--datasets) keeps the first one's section in results.md
    plan.datasets["synthetic_again"] = plan.datasets["synthetic"]
    fifth = run_suite(plan, out, runs, datasets=["synthetic_again"], methods=["local"], resume=True)
    assert list(fifth["datasets"]) == ["synthetic", "synthetic_again"] and len(fifth["runs"]) == 3
    md = (out / "results.md").read_text()
    assert "## synthetic\n" in md and "## synthetic_again\n" in md
    plan.seed = 1
    with pytest.raises(ConfigError, match="its seed is 0, the plan's is 1"):
        run_suite(plan, out, runs, resume=True)


@pytest.mark.slow
def test_privacy_study_attacks_every_rows_upload_and_links_into_results_md(tmp_path, synthetic_yaml):
    plan = tmp_path / "privacy.yaml"
    plan.write_text(
        "seed: 0\n"
        f"overrides: [federation.rounds=0, data.num_clients=2, {', '.join(FAST)}]\n"
        f"datasets: {{synthetic: ['dataset={synthetic_yaml}']}}\n"
        "methods: {feddymem: [memory.min_cluster_size=3], noisy: [memory.reduce=cluster_mean, "
        "privacy.noise_multiplier=1, privacy.patches_per_image=4]}\n"
        "convergence: []\nperf: {dataset: none}\n"
        "privacy: {client: 0, attack_images: 6, public_images: 8, decoder_steps: 100}\n"
    )
    out = tmp_path / "bench"
    study = run_suite(load_plan(plan), out / "privacy", tmp_path / "runs")
    rows = {r["upload"]: r for r in study["privacy"]["synthetic"]["rows"]}
    references = ["per-image embeddings (a)", "un-reduced bank: coreset of raw patches (b)"]
    assert list(rows) == [*references, "feddymem", "noisy"]
    assert rows["noisy"]["epsilon"] > 0 and rows["feddymem"]["epsilon"] is None
    assert rows["feddymem"]["patches_per_item"] >= 3
    md = (out / "privacy" / "results.md").read_text()
    assert "## Privacy: what each upload leaks" in md
    assert "| noisy | `memory.reduce=cluster_mean privacy.noise_multiplier=1" in md
    assert "## Convergence" not in md and not (out / "privacy" / "convergence.png").exists()
    # A resume on another data set attacks that one and keeps the first one's attacks.
    twice = load_plan(plan)
    twice.datasets["synthetic_again"] = twice.datasets["synthetic"]
    saved = json.loads((out / "privacy" / "results.json").read_text())["privacy"]["synthetic"]
    resumed = run_suite(twice, out / "privacy", tmp_path / "runs", datasets=["synthetic_again"], resume=True)
    assert resumed["privacy"]["synthetic"] == saved
    assert [r["upload"] for r in resumed["privacy"]["synthetic_again"]["rows"]] == list(rows)
    # The main results.md links the study in: rendered again from its results.json.
    (out / "results.json").write_text((out / "privacy" / "results.json").read_text().replace('"privacy": {', '"x": {'))
    assert main(["bench", "render", "--out", str(out), "--plan", str(plan)]) == 0
    assert "From the privacy study ([`privacy/results.md`]" in (out / "results.md").read_text()
    trained = tmp_path / "trained.yaml"
    trained.write_text(plan.read_text().replace("federation.rounds=0", "federation.rounds=1"))
    with pytest.raises(ConfigError, match="'feddymem' trains"):  # before any run starts
        run_suite(load_plan(trained), tmp_path / "o2", tmp_path / "r2")
    assert not (tmp_path / "r2").exists()
