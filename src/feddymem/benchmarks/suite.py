"""``make bench``: every method and ablation of ``configs/bench.yaml`` on every benchmark data set.

For each data set the backbone features of every image are extracted once (timed: that is the
feature-cache measurement) and shared by all runs, which then differ only in what they train and
share. Each run goes through the same :class:`FederatedOrchestrator` as ``feddymem train``. After
every run ``results.json`` and ``results.md`` are rewritten, so a stopped suite keeps what it did.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from feddymem.benchmarks import anomalib_patchcore
from feddymem.benchmarks.measure import PeakMemory, machine, machine_summary
from feddymem.benchmarks.perf_rows import measure_perf
from feddymem.benchmarks.plan import BenchPlan, plan_rows, reference_settings
from feddymem.benchmarks.results import plot_convergence, render_markdown
from feddymem.config import load_config
from feddymem.errors import ConfigError
from feddymem.federation.orchestrator import FederatedOrchestrator
from feddymem.federation.server import server_limits
from feddymem.io import atomic_write_json, atomic_write_text
from feddymem.logging.console import Reporter


# --- per data set ---------------------------------------------------------------------------------
def _base_overrides(plan: BenchPlan, dataset: str, runs_dir: Path) -> list[str]:
    return [
        f"dataset={dataset}",
        f"seed={plan.seed}",
        *plan.overrides,
        *plan.datasets[dataset],
        f"output_dir={runs_dir}",
    ]


def _fresh(run_dir: Path) -> Path:
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a benchmark rerun replaces its own earlier run folder
    return run_dir


def warm_cache(plan: BenchPlan, dataset: str, runs_dir: Path) -> tuple[FederatedOrchestrator, dict[str, Any]]:
    """Extract every image's features once (timed), then read them all back from the cache (timed): the
    training images too, or the first method's round 0 would pay their extraction."""
    cfg = load_config([*_base_overrides(plan, dataset, runs_dir), f"name={dataset}-features", "method=local"])
    orch = FederatedOrchestrator(cfg, _fresh(runs_dir / f"{dataset}-features"), Reporter(quiet=True))
    orch.setup()
    sets = [s for c in orch.clients for s in (c.memory_set, c.normal_set, c.test_set)]
    unique = len({s.path for d in sets for s in d.samples})
    start = time.perf_counter()
    wrapped = [orch.cache.wrap(d) for d in sets]
    first = time.perf_counter() - start
    start = time.perf_counter()
    reads = 0
    for d in wrapped:
        for batch in DataLoader(d, batch_size=cfg.optim.eval_batch_size):
            reads += len(batch["label"])
    cached = time.perf_counter() - start
    return orch, {
        "images": unique,
        "first_pass_s": first,
        "first_pass_images_per_s": unique / first,
        "cached_reads": reads,
        "cached_pass_s": cached,
        "cached_images_per_s": reads / cached,
        "speedup": (first / unique) / (cached / reads),
        "cache_bytes": orch.cache.nbytes,
        "fp16": orch.cache.fp16,
    }


def run_method(
    plan: BenchPlan, dataset: str, method: str, runs_dir: Path, features: FederatedOrchestrator
) -> dict[str, Any]:
    """One method on one data set, through the real orchestrator; its condensed results.

    The run reads the data set's shared feature cache (``features``) unless it changes the backbone: the
    cache is keyed by image and pre-processing, not by extractor, so such a run extracts its own.
    """
    name = f"{dataset}-{method}"
    overrides = [*_base_overrides(plan, dataset, runs_dir), *plan.methods[method], f"name={name}"]
    cfg = load_config(overrides)
    same_backbone = cfg.model.backbone == features.cfg.model.backbone
    cache = features.cache if same_backbone else None
    orch = FederatedOrchestrator(cfg, _fresh(runs_dir / name), Reporter(quiet=True), feature_cache=cache)
    with PeakMemory() as peak:
        start = time.perf_counter()
        summary = orch.run()
        wall = time.perf_counter() - start
    assert summary is not None  # one process: rank 0
    return condense(dataset, method, plan.methods[method], summary, wall, peak, orch)


