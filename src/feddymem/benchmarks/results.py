"""Rendering of the benchmark results: ``results.md`` and the convergence plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from feddymem.benchmarks.measure import machine_summary
from feddymem.io import save_figure
from feddymem.logging.console import human_bytes


def _f(value: float | None, digits: int = 4) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if not a or not b else f"{a / b:.1f}×"


def plot_convergence(results: dict[str, Any], methods: list[str], out: Path) -> None:
    """Mean image AUROC per round, one panel per data set; local and centralised as dashed references (their
    kept states' AUROC: they are not scored every round)."""
    datasets = list(dict.fromkeys(r["dataset"] for r in results["runs"]))
    if not datasets or not methods:
        return
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for run in (r for r in results["runs"] if r["dataset"] == dataset):
            colour = f"C{len(ax.lines)}"  # one colour per drawn line (axhline does not advance the cycle)
            if run["method"] in methods:
                curve = run["auroc_per_round"]
                ax.plot(range(len(curve)), curve, marker="o", color=colour, label=run["method"])
            elif run["method"] in ("local", "centralized") and run.get("mean_image_auroc") is not None:
                ax.axhline(run["mean_image_auroc"], ls="--", alpha=0.7, color=colour, label=run["method"])
        ax.set(title=dataset, xlabel="round", ylabel="mean image AUROC")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel may hold no convergence row
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)


