"""FedDyMem client as a LightningModule: a thin wrapper around :class:`FedDyMemModel`.

It trains the generator with the metric loss against its memory, builds and reduces memory, and
evaluates with torchmetrics (image AUROC; pixel AUROC and AUPRO where masks exist). It runs under a
plain ``lightning.Trainer`` (fit/test/predict) or under the Fabric orchestrator, which calls the same
hooks. Batches hold either ``image`` (normalised images) or ``features`` (cached backbone features).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from feddymem.memory.reduce import MemoryBank
from feddymem.metrics.aupro import AUPRO
from feddymem.metrics.auroc import AUROC
from feddymem.models.torch_model import FedDyMemModel


class FedDyMemModule(L.LightningModule):
    """One FedDyMem client (or a centralised model): feature extractor + memory generator + memory."""

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: tuple[int, ...] | list[int] = (2, 3),
        weights: str = "imagenet-offline",
        pool_size: int = 3,
        generator_reduction: int = 1,
        coord_channels: bool = True,
        generator_init: str = "identity",
        k_nearest: int = 3,
        j_negatives: int = 3,
        margin: float = 0.1,
        radius_init: float = 1e-5,
        score_k: int = 3,
        score_method: str = "softmin",
        sigma: float = 4.0,
        approximate_above: int = 0,
        nprobe: int = 8,
        memory_reduce: str = "cluster_mean",
        memory_size: int = 0,
        local_kmeans_ratio: int = 1,
        coreset_ratio: float = 0.01,
        kmeans_iters: int = 20,
        max_points_per_centroid: int = 64,
        min_cluster_size: int = 3,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        seed: int = 0,
        log_prefix: str = "",
        sync_metrics: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["log_prefix", "sync_metrics"])
        self.log_prefix = log_prefix
        self.model = FedDyMemModel(
            backbone,
            layers,
            weights,
            pool_size,
            generator_reduction,
            coord_channels,
            generator_init,
            k_nearest,
            j_negatives,
            margin,
            radius_init,
            score_k,
            score_method,
            sigma,
            approximate_above,
            nprobe,
        )
        # A federated client must not merge its metrics with other processes' clients (sync_metrics=False);
        # under a multi-GPU Trainer the default syncs them like any torchmetrics metric.
        sync = {"sync_on_compute": sync_metrics}
        self.train_loss = MeanMetric(**sync)
        self.image_auroc = AUROC(**sync)
        self.pixel_auroc = AUROC(**sync)
        self.aupro = AUPRO(**sync)
        self._has_masks = False

    # --- helpers --------------------------------------------------------------------------------
    def features(self, batch: dict[str, Any]) -> torch.Tensor:
        """Backbone features of a batch: the cached ones, or extracted from its images."""
        if "features" in batch:
            return batch["features"].to(self.device)
        return self.model.extract(batch["image"].to(self.device))

    @staticmethod
    def image_size(batch: dict[str, Any]) -> tuple[int, int]:
        return tuple(batch["mask"].shape[-2:]) if "mask" in batch else tuple(batch["image"].shape[-2:])

    def _name(self, metric: str) -> str:
        return f"{self.log_prefix}{metric}"

    # --- memory ---------------------------------------------------------------------------------
    def set_global_memory(self, items: torch.Tensor) -> None:
        """Make ``items`` the target of the loss and the reference for scoring."""
        self.model.set_memory(items.to(self.device))

    @torch.no_grad()
    def embed_batches(self, batches: Iterable[dict[str, Any]]) -> torch.Tensor:
        """Embeddings (N, D, H, W) of every image with the current generator, on the CPU."""
        was_training = self.training
        self.eval()
        out = [self.model.embed(self.features(b)).cpu() for b in batches]
        self.train(was_training)
        return torch.cat(out)

    def build_memory(self, batches: Iterable[dict[str, Any]]) -> MemoryBank:
        """Dynamic memory + memory-reduce over the client's normal training images."""
        hp = self.hparams
        return self.model.build_memory(
            self.embed_batches(batches),
            hp.memory_reduce,
            size=hp.memory_size,
            local_kmeans_ratio=hp.local_kmeans_ratio,
            coreset_ratio=hp.coreset_ratio,
            iters=hp.kmeans_iters,
            seed=hp.seed,
            max_points_per_centroid=hp.max_points_per_centroid,
            min_cluster_size=hp.min_cluster_size,
            gpu=self.device.type == "cuda",
        )

    # --- training -------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [*self.model.generator.parameters(), *self.model.loss.parameters()]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_fit_start(self) -> None:
        # Centralised use under a plain Trainer: without a given memory, build one from the training data.
        if not self.model.has_memory and self._trainer is not None:
            loader = self.trainer.fit_loop._data_source.dataloader()
            self.set_global_memory(self.build_memory(loader).items)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.model.compute_loss(self.model.embed(self.features(batch)))
        self.train_loss.update(loss.detach())
        return loss

    def on_train_epoch_end(self) -> None:
        if self.train_loss.update_count:
            self.log(self._name("train_loss"), self.train_loss.compute())
        self.train_loss.reset()

    # --- evaluation -----------------------------------------------------------------------------
    def score_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(anomaly maps (B, H, W), image scores (B,)) for a batch."""
        return self.model.score_features(self.features(batch), self.image_size(batch))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        maps, scores = self.score_batch(batch)
        labels = torch.as_tensor(batch["label"], device=scores.device).long()
        self.image_auroc.update(scores, labels)
        masks = batch["mask"].to(maps.device)
        # Pixel metrics only where the truth is known: normal images, and anomalous ones with a mask.
        known = (labels == 0) | torch.as_tensor(batch.get("has_mask", masks.flatten(1).any(1)), device=maps.device)
        if masks[known].any():
            self._has_masks = True
        if known.any():
            self.pixel_auroc.update(maps[known], masks[known])
            self.aupro.update(maps[known], masks[known])
        return {"pred_score": scores.detach()}

    def compute_test_metrics(self) -> dict[str, float]:
        """Image AUROC, and pixel AUROC and AUPRO when the test set has masks; resets the metrics."""
        results = {"image_auroc": float(self.image_auroc.compute())}
        if self._has_masks:
            results["pixel_auroc"] = float(self.pixel_auroc.compute())
            results["aupro"] = float(self.aupro.compute())
        for metric in (self.image_auroc, self.pixel_auroc, self.aupro):
            metric.reset()
        self._has_masks = False
        return results

    def on_test_epoch_end(self) -> None:
        for key, value in self.compute_test_metrics().items():
            self.log(self._name(key), value)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        maps, scores = self.score_batch(batch)
        return {"anomaly_map": maps.cpu(), "pred_score": scores.cpu(), "path": batch.get("path")}

    # --- checkpoints ----------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A copy of the generator, radius and memory: everything but the frozen backbone (the config rebuilds it)."""
        return {
            k: v.detach().cpu().clone()
            for k, v in self.model.state_dict().items()
            if not k.startswith("feature_extractor.")
        }

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("feature_extractor.")]
        if missing or unexpected:
            raise KeyError(f"client state does not match the model: missing {missing}, unexpected {unexpected}")
