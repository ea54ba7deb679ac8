"""``make bench``'s side-by-side timings on a data set's real features: the server's K-means, scoring
against memories of several sizes, and images/s for memory building and scoring (round-0 generators)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from feddymem.benchmarks import perf
from feddymem.benchmarks.plan import BenchPlan
from feddymem.federation.client import Client
from feddymem.federation.orchestrator import FederatedOrchestrator
from feddymem.federation.server import server_limits
from feddymem.memory.reduce import split_parts


def measure_perf(plan: BenchPlan, orch: FederatedOrchestrator) -> dict[str, Any]:
    """K-means, scoring and throughput on the real features of ``orch``'s data set (round-0 generators)."""
    p = plan.perf
    out: dict[str, Any] = {"dataset": orch.cfg.dataset}
    banks = [orch.runner.build_memory(c) for c in orch.clients]
    limits = server_limits(orch.cfg)
    # The patch part of the uploads: K-means and the search run part by part on items of this width.
    uploads = torch.cat([split_parts(b, limits.memory_parts)[0].items for b in banks]).numpy()
    k = limits.patch_positions
    out["kmeans"] = [
        {"scale": s, **perf.compare_kmeans(perf.replicate(uploads, s, plan.seed), k, orch.cfg.server.kmeans_iters)}
        for s in p.kmeans_scales
    ]
    client = orch.clients[0]
    module = client.module
    module.set_global_memory(banks[0].items)
    test = orch.cache.wrap(client.test_set)
    n = min(p.scoring_images, len(client.test_set))
    features = torch.stack([test[i]["features"] for i in range(n)])
    with torch.no_grad():
        embedded = module.model.embed(features)
    queries = embedded.permute(0, 2, 3, 1).reshape(-1, embedded.shape[1]).contiguous()
    generator = torch.Generator().manual_seed(plan.seed)
    scoring = []
    for size in p.scoring_memory_sizes:  # memories drawn from the real uploads (at most all of them)
        memory = torch.from_numpy(uploads)[torch.randperm(len(uploads), generator=generator)[:size]]
        scoring.append({"images": n, **perf.compare_scoring(queries, memory.contiguous())})
    out["scoring"] = scoring
    out["throughput"] = throughput(orch, client, p.throughput_images)
    return out


def throughput(orch: FederatedOrchestrator, client: Client, images: int) -> dict[str, float]:
    """Images/s for memory building and for scoring, from image files and from cached features."""
    module = client.module
    n = min(images, len(client.memory_set))
    raw = Subset(client.memory_set, range(n))
    cached = Subset(orch.cache.wrap(client.memory_set), range(n))
    bs = orch.cfg.optim.eval_batch_size

    def build(ds) -> None:
        module.build_memory(DataLoader(ds, batch_size=bs))

    def score(ds) -> None:
        with torch.no_grad():
            for batch in DataLoader(ds, batch_size=bs):
                module.score_batch(batch)

    return {
        "images": n,
        "build_from_images_per_s": n / perf.timed(lambda: build(raw)),
        "build_from_cache_per_s": n / perf.timed(lambda: build(cached)),
        "score_from_images_per_s": n / perf.timed(lambda: score(raw)),
        "score_from_cache_per_s": n / perf.timed(lambda: score(cached)),
    }


# --- the whole suite ---------------------------------------------------------------------------------
