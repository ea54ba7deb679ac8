from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("WANDB_MODE", "offline")  # never reach the network from tests
torch.set_num_threads(min(2, os.cpu_count() or 1))

from synthetic import dataset_yaml, make_dataset  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
os.environ.setdefault("FEDDYMEM_SHARED_DATA", str(SHARED_DATA))

# Small and fast, but the real pipeline: offline ImageNet weights, FAISS, the real loss.
FAST = [
    "federation.local_epochs=1",
    "memory.kmeans_iters=5",
    "server.kmeans_iters=5",
    "memory.reduce=cluster_mean",  # with the next two: the small H·W memories the tests were written for
    "memory.min_cluster_size=1",
    "memory.size=0",
    "server.size=0",
    "federation.eval_every=1",  # per-round test metrics, which many tests read
    "optim.eval_batch_size=8",
    "logger=none",
    "quiet=true",
]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_dataset(root, products=2)
    return root


@pytest.fixture(scope="session")
def synthetic_yaml(synthetic_root: Path) -> Path:
    return dataset_yaml(synthetic_root, sorted(p for p in synthetic_root.iterdir() if p.is_dir()))


@pytest.fixture(scope="session")
def fedmodel():
    """One real FedDyMem model (offline ImageNet EfficientNet-Lite0), shared read-only by tests."""
    from feddymem.models.torch_model import FedDyMemModel

    return FedDyMemModel()
