"""``feddymem bench sites``: the server's cost of a round as the number of sites grows.

Every site uploads a memory of the real size (``--items`` items of the config's feature width, each
averaging ``--patches`` patches; synthetic values), and the server of the config checks and aggregates
them, twice: round 0 cold, round 1 warm-started from round 0's global memory, as in a run. Per number of
sites: the time of each step, the process's peak memory, what the uploads hold, and what each site
receives. The global memory is ``server.size`` items whatever the number of sites, and K-means iterates
on at most ``server.kmeans_max_points`` items, so both the reply and the K-means time stay bounded; what
still grows is the uploads themselves, held by the server until the round is aggregated.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch

from feddymem.benchmarks.measure import PeakMemory, machine
from feddymem.config import load_config
from feddymem.federation.messages import ClientResult, Upload
from feddymem.federation.server import Server, server_limits
from feddymem.federation.strategies import make_strategy
from feddymem.federation.upload import payload_bytes
from feddymem.io import atomic_write_json, atomic_write_text
from feddymem.memory.kmeans import resolve_gpu
from feddymem.memory.reduce import MemoryBank

SITES = (5, 20, 100, 500)
IMAGES_PER_SITE = 200  # about an ELPV site's training images (5 clients)


def synthetic_results(sites: int, items: int, dim: int, patches: int, seed: int) -> list[ClientResult]:
    """One upload per site: ``items`` × ``dim`` float32 items (random values), each averaging ``patches``."""
    generator = torch.Generator().manual_seed(seed)
    return [
        ClientResult(
            k,
            Upload(
                MemoryBank(
                    torch.randn(items, dim, generator=generator), torch.full((items,), float(patches)), IMAGES_PER_SITE
                ),
                memory_items=items,
                num_images=IMAGES_PER_SITE,
            ),
        )
        for k in range(sites)
    ]


def server_round_cost(cfg: Any, sites: int, items: int, patches: int) -> dict[str, Any]:
    """The server of ``cfg`` with ``sites`` uploads: two rounds' step times, peak memory, bytes."""
    cfg.data.num_clients = sites
    limits = server_limits(cfg)
    strategy = make_strategy(cfg, server_gpu=resolve_gpu(cfg.server.gpu))
    with PeakMemory() as peak:
        server = Server(cfg, strategy, [IMAGES_PER_SITE] * sites, limits)
        results = synthetic_results(sites, items, limits.memory_dim, patches, cfg.seed)
        uploads = sum(payload_bytes(r.upload.payload) for r in results)
        seconds, stats = [], {}
        for round_idx in (0, 1):
            start = time.perf_counter()
            reply = server.step(results, round_idx)
            seconds.append(time.perf_counter() - start)
            if reply.error:
                raise RuntimeError(f"{sites} sites, round {round_idx}: {reply.error}")
            stats = reply.stats
        down = payload_bytes(reply.memory)
    del results, server
    gc.collect()
    return {
        "sites": sites,
        "items_per_site": items,
        "dim": limits.memory_dim,
        "uploaded_items": int(stats["uploaded_items"]),
        "global_items": int(stats["global_items"]),
        "kmeans_points": min(int(stats["uploaded_items"]), int(cfg.server.kmeans_max_points)),
        "round0_s": seconds[0],
        "round1_s": seconds[1],
        "uploads_mb": uploads / 2**20,
        "down_per_site_mb": down / 2**20,
        "peak_rss_mb": peak.rss_mb,
        "peak_cuda_mb": peak.cuda_mb,
        "gpu": bool(stats["gpu"]),
    }


def compare_sites(overrides: list[str], sites: list[int], items: int, patches: int, out: Path) -> dict[str, Any]:
    """One row per number of sites (smallest first; each row's peak memory is its own); writes
    ``out/results.json`` and ``out/results.md``."""
    rows = []
    for n in sorted(sites):
        rows.append(server_round_cost(load_config(list(overrides)), n, items, patches))
        print(f"{n} sites: {rows[-1]['round1_s']:.1f} s, peak {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
    cfg = load_config(list(overrides))
    results = {
        "machine": machine(),
        "overrides": overrides,
        "server": {"size": cfg.server.size, "kmeans_max_points": cfg.server.kmeans_max_points},
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", sites_table(results))
    return results


def sites_table(results: dict[str, Any]) -> str:
    """``results.md``: one row per number of sites."""
    m, s = results["machine"], results["server"]
    lines = [
        "# The server's round as sites are added",
        "",
        f"`feddymem bench sites {' '.join(results['overrides'])}`",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, GPU: {m['gpu'] or 'none'}; "
        f"commit {m['commit']}",
        f"- `server.size` {s['size']} global items; K-means iterates on at most `server.kmeans_max_points` "
        f"{s['kmeans_max_points']} items. Synthetic uploads of the real size; the server's checks, K-means "
        "and reply as in a run.",
        "",
        "| sites | items uploaded | K-means on | global items | round 0 s | round 1 s (warm) | uploads held "
        "| down / site | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['sites']} | {r['uploaded_items']:,} | {r['kmeans_points']:,} | {r['global_items']:,} "
            f"| {r['round0_s']:.1f} | {r['round1_s']:.1f} | {r['uploads_mb']:.0f} MB | {r['down_per_site_mb']:.1f} MB "
            f"| {r['peak_rss_mb']:.0f} MB |"
        )
    return "\n".join(lines) + "\n"