def condense(
    dataset: str,
    method: str,
    overrides: list[str],
    summary: dict[str, Any],
    wall: float,
    peak: PeakMemory,
    orch: FederatedOrchestrator,
) -> dict[str, Any]:
    """One method's row of the results: accuracy, bytes, time and memory of a finished run."""
    rounds = summary["rounds"]
    final = summary["final"]  # each client at the round it keeps (selection.keep)
    n_clients = len(final["clients"])
    clients = {
        str(cid): {k: c.get(k) for k in ("image_auroc", "pixel_auroc", "aupro") if c.get(k) is not None}
        for cid, c in final["clients"].items()
    }
    per_product: dict[str, list[float]] = {}
    for c in final["clients"].values():
        for product, values in c.get("products", {}).items():
            if values.get("image_auroc") == values.get("image_auroc"):  # not NaN
                per_product.setdefault(product, []).append(values["image_auroc"])

    def mean_of(key: str) -> float | None:
        values = [c[key] for c in clients.values() if key in c]
        return float(np.mean(values)) if values else None

    training = [r for r in rounds if r["round"] > 0] or rounds
    memory_dim = server_limits(orch.cfg).memory_dim
    patches = [c.get("memory_patches") for r in rounds for c in r["clients"].values() if c.get("memory_patches")]
    return {
        "dataset": dataset,
        "method": method,
        "overrides": list(overrides),
        "mean_image_auroc": final["mean_image_auroc"],
        "pixel_auroc": mean_of("pixel_auroc"),
        "aupro": mean_of("aupro"),
        "clients": clients,
        # Mean over the clients that hold it: scores compared within one product only.
        "product_image_auroc": {p: float(np.mean(v)) for p, v in per_product.items()},
        "auroc_per_round": [r["mean_image_auroc"] for r in rounds],
        "criterion_per_round": [r.get("mean_criterion") for r in rounds],
        "kept_rounds": {str(cid): c.get("kept_round") for cid, c in final["clients"].items()},
        "bytes_up_per_client_round": float(np.mean([r["bytes_up"] for r in rounds])) / n_clients,
        "bytes_down_per_client_round": float(np.mean([r["bytes_down"] for r in rounds])) / n_clients,
        # The un-reduced bank: every patch of a client's training images, float32, per client.
        "unreduced_bytes_per_client": float(np.mean(patches)) * memory_dim * 4 if patches else None,
        # Items a client scores against (the global memory, or its own / the pooled coreset) and uploads.
        "scoring_memory_items": int(orch.clients[0].module.model.memory.shape[0]) if orch.clients else None,
        "upload_items_per_client": float(np.mean(uploads)) if (uploads := _upload_items(rounds)) else None,
        "round0_s": rounds[0]["time_s"],
        "time_per_round_s": float(np.mean([r["time_s"] for r in training])),
        "rounds": len(rounds) - 1,
        "wall_s": wall,
        "peak_rss_mb": peak.rss_mb,
        "peak_rss_resettable": peak.resettable,
        "peak_cuda_mb": peak.cuda_mb,
    }


def _upload_items(rounds: list[dict[str, Any]]) -> list[int]:
    return [
        c["memory_items"] for r in rounds for c in r["clients"].values() if c.get("uploaded") and "memory_items" in c
    ]


