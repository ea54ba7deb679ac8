"""Same numbers before and after a refactor: a fixed-seed run of every method on the synthetic set.

    python scripts/same_numbers.py --out /tmp/before.json            # at the old commit
    python scripts/same_numbers.py --out /tmp/after.json --compare /tmp/before.json

Each run is ``feddymem train`` with the seed fixed (2 rounds, 3 clients, the synthetic products of
``tests/synthetic.py``); the file holds every number of each run's ``metrics.json`` except times and
paths. ``--compare`` exits 1 and names every number that moved.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from feddymem.cli import main
from synthetic import dataset_yaml, make_dataset

COMMON = [
    "federation.rounds=2",
    "data.num_clients=3",
    "federation.local_epochs=1",
    "federation.eval_every=1",
    "memory.kmeans_iters=5",
    "server.kmeans_iters=5",
    "optim.eval_batch_size=8",
    "logger=none",
    "quiet=true",
    "seed=0",
]
# Every method at the defaults, plus the settings whose code paths the defaults skip.
RUNS = {
    "feddymem": [],
    "local": ["method=local"],
    "centralized": ["method=centralized"],
    "patchcore": ["method=patchcore"],
    "fedavg": ["method=fedavg"],
    "fedprox": ["method=fedprox"],
    "feddymem_context": ["model.scoring.context=9"],
    "feddymem_cluster_mean": ["memory.reduce=cluster_mean", "memory.size=0", "server.size=0"],
    "feddymem_noise": ["privacy.noise_multiplier=1.0", "memory.reduce=cluster_mean"],
    "feddymem_strict": ["privacy.profile=strict", "data.num_clients=1"],
}
# Privacy noise is drawn from the OS's entropy on purpose (a seeded draw could be subtracted): these runs
# must complete, their numbers are not compared.
RANDOM = {"feddymem_noise"}
SKIP = ("time", "seconds", "path", "dir", "started", "finished", "version", "host", "_s")


def numbers(value, prefix: str = "") -> dict[str, float]:
    """Every number of a JSON value by its dotted key, times and paths left out."""
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for key, item in value.items():
            if not any(s in str(key) for s in SKIP):
                out.update(numbers(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            out.update(numbers(item, f"{prefix}{i}."))
        return out
    if isinstance(value, bool | int | float) and value is not None:
        return {prefix.rstrip("."): float(value)}
    return {}


def run_all(out: Path, only: list[str] | None) -> dict[str, dict[str, float]]:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_dataset(root, products=2)
        data = dataset_yaml(root, sorted(p for p in root.iterdir() if p.is_dir()))
        for name, overrides in RUNS.items():
            if only and name not in only:
                continue
            code = main(
                ["train", f"dataset={data}", f"name={name}", f"output_dir={root / 'runs'}", *COMMON, *overrides]
            )
            if code != 0:
                raise SystemExit(f"{name}: feddymem train exited {code}")
            results[name] = numbers(json.loads((root / "runs" / name / "metrics.json").read_text()))
            print(f"{name}: {len(results[name])} numbers", flush=True)
    out.write_text(json.dumps(results, indent=1, sort_keys=True))
    return results


def compare(after: dict, before: dict, tolerance: float) -> list[str]:
    moved = []
    for run in sorted((set(before) & set(after)) - RANDOM):
        for key in sorted(set(before[run]) | set(after[run])):
            a, b = after[run].get(key), before[run].get(key)
            if a is None or b is None:
                moved.append(f"{run}: {key} only {'before' if a is None else 'after'}")
            elif not (math.isclose(a, b, abs_tol=tolerance) or (math.isnan(a) and math.isnan(b))):
                moved.append(f"{run}: {key} {b} -> {a}")
    return moved


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write this commit's numbers (JSON)")
    parser.add_argument("--compare", type=Path, help="numbers of an earlier commit to compare with")
    parser.add_argument("--runs", nargs="*", help=f"a subset of {sorted(RUNS)}")
    parser.add_argument("--tolerance", type=float, default=0.0)
    args = parser.parse_args()
    after = run_all(args.out, args.runs)
    if args.compare is None:
        return 0
    moved = compare(after, json.loads(args.compare.read_text()), args.tolerance)
    print("\n".join(moved) if moved else f"same numbers: {sum(map(len, after.values()))} in {len(after)} runs")
    return 1 if moved else 0


if __name__ == "__main__":
    raise SystemExit(cli())
