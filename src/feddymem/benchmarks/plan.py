"""The bench plan (``configs/bench*.yaml``): data sets, methods (rows), timings, attacks and the anomalib
reference row; every key checked on load."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from feddymem.benchmarks import anomalib_patchcore
from feddymem.config import config_dir, load_yaml, merge_checked
from feddymem.errors import ConfigError


@dataclass
class PerfPlan:
    """The side-by-side timings of ``make bench``: K-means scales, scoring sizes, throughput images."""

    dataset: str = "elpv"  # the data set whose real uploads and features the timings use
    kmeans_scales: list[int] = field(default_factory=lambda: [1, 10])
    scoring_images: int = 64  # test images whose patches are the scoring queries
    scoring_memory_sizes: list[int] = field(default_factory=lambda: [784, 3136])
    throughput_images: int = 128


@dataclass
class PrivacyPlan:
    """The attacks of ``feddymem privacy-report`` on every row's upload (``client`` < 0: none).

    One report per data set, with the first row's run (its client ``client``'s generator and images) and
    each row's upload settings: the rows must share the generator (``federation.rounds=0``)."""

    client: int = -1
    attack_images: int = 128
    public_images: int = 96
    decoder_steps: int = 0  # 0: 8 epochs over the public images, at least 400 steps


@dataclass
class ReferencePlan:
    """anomalib's PatchCore as a row (``anomalib_patchcore``) on every data set of the plan, run in its own
    environment; ``python`` empty: no such row."""

    python: str = ""  # that environment's interpreter (make anomalib-env: .venv-anomalib/bin/python)
    coreset_ratio: float = 0.1  # anomalib's defaults
    num_neighbors: int = 9
    coreset_selection: str = "anomalib"  # its own k-center loop, or "batched": the same picks in minutes on CPU


@dataclass
class BenchPlan:
    """A committed bench plan (``configs/bench*.yaml``): data sets, methods, rounds and overrides."""

    seed: int = 0
    overrides: list[str] = field(default_factory=list)  # applied to every run
    datasets: dict[str, list[str]] = field(default_factory=dict)  # dataset name → its own overrides
    methods: dict[str, list[str]] = field(default_factory=dict)  # row name → overrides
    convergence: list[str] = field(default_factory=lambda: ["feddymem", "fedavg", "fedprox"])
    perf: PerfPlan = field(default_factory=PerfPlan)
    privacy: PrivacyPlan = field(default_factory=PrivacyPlan)
    reference: ReferencePlan = field(default_factory=ReferencePlan)
    title: str = "FedDyMem benchmarks"  # the heading of results.md
    notes: list[str] = field(default_factory=list)  # lines written under the heading


def plan_rows(plan: BenchPlan) -> dict[str, list[str]]:
    """Every row of the plan (row name → its overrides): the methods, then the anomalib reference if any."""
    rows = dict(plan.methods)
    if plan.reference.python:
        rows[anomalib_patchcore.METHOD] = reference_settings(plan).overrides()
    return rows


def reference_settings(plan: BenchPlan) -> anomalib_patchcore.AnomalibSettings:
    """The anomalib reference row's settings."""
    r = plan.reference
    return anomalib_patchcore.AnomalibSettings(r.coreset_ratio, r.num_neighbors, coreset_selection=r.coreset_selection)


def load_plan(path: str | Path | None = None, seed: int | None = None) -> BenchPlan:
    """The benchmark plan (default ``configs/bench.yaml``); unknown keys are errors. ``seed`` replaces the
    plan's (the same rows at another seed, without a copy of the plan)."""
    path = Path(path) if path else config_dir() / "bench.yaml"
    if not path.is_file():
        raise ConfigError(f"benchmark plan not found: {path}")
    merged = merge_checked(OmegaConf.structured(BenchPlan), load_yaml(path), str(path))
    if seed is not None:
        merged.seed = seed
    plan: BenchPlan = OmegaConf.to_object(merged)  # type: ignore[assignment]
    try:
        reference_settings(plan)  # its values checked here, before any row runs
    except ConfigError as error:
        raise ConfigError(f"{path}: reference.{error}") from None
    return plan
