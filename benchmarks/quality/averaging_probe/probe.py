"""Probe: can the choice or the scoring of 3-image means win back what averaging a k-center pick costs?

Run from the repository root (benchmarks/quality/exploration.md, last section, has the numbers)::

    python benchmarks/quality/averaging_probe/probe.py magnetic_tile ../shared/data/industrial/magnetic_tile

One MVTec-layout product, its training images split over 5 clients at random, round 0 (the identity
generator), 2 % of each client's patches as greedy k-center centres; the image score is the blurred map's
maximum of the nearest-item distance (an offset per item is subtracted first where a row says so).
"""

import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

from feddymem.data.datasets import ImageDataset
from feddymem.data.products import load_mvtec
from feddymem.memory.coreset import _first_distinct, greedy_coreset
from feddymem.memory.search import MemoryIndex, squared_distances
from feddymem.metrics import auroc_score
from feddymem.models.torch_model import FedDyMemModel

CLIENTS, RATIO, GROUP = 5, 0.02, 3


def embeddings(model: FedDyMemModel, samples: list, size: int = 224) -> torch.Tensor:
    """(N, D, H, W) round-0 embeddings of ``samples``."""
    extractor = model.feature_extractor
    dataset = ImageDataset(samples, size, size, extractor.mean, extractor.std)
    out = []
    with torch.no_grad():
        for start in range(0, len(dataset), 32):
            batch = torch.stack([dataset[i]["image"] for i in range(start, min(start + 32, len(dataset)))])
            out.append(model.embed(model.extract(batch)))
    return torch.cat(out)


def client_memory(grid: torch.Tensor, pool: int, neighbours: int) -> dict[str, torch.Tensor]:
    """A client's k-center picks (raw) and their 3-image means: the pick with the nearest patches of the next
    two images (``pool`` = 2), or with the two of the nearest ``pool`` images that sit on opposite sides of it
    (smallest ‖a + b − 2c‖). Picks with fewer images among their ``neighbours`` nearest patches are dropped."""
    d = grid.shape[1]
    patches = grid.permute(0, 2, 3, 1).reshape(-1, d).contiguous()
    image_of = np.repeat(np.arange(grid.shape[0]), grid.shape[2] * grid.shape[3])
    centres = greedy_coreset(patches, max(1, int(RATIO * patches.shape[0])), seed=0).numpy()
    index = MemoryIndex(patches, approximate_above=4096, train_per_list=32)
    _, nearest = index.search(patches[centres], min(patches.shape[0], neighbours))
    pairs = list(itertools.combinations(range(1, pool + 1), 2))
    means, spread = [], []
    for members in _first_distinct(nearest.numpy(), image_of, pool + 1):
        if members is None:
            continue
        x = patches[members]  # the pick first, then one patch per other image
        a, b = min(pairs, key=lambda ab: float((x[ab[0]] + x[ab[1]] - 2 * x[0]).norm()))
        group = x[[0, a, b]]
        means.append(group.mean(0))
        spread.append((group - group.mean(0)).norm(dim=1))
    spreads = torch.stack(spread)
    return {
        "raw": patches[centres],
        "mean": torch.stack(means),
        "spread_mean": spreads.mean(1),
        "spread_max": spreads.max(1).values,
        "centre": spreads[:, 0],
    }


def image_auroc(
    model: FedDyMemModel,
    test: torch.Tensor,
    labels: np.ndarray,
    memory: torch.Tensor,
    offset: torch.Tensor | None = None,
) -> float:
    """Image AUROC of the nearest-item distance (minus ``offset`` per item, floored at 0)."""
    b, d, h, w = test.shape
    queries = test.permute(0, 2, 3, 1).reshape(-1, d)
    best = []
    for start in range(0, queries.shape[0], 8192):
        distance = squared_distances(queries[start : start + 8192], memory).clamp_min(0).sqrt()
        if offset is not None:
            distance = (distance - offset[None]).clamp_min(0)
        best.append(distance.min(1).values)
    _, scores = model.anomaly_map(torch.cat(best).view(b, h, w), (224, 224))
    return auroc_score(scores.numpy(), labels)


def main() -> None:
    """Print one line per memory."""
    name, root = sys.argv[1], Path(sys.argv[2])
    split = load_mvtec(name, root)
    model = FedDyMemModel().eval()
    cache = Path("runs/averaging_probe") / f"{name}.pt"
    if cache.exists():
        train, test = torch.load(cache)
    else:
        started = time.perf_counter()
        train, test = embeddings(model, split.train), embeddings(model, split.test)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save((train, test), cache)
        print(f"embedded {len(train)} training and {len(test)} test images in {time.perf_counter() - started:.0f} s")
    labels = np.array([s.label for s in split.test])
    owner = np.random.default_rng(0).integers(0, CLIENTS, len(train))

    def memories(pool: int, neighbours: int) -> dict[str, torch.Tensor]:
        parts = [client_memory(train[owner == c], pool, neighbours) for c in range(CLIENTS)]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def report(label: str, memory: torch.Tensor, offset: torch.Tensor | None = None) -> None:
        print(f"{label} ({len(memory)} items): {image_auroc(model, test, labels, memory, offset):.4f}", flush=True)

    first = memories(pool=2, neighbours=64)
    report("raw k-center picks", first["raw"])
    report("3-image means, picks without 3 images in 64 patches dropped", first["mean"])
    for key, scale in (("spread_mean", 1.0), ("spread_max", 1.0), ("spread_mean", 0.5), ("centre", 1.0)):
        report(f"  ... minus {scale} x {key}", first["mean"], scale * first[key])
    for pool in (2, 4):
        wide = memories(pool=pool, neighbours=128)
        gap = float(wide["centre"].mean())  # how far each item is from the pick it stands for
        report(
            f"3-image means among the nearest {pool} images, 128 patches searched (|item - pick| ~{gap:.1f})",
            wide["mean"],
        )


if __name__ == "__main__":
    main()