# --- performance side by side -----------------------------------------------------------------------
def run_suite(
    plan: BenchPlan,
    out_dir: str | Path = "benchmarks",
    runs_dir: str | Path = "runs/bench",
    datasets: list[str] | None = None,
    methods: list[str] | None = None,
    reporter: Reporter | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the plan (or the named subset); write results.json, results.md and convergence.png.

    ``resume``: keep the runs already in ``out_dir/results.json`` that the plan still describes (same
    seed, common overrides and row overrides) and run only the others, so a stopped suite goes on.
    """
    reporter = reporter or Reporter()
    out_dir, runs_dir = Path(out_dir), Path(runs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = plan_rows(plan)
    for name, known in ((datasets, plan.datasets), (methods, rows)):
        unknown = sorted(set(name or []) - set(known))
        if unknown:
            raise ConfigError(f"not in the benchmark plan: {', '.join(unknown)}; it has {', '.join(known)}")
    datasets = datasets or list(plan.datasets)
    methods = methods or list(rows)
    torch.manual_seed(plan.seed)
    results = _empty_results(plan, datasets)
    earlier_s = _resume_from(results, plan, out_dir / "results.json") if resume else 0.0
    # Checked before anything runs: a privacy plan's rows must share one generator.
    variants = {d: privacy_variants(plan, d, methods, runs_dir) for d in datasets} if plan.privacy.client >= 0 else {}
    start = time.perf_counter()
    order = {key: i for i, key in enumerate(itertools.product(plan.datasets, rows))}  # the plan's order

    def save() -> None:
        results["total_s"] = earlier_s + time.perf_counter() - start
        results["runs"].sort(key=lambda r: order[(r["dataset"], r["method"])])
        atomic_write_json(out_dir / "results.json", results)
        write_report(results, plan, out_dir)

    for dataset in datasets:
        done = {r["method"] for r in results["runs"] if r["dataset"] == dataset}
        todo = [m for m in methods if m not in done]
        if done:
            reporter.print(f"[bench] {dataset}: kept from {out_dir / 'results.json'}: {', '.join(sorted(done))}")
        perf_missing = dataset == plan.perf.dataset and results["perf"] is None
        if not todo and not perf_missing and plan.privacy.client < 0:
            continue
        features: FederatedOrchestrator | None = None
        if perf_missing or plan.privacy.client >= 0 or any(m != anomalib_patchcore.METHOD for m in todo):
            # anomalib's row reads the image files itself: a plan of that row alone extracts nothing
            reporter.print(f"[bench] {dataset}: extracting features once for every method")
            features, cache_stats = warm_cache(plan, dataset, runs_dir)
            results["cache"][dataset] = cache_stats
            if perf_missing:
                reporter.print(f"[bench] {dataset}: K-means, scoring and throughput side by side")
                results["perf"] = measure_perf(plan, features)
        save()
        for method in todo:
            reporter.print(f"[bench] {dataset}: {method}")
            run = _run_row(plan, dataset, method, runs_dir, features)
            results["runs"].append(run)
            reporter.print(
                f"[bench] {dataset}: {method}: mean image AUROC {run['mean_image_auroc']:.4f}, "
                f"{run['time_per_round_s']:.1f} s/round, wall {run['wall_s']:.0f} s"
            )
            save()
        if plan.privacy.client >= 0:
            reporter.print(f"[bench] {dataset}: attacks on client {plan.privacy.client}'s uploads")
            first_run = runs_dir / f"{dataset}-{methods[0]}"
            results["privacy"][dataset] = attack_rows(plan, dataset, variants[dataset], first_run)
            save()
    return results


def _empty_results(plan: BenchPlan, datasets: list[str]) -> dict[str, Any]:
    """``results.json`` before any run: the machine, the plan's title, notes, seed and overrides."""
    return {
        "machine": machine(),
        "title": plan.title,
        "notes": plan.notes,
        "seed": plan.seed,
        "overrides": plan.overrides,
        "datasets": {d: plan.datasets[d] for d in datasets},
        "runs": [],
        "cache": {},
        "perf": None,
        "privacy": {},
    }


def _run_row(
    plan: BenchPlan, dataset: str, method: str, runs_dir: Path, features: FederatedOrchestrator | None
) -> dict[str, Any]:
    """One row of the table: a run of ``method`` (on the data set's extracted ``features``), or anomalib's
    PatchCore in its own environment."""
    if method != anomalib_patchcore.METHOD:
        assert features is not None  # extracted whenever one of our rows is to run
        return run_method(plan, dataset, method, runs_dir, features)
    base = _base_overrides(plan, dataset, runs_dir)
    row = anomalib_patchcore.run_in_environment(
        plan.reference.python, base, reference_settings(plan), runs_dir / dataset
    )
    return {**row, "dataset": dataset}  # the plan's name for the data set, as the other rows


def _resume_from(results: dict[str, Any], plan: BenchPlan, path: Path) -> float:
    """Take the runs of an earlier ``results.json`` that ``plan`` still describes; its running time.

    A file from another seed or other common overrides is an error (its rows would not compare); a row
    whose overrides changed since is dropped and runs again.
    """
    if not path.exists():
        return 0.0
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot resume from {path}: {err}") from err
    for key in ("seed", "overrides"):
        if earlier.get(key) != results[key]:
            raise ConfigError(
                f"cannot resume from {path}: its {key} is {earlier.get(key)!r}, the plan's is {results[key]!r};"
                " run without --resume (or with another --out) to start again"
            )
    results["runs"] = [
        r
        for r in earlier.get("runs", [])
        if r["dataset"] in plan.datasets and plan_rows(plan).get(r["method"]) == r["overrides"]
    ]
    # A resume with fewer data sets (``--datasets``) still reports the kept runs of the others.
    kept = {r["dataset"] for r in results["runs"]}
    results["datasets"] = {d: o for d, o in plan.datasets.items() if d in results["datasets"] or d in kept}
    results["cache"] = {d: c for d, c in earlier.get("cache", {}).items() if d in plan.datasets}
    results["perf"] = earlier.get("perf")
    # A data set's attacks run again when the data set runs; the others' are kept.
    results["privacy"] = {d: p for d, p in (earlier.get("privacy") or {}).items() if d in plan.datasets}
    before = earlier.get("machine", {})
    commit = before.get("commit")
    if results["runs"] and commit and commit != results["machine"]["commit"]:
        results["machine"]["commit"] += f", resumed from {commit}"
    if results["runs"]:
        # Kept rows may come from another machine, and the earlier file's notes say how they were made:
        # neither is lost when the header is written again for this machine.
        here = machine_summary(results["machine"])
        machines = [*before.get("earlier_machines", []), *([machine_summary(before)] if "cpu" in before else [])]
        results["machine"]["earlier_machines"] = [m for m in dict.fromkeys(machines) if m != here]
        results["notes"] = list(dict.fromkeys([*results["notes"], *earlier.get("notes", [])]))
    return float(earlier.get("total_s", 0.0))


def write_report(results: dict[str, Any], plan: BenchPlan, out_dir: Path) -> Path:
    """``convergence.png`` and ``results.md`` of ``results`` (a privacy study in ``out_dir/privacy/`` adds
    its section); the path of results.md."""
    plot_convergence(results, plan.convergence, out_dir / "convergence.png")
    study_path = out_dir / "privacy" / "results.json"
    study = json.loads(study_path.read_text()) if study_path.is_file() else None
    path = out_dir / "results.md"
    atomic_write_text(path, render_markdown(results, plan.convergence, study))
    return path


def privacy_variants(plan: BenchPlan, dataset: str, methods: list[str], runs_dir: Path) -> list[Any]:
    """Each method's upload settings, for the privacy attacks; every row must be round 0 (one generator)."""
    from feddymem.privacy.report import UploadVariant

    variants = []
    for method in (m for m in methods if m in plan.methods):  # the anomalib row uploads nothing
        cfg = load_config([*_base_overrides(plan, dataset, runs_dir), *plan.methods[method]])
        if cfg.federation.rounds != 0:
            raise ConfigError(
                f"privacy plan: '{method}' trains (federation.rounds={cfg.federation.rounds}); the attacked rows "
                "share one generator, so every row needs federation.rounds=0"
            )
        variants.append(UploadVariant.of_config(method, cfg))
    return variants


def attack_rows(plan: BenchPlan, dataset: str, variants: list[Any], first_run: Path) -> dict[str, Any]:
    """``feddymem privacy-report`` on the data set's first run, one row per method's upload settings."""
    from feddymem.privacy.report import privacy_report

    p = plan.privacy
    return privacy_report(
        first_run,
        p.client,
        variants,
        attack_images=p.attack_images,
        public_images=p.public_images,
        seed=plan.seed,
        own_upload=False,
        decoder_steps=p.decoder_steps,
    )
