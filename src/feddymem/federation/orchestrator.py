"""The Lightning Fabric orchestrator: rounds of local training, memory-reduce, server K-means, broadcast.

Round 0 builds the first global memory from untrained generators. Each later round every client
trains its generator for ``local_epochs`` against the current global memory, rebuilds and reduces its
memory and uploads it; the server clusters the uploads into the new global memory and broadcasts it;
every client is evaluated. Only memory crosses the client boundary: generators and optimisers stay
with their client and are never averaged or gradient-synced. A checkpoint is written after each round.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.loggers import CSVLogger
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from feddymem import __version__
from feddymem.config import to_container, to_yaml
from feddymem.data.check import plan_data, verify_plan
from feddymem.data.datasets import ImageDataset
from feddymem.data.feature_cache import FeatureCache
from feddymem.data.partition import ClientData
from feddymem.io import atomic_write_json, atomic_write_text, save_checkpoint
from feddymem.lightning_model import FedDyMemModule
from feddymem.logging.console import Reporter, human_bytes
from feddymem.memory.aggregate import GlobalMemory, aggregate
from feddymem.memory.kmeans import resolve_gpu
from feddymem.memory.reduce import MemoryBank


def client_module_from_config(cfg: DictConfig, client_id: int | None = None) -> FedDyMemModule:
    """A :class:`FedDyMemModule` with the model, memory and optimiser settings of ``cfg``."""
    m, mem = cfg.model, cfg.memory
    return FedDyMemModule(
        backbone=m.backbone.name,
        layers=list(m.backbone.layers),
        weights=m.backbone.weights,
        pool_size=m.backbone.pool_size,
        generator_reduction=m.generator.reduction,
        coord_channels=m.generator.coord_channels,
        k_nearest=m.loss.k_nearest,
        j_negatives=m.loss.j_negatives,
        margin=m.loss.margin,
        radius_init=m.loss.radius_init,
        score_k=m.scoring.k,
        score_method=str(getattr(m.scoring.method, "value", m.scoring.method)),
        sigma=m.scoring.sigma,
        memory_reduce=str(getattr(mem.reduce, "value", mem.reduce)),
        memory_size=mem.size,
        local_kmeans_ratio=mem.local_kmeans_ratio,
        kmeans_iters=mem.kmeans_iters,
        max_points_per_centroid=mem.max_points_per_centroid,
        min_cluster_size=mem.min_cluster_size,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        seed=cfg.seed + (client_id or 0),
        log_prefix="" if client_id is None else f"client/{client_id}/",
    )


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.element_size() * t.nelement() for t in tensors)


@dataclass
class Client:
    """Everything one client holds; nothing here is shared with other clients."""

    data: ClientData
    module: FedDyMemModule
    optimizer: torch.optim.Optimizer
    train_set: Dataset
    memory_set: Dataset
    test_set: Dataset
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def id(self) -> int:
        return self.data.client_id


class FederatedOrchestrator:
    """Runs a whole federated experiment described by a validated config."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, reporter: Reporter | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.reporter = reporter or Reporter(quiet=cfg.quiet)
        loggers = [CSVLogger(str(self.run_dir), name="logs", version="")] if cfg.logger.value == "csv" else []
        self.fabric = L.Fabric(accelerator=cfg.federation.accelerator, devices=cfg.federation.devices, loggers=loggers)
        self.clients: list[Client] = []
        self.global_memory: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []
        self.server_gpu = resolve_gpu(cfg.server.gpu)

    # --- setup ----------------------------------------------------------------------------------
    def prepare_data(self) -> list[ClientData]:
        """Load every product, split it over clients and decode every image once (fail before training)."""
        plan = plan_data(self.cfg)
        verify_plan(plan, self.reporter)
        return plan.clients

    def setup(self) -> None:
        self.fabric.launch()
        self.fabric.seed_everything(self.cfg.seed)
        partition = self.prepare_data()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", to_yaml(self.cfg))
        d = self.cfg.data
        for part in partition:
            torch.manual_seed(self.cfg.seed + part.client_id)
            module = client_module_from_config(self.cfg, part.client_id)
            optimizer = module.configure_optimizers()
            module, optimizer = self.fabric.setup(module, optimizer)
            self.clients.append(Client(part, module, optimizer, None, None, None))  # type: ignore[arg-type]
        extractor = self.clients[0].module.model.feature_extractor
        mean, std = extractor.mean, extractor.std
        self.cache = FeatureCache(
            self.clients[0].module.model.extract,
            max_bytes=int(self.cfg.cache.max_gb * 2**30),
            fp16_above_bytes=int(self.cfg.cache.fp16_above_gb * 2**30),
            batch_size=self.cfg.optim.eval_batch_size,
            device=self.fabric.device,
            num_workers=self.cfg.optim.num_workers,
            progress=self.reporter.task,
        )
        for client in self.clients:

            def dataset(samples, augment=False):
                return ImageDataset(samples, d.image_size, d.crop_size, mean, std, augment=augment)

            client.train_set = dataset(client.data.train, augment=d.augment)
            client.memory_set = dataset(client.data.train)
            client.test_set = dataset(client.data.test)

    def _cached(self, dataset: ImageDataset, description: str) -> Dataset:
        return self.cache.wrap(dataset, description) if self.cfg.cache.enabled else dataset

    def _loader(self, dataset: Dataset, *, shuffle: bool, seed: int = 0, train: bool = False) -> DataLoader:
        o = self.cfg.optim
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        # Cached features need no worker processes: workers would only copy tensors around.
        workers = o.num_workers if isinstance(dataset, ImageDataset) else 0
        return DataLoader(
            dataset,
            batch_size=o.batch_size if train else o.eval_batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=workers,
            drop_last=False,
        )

    # --- one round ------------------------------------------------------------------------------
    def local_training(self, client: Client, round_idx: int) -> float:
        """``local_epochs`` epochs of the metric loss against the current global memory; mean loss."""
        module, optimizer = client.module, client.optimizer
        train_set = self._cached(client.train_set, f"client {client.id} features")
        module.train()
        losses = []
        for epoch in range(self.cfg.federation.local_epochs):
            seed = self.cfg.seed + 1_000_003 * round_idx + 1009 * epoch + client.id
            loader = self._loader(train_set, shuffle=True, seed=seed, train=True)
            advance = self.reporter.task(f"client {client.id} epoch {epoch + 1}", len(loader))
            for batch_idx, batch in enumerate(loader):
                optimizer.zero_grad(set_to_none=True)
                loss = module.training_step(batch, batch_idx)
                self.fabric.backward(loss)
                optimizer.step()
                advance(1)
            losses.append(float(module.train_loss.compute()) if module.train_loss.update_count else float("nan"))
            module.on_train_epoch_end()
        module.eval()
        return sum(losses) / len(losses) if losses else float("nan")

    def client_upload(self, client: Client) -> MemoryBank:
        """Rebuild and reduce the client's memory with its current generator."""
        memory_set = self._cached(client.memory_set, f"client {client.id} features")
        return client.module.build_memory(self._loader(memory_set, shuffle=False))

    def server_aggregate(self, uploads: list[MemoryBank], round_idx: int) -> GlobalMemory:
        s = self.cfg.server
        warm = self.global_memory if (s.warm_start and self.global_memory is not None) else None
        size = s.size or self._patch_positions()
        return aggregate(
            uploads,
            size,
            previous=warm,
            weight_by_client_size=s.weight_by_client_size,
            iters=s.kmeans_iters,
            seed=self.cfg.seed + round_idx,
            gpu=self.server_gpu,
        )

    def _patch_positions(self) -> int:
        h = self.cfg.data.crop_size
        reduction = min(self.clients[0].module.model.feature_extractor.body.feature_info.reduction())
        return (h // reduction) ** 2

    def evaluate(self, client: Client) -> dict[str, float]:
        test_set = self._cached(client.test_set, f"client {client.id} test features")
        module = client.module
        with torch.no_grad():
            for batch_idx, batch in enumerate(self._loader(test_set, shuffle=False)):
                module.test_step(batch, batch_idx)
        return module.compute_test_metrics()

    def run_round(self, round_idx: int) -> dict[str, Any]:
        start = time.perf_counter()
        record: dict[str, Any] = {"round": round_idx, "clients": {}}
        uploads = []
        for client in self.clients:
            t0 = time.perf_counter()
            loss = self.local_training(client, round_idx) if round_idx > 0 else float("nan")
            bank = self.client_upload(client)
            uploads.append(bank)
            record["clients"][client.id] = {
                "train_loss": loss,
                "bytes_up": tensor_bytes(bank.items, bank.weights),
                "memory_items": int(bank.items.shape[0]),
                "train_images": len(client.data.train),
                "time_s": time.perf_counter() - t0,
            }
        t_server = time.perf_counter()
        result = self.server_aggregate(uploads, round_idx)
        self.global_memory = result.items
        record["server"] = {
            "kmeans_objective": result.objective,
            "uploaded_items": result.num_points,
            "global_items": int(result.items.shape[0]),
            "gpu": result.gpu,
            "time_s": time.perf_counter() - t_server,
        }
        for client in self.clients:
            client.module.set_global_memory(self.global_memory)
            stats = record["clients"][client.id]
            stats["bytes_down"] = tensor_bytes(self.global_memory)
            t0 = time.perf_counter()
            stats.update(self.evaluate(client))
            stats["eval_time_s"] = time.perf_counter() - t0
        record["bytes_up"] = sum(c["bytes_up"] for c in record["clients"].values())
        record["bytes_down"] = sum(c["bytes_down"] for c in record["clients"].values())
        record["mean_image_auroc"] = sum(c["image_auroc"] for c in record["clients"].values()) / len(self.clients)
        record["time_s"] = time.perf_counter() - start
        record["cache"] = {
            "extraction_s": self.cache.stats.extraction_seconds,
            "saved_s": self.cache.stats.saved_seconds,
            "bytes": self.cache.nbytes,
        }
        return record

    # --- bookkeeping ----------------------------------------------------------------------------
    def log_round(self, record: dict[str, Any]) -> None:
        r = record["round"]
        metrics: dict[str, float] = {
            "server/kmeans_objective": record["server"]["kmeans_objective"],
            "server/global_items": record["server"]["global_items"],
            "round/bytes_up": record["bytes_up"],
            "round/bytes_down": record["bytes_down"],
            "round/time_s": record["time_s"],
            "round/mean_image_auroc": record["mean_image_auroc"],
            "cache/extraction_s": record["cache"]["extraction_s"],
            "cache/saved_s": record["cache"]["saved_s"],
        }
        for cid, stats in record["clients"].items():
            for key, value in stats.items():
                if isinstance(value, int | float) and value == value:  # skip NaN
                    metrics[f"client/{cid}/{key}"] = value
        self.fabric.log_dict(metrics, step=r)
        self.reporter.print(
            f"round {r:>2}: mean image AUROC {record['mean_image_auroc']:.4f}  "
            f"up {human_bytes(record['bytes_up'])}  down {human_bytes(record['bytes_down'])}  "
            f"time {record['time_s']:.1f}s  (cache saved {record['cache']['saved_s']:.1f}s so far)"
        )

    def checkpoint_payload(self, round_idx: int) -> dict[str, Any]:
        return {
            "round": round_idx,
            "global_memory": self.global_memory.clone(),
            "clients": {
                c.id: {
                    "model": c.module.trainable_state(),
                    "optimizer": c.optimizer.state_dict(),
                    "train": [s.path for s in c.data.train],
                    "products": list(c.data.products),
                }
                for c in self.clients
            },
            "config": to_container(self.cfg),
            "history": self.history,
            "provenance": provenance(self.cfg),
        }

    def save(self, round_idx: int) -> None:
        payload = self.checkpoint_payload(round_idx)
        ckpt_dir = self.run_dir / "checkpoints"
        save_checkpoint(ckpt_dir / f"round_{round_idx:03d}.ckpt", payload)
        save_checkpoint(ckpt_dir / "last.ckpt", payload)
        atomic_write_json(self.run_dir / "metrics.json", self.summary())

    def summary(self) -> dict[str, Any]:
        final = self.history[-1] if self.history else {}
        return {
            "run_dir": str(self.run_dir),
            "rounds": self.history,
            "final": {"mean_image_auroc": final.get("mean_image_auroc"), "clients": final.get("clients", {})},
            "cache": {
                "extracted_images": self.cache.stats.extracted,
                "extraction_s": self.cache.stats.extraction_seconds,
                "hits": self.cache.stats.hits,
                "saved_s": self.cache.stats.saved_seconds,
                "bytes": self.cache.nbytes,
                "fp16": self.cache.fp16,
            },
        }

    def print_table(self) -> None:
        final = self.history[-1]
        has_pixel = any("pixel_auroc" in s for s in final["clients"].values())
        cols = ["client", "products", "train imgs", "image AUROC"] + (["pixel AUROC", "AUPRO"] if has_pixel else [])
        cols += ["up/round", "down/round", "time"]
        rows = []
        for client in self.clients:
            s = final["clients"][client.id]
            t = sum(r["clients"][client.id]["time_s"] + r["clients"][client.id]["eval_time_s"] for r in self.history)
            row = [str(client.id), ",".join(client.data.products), str(s["train_images"]), f"{s['image_auroc']:.4f}"]
            if has_pixel:
                row += [f"{s.get('pixel_auroc', float('nan')):.4f}", f"{s.get('aupro', float('nan')):.4f}"]
            row += [human_bytes(s["bytes_up"]), human_bytes(s["bytes_down"]), f"{t:.1f}s"]
            rows.append(row)
        self.reporter.table(
            f"FedDyMem on {self.cfg.dataset}: round {final['round']}, mean image AUROC {final['mean_image_auroc']:.4f}",
            cols,
            rows,
        )

    def run(self) -> dict[str, Any]:
        """Set up, run rounds 0..R, checkpoint after each, print the per-client table; returns the summary."""
        self.setup()
        self.reporter.print(
            f"FedDyMem: {len(self.clients)} clients, {self.cfg.federation.rounds} rounds, "
            f"device {self.fabric.device}, run folder {self.run_dir}"
        )
        with self.reporter.bars():
            for round_idx in range(self.cfg.federation.rounds + 1):
                record = self.run_round(round_idx)
                self.history.append(record)
                self.log_round(record)
                self.save(round_idx)
        for logger in self.fabric.loggers:
            logger.finalize("success")
        self.print_table()
        return self.summary()


def provenance(cfg: DictConfig) -> dict[str, str]:
    import faiss
    import timm

    # Plain str(): torch.__version__ is a TorchVersion object, which weights_only loading refuses.
    return {
        "feddymem": str(__version__),
        "torch": str(torch.__version__),
        "timm": str(timm.__version__),
        "faiss": str(getattr(faiss, "__version__", "unknown")),
        "lightning": str(L.__version__),
        "python": platform.python_version(),
        "backbone": str(cfg.model.backbone.name),
        "weights": str(cfg.model.backbone.weights),
    }
