"""On the GPU: FAISS GPU K-means and search against their CPU twins, the model on CUDA, a federated run.

Skipped (with the reason) where CUDA or a GPU build of FAISS is missing, as on CI; ``scripts/gpu_check.sh``
runs them on a machine that has both.
"""

import json

import numpy as np
import pytest
import torch

from conftest import FAST
from feddymem.cli import main
from feddymem.memory.kmeans import kmeans
from feddymem.memory.search import MemoryIndex, faiss_gpu_available
from feddymem.models.torch_model import FedDyMemModel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
needs_faiss_gpu = pytest.mark.skipif(not faiss_gpu_available(), reason="FAISS sees no GPU (faiss-gpu not installed)")


def blobs(n: int, centres: int, dim: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points around well-separated centres: the points, the centres and each point's offset from its centre."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(centres, dim)).astype(np.float32) * 10
    label = rng.integers(0, centres, n)
    offsets = rng.normal(scale=noise, size=(n, dim)).astype(np.float32)
    return centre[label] + offsets, centre, offsets


@needs_faiss_gpu
def test_gpu_kmeans_finds_the_clusters_the_cpu_finds():
    x, centres, offsets = blobs(20_000, 64, 96, noise=0.5)
    weights = np.random.default_rng(1).uniform(0.5, 2.0, len(x)).astype(np.float32)
    truth = float(((offsets**2).sum(1) * weights).sum())  # the weighted objective of the true clustering
    # Warm-started near the truth, the weighted Lloyd steps on the GPU must land on it.
    near = centres + np.random.default_rng(2).normal(scale=1.0, size=centres.shape).astype(np.float32)
    warm = kmeans(x, 64, iters=10, gpu=True, weights=weights, init=near)
    assert warm.gpu and warm.centroids.shape == (64, 96) and warm.assignments.shape == (20_000,)
    assert truth * 0.95 < warm.objective < truth * 1.05
    # From the same random start, GPU and CPU reach the same objective.
    on_gpu = kmeans(x, 64, iters=20, seed=0, gpu=True, weights=weights)
    on_cpu = kmeans(x, 64, iters=20, seed=0, gpu=False, weights=weights)
    assert on_gpu.gpu and not on_cpu.gpu
    assert abs(on_gpu.objective - on_cpu.objective) < 0.05 * on_cpu.objective, (on_gpu.objective, on_cpu.objective)


@needs_faiss_gpu
@pytest.mark.parametrize("approximate_above", [0, 1000])
def test_gpu_index_returns_the_cpu_neighbours(approximate_above):
    rng = np.random.default_rng(0)
    memory = torch.from_numpy(rng.normal(size=(5000, 64)).astype(np.float32))
    queries = torch.from_numpy(rng.normal(size=(2000, 64)).astype(np.float32))
    cpu_index = MemoryIndex(memory, approximate_above=approximate_above)
    cpu_dist, cpu_idx = cpu_index.search(queries, 3)
    gpu_index = MemoryIndex(memory, gpu=True, approximate_above=approximate_above)
    dist, idx = gpu_index.search(queries.cuda(), 3)
    assert gpu_index.on_gpu and gpu_index.approximate == bool(approximate_above)
    assert dist.device.type == "cuda" and idx.device.type == "cuda"  # answered where the queries live
    # The same lists visited (IVF) or every item compared (flat): the CPU's neighbours, to float rounding.
    same = (idx[:, 0].cpu() == cpu_idx[:, 0]).float().mean().item()
    assert same > 0.99, same
    torch.testing.assert_close(dist[:, 0].cpu(), cpu_dist[:, 0], rtol=1e-3, atol=1e-3)


def test_the_model_scores_the_same_on_cuda_as_on_the_cpu():
    torch.manual_seed(0)
    normal, images = torch.rand(2, 4, 3, 224, 224) * 2 - 1
    model = FedDyMemModel().eval()
    with torch.no_grad():
        model.set_memory(model.build_memory(model.embed(model.extract(normal))).items)
        cpu_maps, cpu_scores = model(images)
        assert not model.memory_index().on_gpu
        model.cuda()
        gpu_maps, gpu_scores = model(images.cuda())
    assert gpu_maps.device.type == "cuda"
    # Moved with the module: the index over the memory is rebuilt on the GPU where FAISS has one.
    assert model.memory_index().on_gpu == faiss_gpu_available()
    torch.testing.assert_close(gpu_scores.cpu(), cpu_scores, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gpu_maps.cpu(), cpu_maps, rtol=2e-3, atol=2e-3)


@pytest.mark.e2e
def test_a_federated_run_trains_on_cuda_and_clusters_on_the_faiss_gpu(tmp_path, synthetic_yaml):
    server_gpu = "true" if faiss_gpu_available() else "false"
    code = main(
        [
            "train",
            f"dataset={synthetic_yaml}",
            "federation.rounds=2",
            "federation.accelerator=cuda",
            f"server.gpu={server_gpu}",
            "name=cuda",
            f"output_dir={tmp_path}",
            *FAST,
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "cuda" / "metrics.json").read_text())
    assert all(r["server"]["gpu"] == (server_gpu == "true") for r in metrics["rounds"])
    final = metrics["final"]["clients"]
    assert all(c["image_auroc"] > 0.9 and c["pixel_auroc"] > 0.9 for c in final.values())


def test_a_flower_site_takes_its_gpu_from_its_node_config():
    pytest.importorskip("flwr")
    from feddymem.config import load_config
    from feddymem.flower.site import site_fabric

    cfg = load_config(["federation.accelerator=cpu"])  # the coordinator has no GPU; the site does
    assert site_fabric({"accelerator": "cuda"}, cfg).device.type == "cuda"
    assert site_fabric({"accelerator": "auto"}, cfg).device.type == "cuda"


def test_a_flower_run_with_every_site_on_cuda_matches_the_fabric_run_on_cuda(tmp_path, synthetic_yaml):
    pytest.importorskip("flwr")
    from feddymem.config import load_config
    from feddymem.federation.orchestrator import FederatedOrchestrator
    from feddymem.flower.inprocess import run_in_process

    common = [f"dataset={synthetic_yaml}", "data.num_clients=2", "federation.rounds=1", *FAST]
    cfg = load_config([*common, "federation.accelerator=cpu", "server.gpu=auto"])  # the coordinator: CPU
    fabric = FederatedOrchestrator(load_config([*common, "federation.accelerator=cuda"]), tmp_path / "fabric").run()
    sites = [{"client-id": k, "accelerator": "cuda", "out": str(tmp_path / f"site_{k}")} for k in range(2)]
    flower = run_in_process(cfg, tmp_path / "flower", sites)
    assert fabric is not None and len(flower["rounds"]) == len(fabric["rounds"]) == 2
    for ours, theirs in zip(flower["rounds"], fabric["rounds"], strict=True):
        assert ours["participants"] == theirs["participants"] and ours["bytes_up"] == theirs["bytes_up"]
    # Both on CUDA: the same accuracy (GPU kernels may differ in the last bits, not in the result).
    for cid, line in fabric["final"]["clients"].items():
        assert flower["final"]["clients"][cid]["image_auroc"] == pytest.approx(line["image_auroc"], abs=1e-3)