def render_markdown(
    results: dict[str, Any], convergence: list[str], privacy_study: dict[str, Any] | None = None
) -> str:
    """``results.md``: every table of the results, with the convergence lines; the privacy section from the
    results' own attacks, else from ``privacy_study`` (the privacy study's ``results.json``) when given."""
    m = results["machine"]
    v = m["versions"]
    lines = [
        f"# {results.get('title', 'FedDyMem benchmarks')}",
        "",
        *[line for note in results.get("notes", []) for line in (note, "")],
        "Written by `feddymem bench suite` (`make bench` for `configs/bench.yaml`); "
        "`results.json` holds every number below and more.",
        "",
        f"- Machine: {machine_summary(m)}; {m['os']}",
        *[f"- Rows kept by `--resume` from an earlier machine: {earlier}" for earlier in m.get("earlier_machines", [])],
        f"- Versions: feddymem {v['feddymem']} (commit {m['commit']}), torch {v['torch']}, faiss {v['faiss']}, "
        f"timm {v['timm']}, lightning {v['lightning']}, python {v['python']}",
        f"- Seed {results['seed']}; every run: `{' '.join(results['overrides'])}`; total time "
        f"{results.get('total_s', 0) / 60:.1f} min",
        "- Same backbone (ImageNet EfficientNet-Lite0, offline weights), same partition, same test sets and the "
        "same cached features for every method. Image AUROC is per client over its own test set (all its "
        "products' images ranked together), then averaged over clients; per-product image AUROC ranks one "
        "product's images only (mean over the clients holding it); pixel AUROC and AUPRO are over the products "
        "with masks. Bytes per round are averaged over all rounds, round 0 included. Peak RSS is the process's "
        "peak during the run (Linux VmHWM, reset per run), including the data set's shared feature cache "
        "(size below).",
        "",
    ]
    datasets = list(results["datasets"])
    for dataset in datasets:
        runs = [r for r in results["runs"] if r["dataset"] == dataset]
        if not runs:
            continue
        lines += [
            f"## {dataset}",
            "",
            "| method | overrides | mean image AUROC | per-client image AUROC | per-product image AUROC | "
            "pixel AUROC | AUPRO | memory items scored (uploaded / client) | up / client / round | "
            "down / client / round | kept rounds | s / round (round 0) | peak RSS |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            per_client = " ".join(_f(c.get("image_auroc"), 3) for c in r["clients"].values())
            per_product = ", ".join(f"{p} {_f(a, 3)}" for p, a in r["product_image_auroc"].items())
            items = f"{r.get('scoring_memory_items') or '–'} ({_f(r.get('upload_items_per_client'), 0)})"
            kept = " ".join(str(k) for k in r.get("kept_rounds", {}).values()) or "–"
            lines.append(
                f"| {r['method']} | `{' '.join(r['overrides']) or '(defaults)'}` | **{_f(r['mean_image_auroc'])}** | "
                f"{per_client} | {per_product} | {_f(r['pixel_auroc'])} | {_f(r['aupro'])} | {items} | "
                f"{human_bytes(r['bytes_up_per_client_round'])} | {human_bytes(r['bytes_down_per_client_round'])} | "
                f"{kept} | {r['time_per_round_s']:.1f} ({r['round0_s']:.1f}) | {r['peak_rss_mb'] / 1024:.2f} GB |"
            )
        lines.append("")
    if results.get("privacy"):
        lines += _privacy_section(results, datasets)
    elif privacy_study and privacy_study.get("privacy"):
        lines += _privacy_section(privacy_study, list(privacy_study["datasets"]), linked=True)
    lines += _upload_section(results, datasets) + _perf_section(results) + _convergence_section(results, convergence)
    return "\n".join(lines) + "\n"


def _privacy_section(results: dict[str, Any], datasets: list[str], linked: bool = False) -> list[str]:
    """What each row's upload leaks (``feddymem privacy-report``), next to its accuracy and bytes."""
    reports = results.get("privacy") or {}
    if not any(d in reports for d in datasets):
        return []
    m = results["machine"]
    lines = [
        "## Privacy: what each upload leaks",
        "",
        *(
            [
                "From the privacy study ([`privacy/results.md`](privacy/results.md), plan "
                f"`configs/bench_privacy.yaml`, commit {m['commit']}, {results.get('total_s', 0) / 60:.0f} min on "
                f"{m['cores']} cores): every row is round 0 with the defaults but its overrides.",
                "",
            ]
            if linked
            else []
        ),
        "Attacks of `feddymem privacy-report` on one client's upload per row (the row's memory-reduce and noise "
        "settings, round-0 generator). Inversion: a decoder trained on the server's own public images (the normal "
        "test images) turns each uploaded item into pixels; PSNR/SSIM of each reconstruction against its closest "
        "window in the client's images, and in brackets against as many unrelated images of the same kind (the "
        "floor). `identified`: share of reconstructions closer to the client's window than to the unrelated one "
        "(0.5 = nothing); leaks = above chance (binomial p < 0.01) with PSNR above the floor. Membership AUC: "
        "members vs non-members by distance to the upload (0.5 = nothing; larger of mean- and min-distance). "
        "ε at the report's δ, per round (a round of FedDyMem makes the listed upload once). Per-image embeddings: "
        "the worst case, a whole image's embeddings decoded and tiled. Per-product image AUROC and bytes from the "
        "same row's run above.",
        "",
    ]
    for dataset in datasets:
        report = reports.get(dataset)
        if not report:
            continue
        runs = {r["method"]: r for r in results["runs"] if r["dataset"] == dataset}
        a = report["attack_images"]
        lines += [
            f"### {dataset}",
            "",
            f"Client {report['client']} ({report['members']} training images); {a['members']} members and "
            f"{a['non_members']} non-members attacked; decoder trained on {a['public']} public images; "
            f"δ = {report['delta']:g}.",
            "",
            "| upload | overrides | per-product image AUROC | up / client / round | items (patches / item) | "
            "PSNR (floor) | SSIM (floor) | identified | inversion leaks? | membership AUC | ε per round |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in report["rows"]:
            run = runs.get(row["upload"], {})
            per_product = ", ".join(f"{p} {_f(v, 3)}" for p, v in run.get("product_image_auroc", {}).items()) or "–"
            overrides = f"`{' '.join(run['overrides']) or '(defaults)'}`" if run else "–"
            items = f"{row['items']} ({_f(row['patches_per_item'], 1)})" if row["items"] is not None else "–"
            up = human_bytes(row["bytes"]) if row["bytes"] else "–"
            lines.append(
                f"| {row['upload']} | {overrides} | {per_product} | {up} | {items} | {_f(row['psnr'], 2)} "
                f"({_f(row['psnr_floor'], 2)}) | {_f(row['ssim'], 3)} ({_f(row['ssim_floor'], 3)}) | "
                f"{_f(row['identified'], 2)} | {'yes' if row['beats_floor'] else 'no'} | "
                f"{_f(row['membership_auc'], 3)} | {_f(row['epsilon'], 2)} |"
            )
        lines.append("")
    return lines


def _upload_section(results: dict[str, Any], datasets: list[str]) -> list[str]:
    lines = [
        "## Upload per client and round",
        "",
        "Goal: FedDyMem's upload at most 1/100 of the un-reduced bank (every patch of the client's training "
        "images, float32).",
        "",
        "| data set | FedDyMem | un-reduced bank | bank / FedDyMem | coreset upload (no reduce) | FedAvg generator |",
        "|---|---|---|---|---|---|",
    ]
    for dataset in datasets:
        by = {r["method"]: r for r in results["runs"] if r["dataset"] == dataset}
        fed = by.get("feddymem")
        if not fed:
            continue
        bank = fed["unreduced_bytes_per_client"]
        up = fed["bytes_up_per_client_round"]
        core = by.get("no_reduce", {}).get("bytes_up_per_client_round")
        avg = by.get("fedavg", {}).get("bytes_up_per_client_round")
        lines.append(
            f"| {dataset} | {human_bytes(up)} | {human_bytes(bank) if bank else '–'} | {_ratio(bank, up)} | "
            f"{human_bytes(core) if core else '–'} | {human_bytes(avg) if avg else '–'} |"
        )
    return [*lines, ""]


def _perf_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Performance side by side", ""]
    p = results.get("perf")
    if p:
        lines += [
            f"Server K-means on the real round-0 uploads of `{p['dataset']}` (N×: N noisy copies of them, as if "
            "N times the clients), same points, same number of iterations, no early stop. "
            "Goal: FAISS ≥ 20× faster than scikit-learn.",
            "",
            "| uploads | points × dim → k | FAISS CPU | FAISS GPU | scikit-learn | speed-up (CPU) |",
            "|---|---|---|---|---|---|",
        ]
        for k in p["kmeans"]:
            gpu = f"{k['faiss_gpu_s']:.3f} s" if k.get("faiss_gpu_s") else "no GPU"
            lines.append(
                f"| {k['scale']}× | {k['points']} × {k['dim']} → {k['k']} | {k['faiss_cpu_s']:.3f} s | {gpu} | "
                f"{k['sklearn_s']:.3f} s | **{k['speedup_cpu']:.1f}×** |"
            )
        lines += [
            "",
            "Scoring: the k = 3 nearest memory items of every patch of "
            f"{p['scoring'][0]['images'] if p['scoring'] else 0} test images (same queries; same result checked).",
            "",
            "| queries × dim | memory items | FAISS | torch.cdist + topk | speed-up | same result |",
            "|---|---|---|---|---|---|",
        ]
        for s in p["scoring"]:
            lines.append(
                f"| {s['queries']} × {s['dim']} | {s['memory_items']} | {s['faiss_s'] * 1e3:.1f} ms | "
                f"{s['cdist_s'] * 1e3:.1f} ms | {s['speedup']:.1f}× | {s['same_result']} |"
            )
        t = p["throughput"]
        lines += [
            "",
            f"Throughput ({t['images']} training images, one client, batch of the eval loader):",
            "",
            "| | from image files (decode + backbone) | from cached features |",
            "|---|---|---|",
            f"| memory building (embed + memory-reduce) | {t['build_from_images_per_s']:.1f} img/s | "
            f"{t['build_from_cache_per_s']:.1f} img/s |",
            f"| scoring (anomaly map + image score) | {t['score_from_images_per_s']:.1f} img/s | "
            f"{t['score_from_cache_per_s']:.1f} img/s |",
            "",
        ]
    if results.get("cache"):
        lines += [
            "Feature cache: the first pass decodes every image and runs the frozen backbone; every later epoch and "
            "round reads the cache. Goal: later passes ≥ 10× faster. The last columns put it in a whole round of "
            "`feddymem`: a cold round 0 (extraction + round 0) against a later round, which also trains, rebuilds "
            "the memory and evaluates.",
            "",
            "| data set | images | first pass | cached pass | per-image speed-up | cache size | cold round 0 | "
            "later round | ratio |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for dataset, c in results["cache"].items():
            fed = next((r for r in results["runs"] if r["dataset"] == dataset and r["method"] == "feddymem"), None)
            cold = c["first_pass_s"] + fed["round0_s"] if fed else None
            later = fed["time_per_round_s"] if fed else None
            lines.append(
                f"| {dataset} | {c['images']} | {c['first_pass_s']:.1f} s ({c['first_pass_images_per_s']:.0f} img/s) | "
                f"{c['cached_pass_s']:.2f} s ({c['cached_images_per_s']:.0f} img/s) | **{c['speedup']:.0f}×** | "
                f"{human_bytes(c['cache_bytes'])}{' fp16' if c['fp16'] else ''} | "
                f"{_f(cold, 1)} s | {_f(later, 1)} s | {_ratio(cold, later)} |"
            )
        lines.append("")
    return lines


def _convergence_section(results: dict[str, Any], methods: list[str]) -> list[str]:
    if not methods:
        return []
    lines = [
        "## Convergence",
        "",
        "![Mean image AUROC per round](convergence.png)",
        "",
        "| data set | method | mean image AUROC per round (round 0 first) |",
        "|---|---|---|",
    ]
    for r in results["runs"]:
        if r["method"] in methods:
            lines.append(f"| {r['dataset']} | {r['method']} | {' → '.join(_f(a, 3) for a in r['auroc_per_round'])} |")
    return [*lines, ""]
