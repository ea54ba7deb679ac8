"""``feddymem bench suite|render|kmeans|engines|sites|frontier`` (also ``python -m feddymem.benchmarks``).

``suite``: the whole benchmark (``make bench``). ``render``: results.md and convergence.png again from results.json.
``kmeans``: the server K-means timed alone on synthetic uploads, FAISS GPU/CPU vs scikit-learn
(``scripts/gpu_check.sh``; needs no data). ``engines``: one experiment under Fabric and over Flower, back to
back. ``sites``: the server's round with 5 to 500 sites. ``frontier``: a privacy study's accuracy against
membership AUC, as frontier.md and frontier.png, and its knee.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_bench_parser(commands: Any) -> None:
    """Add ``bench`` and its sub-commands to ``commands`` (the sub-parsers of ``feddymem``)."""
    bench = commands.add_parser("bench", help="the benchmarks: every method side by side (make bench)")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    suite = sub.add_parser("suite", help="every method on every data set of the plan; writes results.md/.json")
    suite.add_argument("--plan", default=None, help="benchmark plan (default configs/bench.yaml)")
    suite.add_argument("--out", default="benchmarks", help="where results.md, results.json, convergence.png go")
    suite.add_argument("--runs", default="runs/bench", help="where the runs' folders go")
    suite.add_argument("--datasets", nargs="+", default=None, help="only these data sets of the plan")
    suite.add_argument("--methods", nargs="+", default=None, help="only these methods of the plan")
    suite.add_argument("--seed", type=int, default=None, help="run the plan at this seed instead of its own")
    suite.add_argument(
        "--resume", action="store_true", help="keep the runs already in OUT/results.json; run only the others"
    )
    suite.set_defaults(func=cmd_suite)
    render = sub.add_parser(
        "render", help="rewrite results.md and convergence.png from results.json (and the privacy study's)"
    )
    render.add_argument("--plan", default=None, help="the plan the results came from (its convergence rows)")
    render.add_argument("--out", default="benchmarks", help="the folder holding results.json")
    render.set_defaults(func=cmd_render)
    km = sub.add_parser("kmeans", help="server K-means on synthetic uploads: FAISS vs scikit-learn")
    km.add_argument("--clients", type=int, default=5)
    km.add_argument("--items", type=int, default=784)
    km.add_argument("--dim", type=int, default=152)
    km.add_argument("--scale", type=int, nargs="+", default=[1, 10], help="multiply the uploads by these")
    km.set_defaults(func=cmd_kmeans)
    engines = sub.add_parser("engines", help="one experiment under Fabric and over Flower on loopback, back to back")
    engines.add_argument("overrides", nargs="*", help="key=value, as for feddymem train (e.g. dataset=elpv)")
    engines.add_argument("--out", default="benchmarks/engines", help="where results.md and results.json go")
    engines.add_argument("--runs", default="runs/engines", help="where the runs' folders go")
    engines.set_defaults(func=cmd_engines)
    many = sub.add_parser(
        "sites", help="the server's cost of a round with many sites (synthetic uploads of the real size)"
    )
    many.add_argument("overrides", nargs="*", help="key=value, as for feddymem train (the server's settings)")
    many.add_argument("--sites", type=int, nargs="+", default=[5, 20, 100, 500], help="numbers of sites")
    many.add_argument("--items", type=int, default=3400, help="items each site uploads (ELPV, 5 sites: about 3400)")
    many.add_argument("--patches", type=int, default=50, help="patches each item averages")
    many.add_argument("--out", default="benchmarks/sites", help="where results.md and results.json go")
    many.set_defaults(func=cmd_sites)
    front = sub.add_parser("frontier", help="image AUROC against membership AUC from a privacy study's results.json")
    front.add_argument("--results", required=True, help="the study's results.json")
    front.add_argument("--limit", type=float, default=0.70, help="the membership AUC a setting must stay under")
    front.set_defaults(func=cmd_frontier)


def cmd_suite(args: argparse.Namespace) -> int:
    """``feddymem bench suite``: run the plan."""
    from feddymem.benchmarks.plan import load_plan
    from feddymem.benchmarks.suite import run_suite

    plan = load_plan(args.plan, args.seed)
    results = run_suite(plan, args.out, args.runs, args.datasets, args.methods, resume=args.resume)
    print(f"wrote {args.out}/results.md, results.json and convergence.png ({results['total_s'] / 60:.1f} min)")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    """``feddymem bench render``: results.md and convergence.png again from results.json."""
    from feddymem.benchmarks.plan import load_plan
    from feddymem.benchmarks.suite import write_report
    from feddymem.io import read_json

    out = Path(args.out)
    results = read_json(out / "results.json", "the benchmark results")
    print(f"wrote {write_report(results, load_plan(args.plan), out)} and {out / 'convergence.png'}")
    return 0


def cmd_kmeans(args: argparse.Namespace) -> int:
    """``feddymem bench kmeans``: the server's K-means alone, FAISS against scikit-learn."""
    from feddymem.benchmarks import perf

    for scale in args.scale:
        points = perf.synthetic_uploads(args.clients * scale, args.items, args.dim)
        print(json.dumps(perf.compare_kmeans(points, args.items)))
    return 0


def cmd_engines(args: argparse.Namespace) -> int:
    """``feddymem bench engines``: Fabric and Flower back to back."""
    from feddymem.benchmarks.engines import compare_engines

    results = compare_engines(list(args.overrides), Path(args.out), Path(args.runs))
    for row in results["rows"]:
        print(json.dumps(row))
    print(f"wrote {args.out}/results.md and results.json")
    return 0


def cmd_sites(args: argparse.Namespace) -> int:
    """``feddymem bench sites``: the server's round with 5 ... 500 sites."""
    from feddymem.benchmarks.sites import compare_sites

    compare_sites(list(args.overrides), list(args.sites), args.items, args.patches, Path(args.out))
    print(f"wrote {args.out}/results.md and results.json")
    return 0


def cmd_frontier(args: argparse.Namespace) -> int:
    """``feddymem bench frontier``: a privacy study's frontier table, plot and knee."""
    from feddymem.benchmarks.frontier import frontier_points, frontier_table, knee, plot_frontier
    from feddymem.io import read_json

    source = Path(args.results)
    found = frontier_points(read_json(source, "the privacy study's results"))
    (source.parent / "frontier.md").write_text(frontier_table(found, args.limit))
    plot_frontier(found, source.parent / "frontier.png", args.limit)
    print(f"wrote {source.parent / 'frontier.md'} and frontier.png; knee: {knee(found, args.limit)}")
    return 0
