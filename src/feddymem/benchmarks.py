"""Side-by-side timings used by ``scripts/gpu_check.sh`` (and the benchmark suite).

``python -m feddymem.benchmarks kmeans`` times the server K-means on the same synthetic uploads with
FAISS on the GPU (when there is one), FAISS on the CPU and scikit-learn.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from feddymem.memory.kmeans import kmeans
from feddymem.memory.search import faiss_gpu_available


def _uploads(clients: int, items: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim)).astype(np.float32)
    points = centres[rng.integers(0, 64, clients * items)] + 0.3 * rng.normal(size=(clients * items, dim))
    return points.astype(np.float32)


def compare_kmeans(
    clients: int = 5, items: int = 784, dim: int = 152, k: int = 784, iters: int = 20, sklearn: bool = True
) -> dict[str, float | int | None]:
    """Seconds for one server K-means of ``clients × items`` points of dimension ``dim`` into ``k`` centroids."""
    x = _uploads(clients, items, dim)
    out: dict[str, float | int | None] = {"points": int(x.shape[0]), "dim": dim, "k": k, "iters": iters}

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    out["faiss_cpu_s"] = timed(lambda: kmeans(x, k, iters=iters, gpu=False, max_points_per_centroid=10**6))
    if faiss_gpu_available():
        kmeans(x[: 10 * k], k, iters=2, gpu=True)  # warm-up: CUDA context and kernels
        out["faiss_gpu_s"] = timed(lambda: kmeans(x, k, iters=iters, gpu=True, max_points_per_centroid=10**6))
    else:
        out["faiss_gpu_s"] = None
    if sklearn:
        from sklearn.cluster import KMeans

        out["sklearn_s"] = timed(lambda: KMeans(k, n_init=1, max_iter=iters, tol=0.0, random_state=0).fit(x))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m feddymem.benchmarks")
    parser.add_argument("what", choices=["kmeans"])
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--items", type=int, default=784)
    parser.add_argument("--dim", type=int, default=152)
    parser.add_argument("--scale", type=int, nargs="+", default=[1, 10], help="multiply the uploads by these")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    for scale in args.scale:
        result = compare_kmeans(args.clients * scale, args.items, args.dim, k=args.items)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
