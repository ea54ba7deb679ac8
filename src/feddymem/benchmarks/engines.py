"""``feddymem bench engines``: one experiment under the Fabric engine and over Flower on loopback, back to
back on one machine: wall time, seconds per round, bytes each client sends and receives, and accuracy.

Flower's sites start cold: their feature cache (``cache.dir``) is a new folder of the run, so the
comparison includes every site's first extraction, as Fabric's run includes its own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from feddymem.benchmarks.measure import machine
from feddymem.io import atomic_write_json, atomic_write_text

ENGINES = ("fabric", "flower")


def engine_row(engine: str, wall_s: float, summary: dict[str, Any]) -> dict[str, Any]:
    """One engine's numbers from its run's summary (``metrics.json``)."""
    rounds = summary["rounds"]
    clients = max(1, len(rounds[0]["clients"])) if rounds else 1
    later = [r["time_s"] for r in rounds[1:]]
    return {
        "engine": engine,
        "wall_s": wall_s,
        "rounds": len(rounds),
        "round0_s": rounds[0]["time_s"] if rounds else float("nan"),
        "later_round_s": sum(later) / len(later) if later else float("nan"),
        # The kept states scored at the end (Flower: within the last round, whose evaluation carries them).
        "final_scoring_s": sum(c.get("eval_time_s", 0.0) for c in summary["final"]["clients"].values()),
        "bytes_up_per_client_round": sum(r["bytes_up"] for r in rounds) / clients / max(1, len(rounds)),
        "bytes_down_per_client_round": sum(r["bytes_down"] for r in rounds) / clients / max(1, len(rounds)),
        "mean_image_auroc": summary["final"]["mean_image_auroc"],
    }


def compare_engines(overrides: list[str], out: Path, runs: Path) -> dict[str, Any]:
    """Run ``overrides`` under each engine (fresh run folders under ``runs``); write ``out/results.json`` and
    ``out/results.md``."""
    from feddymem.api import train

    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for engine in ENGINES:
        run_dir = runs / f"{engine}-{stamp}"
        extra = [f"federation.engine={engine}"]
        if engine == "flower":
            extra.append(f"cache.dir={runs / f'features-{stamp}'}")
        start = time.perf_counter()
        _, summary = train([*overrides, *extra], run_dir=run_dir)
        rows.append(engine_row(engine, time.perf_counter() - start, summary))
        if engine == "flower":
            from feddymem.flower.local import loopback_workers

            rows[-1]["site_workers"] = loopback_workers(summary["sites"])
    results = {"machine": machine(), "overrides": overrides, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", engines_table(results))
    return results


def _mb(value: float) -> str:
    return f"{value / 2**20:.2f} MB"


def _workers(results: dict[str, Any]) -> str:
    flower = [r for r in results["rows"] if r["engine"] == "flower"]
    count = flower[0].get("site_workers") if flower else None
    return "site workers" if count is None else f"{count} site worker{'s' if count != 1 else ''}"


def engines_table(results: dict[str, Any]) -> str:
    """``results.md``: the engines side by side, and Flower's wall time against Fabric's."""
    m = results["machine"]
    lines = [
        "# Fabric and Flower, back to back",
        "",
        f"`feddymem bench engines {' '.join(results['overrides'])}`",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, GPU: {m['gpu'] or 'none'}; "
        f"commit {m['commit']}",
        "- Flower: a SuperLink and one SuperNode per client on loopback, TLS and SuperNode authentication; the "
        f"sites' messages run in {_workers(results)} (`feddymem flower worker`); the sites' feature cache starts "
        "empty.",
        "",
        "| engine | wall s | rounds | round 0 s | later round s | final scoring s | up / client / round "
        "| down / client / round | mean image AUROC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['engine']} | {r['wall_s']:.0f} | {r['rounds']} | {r['round0_s']:.1f} | {r['later_round_s']:.1f} "
            f"| {r.get('final_scoring_s', float('nan')):.1f} | {_mb(r['bytes_up_per_client_round'])} "
            f"| {_mb(r['bytes_down_per_client_round'])} | {r['mean_image_auroc']:.4f} |"
        )
    by = {r["engine"]: r for r in results["rows"]}
    if set(by) >= {"fabric", "flower"}:
        ratio = by["flower"]["wall_s"] / by["fabric"]["wall_s"]
        lines += [
            "",
            f"Flower's wall time is **{ratio:.2f}×** Fabric's (goal: at most 1.5×). Final scoring: the kept states'"
            " test metrics (the sum over clients); under Flower they come with the last round's evaluation, so"
            " that round's time includes them.",
        ]
    return "\n".join(lines) + "\n"
