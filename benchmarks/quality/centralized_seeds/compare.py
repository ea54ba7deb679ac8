"""Issue 30's "done when", per product over seeds: FedDyMem federated against pooled data and anomalib.

Reads the suites' ``results.json`` files (run from the repository root):

    python benchmarks/quality/centralized_seeds/compare.py > benchmarks/quality/centralized_seeds/comparison.md

- FedDyMem (defaults) and ``method=centralized``: ``benchmarks/quality/centralized_seeds/seedN``;
- anomalib's PatchCore: seed 0 from ``make bench`` (``benchmarks/results.json``), seeds 1 and 2 (industrial
  and medical) from ``benchmarks/quality/anomalib_rows/seedN``.

A seed fixes the held-out normals (removed from every row's training set), the partition and the k-center
starts; every row of a seed scores the same test images. The bar: FedDyMem's image AUROC at least the better
of the two references minus 0.005 per product (mean over the seeds); pixel AUROC and AUPRO within 0.01.
"""

import json
from pathlib import Path
from statistics import mean

SEEDS = (0, 1, 2)
OURS = "benchmarks/quality/centralized_seeds/seed{seed}/results.json"
ANOMALIB = {
    0: "benchmarks/results.json",
    1: "benchmarks/quality/anomalib_rows/seed1/results.json",
    2: "benchmarks/quality/anomalib_rows/seed2/results.json",
}
REFERENCE = "anomalib_patchcore"
ROWS = {"feddymem": "FedDyMem federated", "centralized": "`method=centralized`", REFERENCE: "anomalib"}
IMAGE_TOLERANCE, PIXEL_TOLERANCE = 0.005, 0.01


def runs_of(seed: int) -> dict[tuple[str, str], dict]:
    """The runs of one seed by (data set, method): ours and anomalib's."""
    runs: dict[tuple[str, str], dict] = {}
    # make bench's results.json holds rows of ours too (another machine, another day): only anomalib's is read
    for path, methods in ((OURS.format(seed=seed), ("feddymem", "centralized")), (ANOMALIB[seed], (REFERENCE,))):
        if methods == (REFERENCE,) and not Path(path).exists():
            continue  # a seed of anomalib's row not run (yet): its cells say "–"
        results = json.loads(Path(path).read_text())
        assert results["seed"] == seed, f"{path} is seed {results['seed']}, not {seed}"
        for run in results["runs"]:
            if run["method"] in methods:
                runs[(run["dataset"], run["method"])] = run
    return runs


def metric_rows(by_seed: dict[int, dict]) -> list[tuple[str, str, dict[str, list[float | None]], float]]:
    """(data set, metric name, values per method and seed (None: not run), tolerance) for every product and pixel
    metric."""
    datasets = sorted(
        {d for runs in by_seed.values() for d, _ in runs}, key=["elpv", "shared_industrial", "shared_medical"].index
    )
    rows = []
    for dataset in datasets:
        first = by_seed[SEEDS[0]][(dataset, "feddymem")]
        metrics = [
            (f"{p} image AUROC", lambda r, p=p: r["product_image_auroc"][p], IMAGE_TOLERANCE)
            for p in first["product_image_auroc"]
        ]
        metrics.append(("client-level mean image AUROC", lambda r: r["mean_image_auroc"], IMAGE_TOLERANCE))
        if first["pixel_auroc"] is not None:
            metrics += [
                ("pixel AUROC", lambda r: r["pixel_auroc"], PIXEL_TOLERANCE),
                ("AUPRO", lambda r: r["aupro"], PIXEL_TOLERANCE),
            ]
        for name, read, tolerance in metrics:
            values = {
                m: [read(by_seed[s][(dataset, m)]) if (dataset, m) in by_seed[s] else None for s in SEEDS] for m in ROWS
            }
            rows.append((dataset, name, values, tolerance))
    return rows


def main() -> None:
    """Print the table (markdown) to stdout."""
    by_seed = {seed: runs_of(seed) for seed in SEEDS}
    print("# FedDyMem against pooled data and anomalib's PatchCore, per product, seeds 0 / 1 / 2\n")
    print(
        "Written by `compare.py` (its docstring says from which files). Each cell: the mean of the seeds run,"
        " then seeds 0 / 1 / 2 (– not run). Gap: FedDyMem's mean minus the better reference's; met: at or"
        f" above it minus {IMAGE_TOLERANCE} (image AUROC) or {PIXEL_TOLERANCE} (pixel AUROC, AUPRO).\n"
    )
    print("| data set | metric | " + " | ".join(ROWS.values()) + " | gap | met |")
    print("|---|---|" + "---|" * len(ROWS) + "---|---|")
    for dataset, name, values, tolerance in metric_rows(by_seed):
        means = {m: mean(x for x in v if x is not None) for m, v in values.items() if any(x is not None for x in v)}
        cells = [
            f"**{means[m]:.4f}** ({' / '.join('–' if x is None else f'{x:.3f}' for x in v)})" if m in means else "–"
            for m, v in values.items()
        ]
        gap = means["feddymem"] - max(value for m, value in means.items() if m != "feddymem")
        met = "yes" if gap >= -tolerance else "**no**"
        print(f"| {dataset} | {name} | " + " | ".join(cells) + f" | {gap:+.4f} | {met} |")


if __name__ == "__main__":
    main()
