"""FedDyMem client as a LightningModule: a thin wrapper around :class:`FedDyMemModel`.

It trains the generator with the metric loss against its memory, builds and reduces memory, and
evaluates with torchmetrics (image AUROC; pixel AUROC and AUPRO where masks exist). It runs under a
plain ``lightning.Trainer`` (fit/test/predict) or under the Fabric orchestrator, which calls the same
hooks. Batches hold either ``image`` (normalised images) or ``features`` (cached backbone features).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torchmetrics import MeanMetric
from torchmetrics.functional.classification import binary_auroc

from feddymem.config.settings import memory_reduce_settings, model_settings, optim_settings
from feddymem.io import atomic_write_bytes
from feddymem.memory.reduce import MemoryBank, MemoryReduceSettings
from feddymem.metrics.anomaly_metrics import AnomalyMetrics
from feddymem.metrics.normalize import ScoreNormalizer
from feddymem.models.backbone import FeatureExtractor
from feddymem.models.settings import ModelSettings, OptimSettings, settings_from
from feddymem.models.torch_model import FedDyMemModel
from feddymem.trained import load_trained


class FedDyMemModule(L.LightningModule):
    """One FedDyMem client (or a centralised model): feature extractor + memory generator + memory.

    Build it from typed settings (each ``None``: the defaults, ``feddymem train``'s; a mapping, as in hparams,
    works too) or from a run's config with :meth:`from_config`. The settings are stored nested in hparams
    (``model``, ``memory``, ``optim``, ``seed``), so a checkpoint rebuilds exactly this module."""

    threshold: torch.Tensor
    normalizer: ScoreNormalizer | None

    def __init__(
        self,
        model: ModelSettings | Mapping[str, Any] | None = None,
        memory: MemoryReduceSettings | Mapping[str, Any] | None = None,
        optim: OptimSettings | Mapping[str, Any] | None = None,
        seed: int = 0,
        threshold_percentile: float = 99.0,
        rebuild_memory_every_epoch: bool = True,
        *,
        log_prefix: str = "",
        sync_metrics: bool = True,
        feature_extractor: FeatureExtractor | None = None,
    ) -> None:
        super().__init__()
        self.model_settings = settings_from(ModelSettings, model)
        self.memory_settings = settings_from(MemoryReduceSettings, memory)
        self.optim_settings = settings_from(OptimSettings, optim)
        self.seed = int(seed)
        self.threshold_percentile = float(threshold_percentile)
        self.rebuild_memory_every_epoch = bool(rebuild_memory_every_epoch)
        self.save_hyperparameters(
            {
                "model": self.model_settings.to_dict(),
                "memory": self.memory_settings.to_dict(),
                "optim": self.optim_settings.to_dict(),
                "seed": self.seed,
                "threshold_percentile": self.threshold_percentile,
                "rebuild_memory_every_epoch": self.rebuild_memory_every_epoch,
            }
        )
        # The decision threshold on (normalised) image scores, set by validation or by a federated run:
        # module state, so that a checkpoint predicts labels as the module that wrote it.
        self.register_buffer("threshold", torch.tensor(float("inf"), dtype=torch.float64))
        self.normalizer: ScoreNormalizer | None = None  # per product, from the validation normals
        self._validation: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []
        self.log_prefix = log_prefix
        self.model = FedDyMemModel(self.model_settings, feature_extractor=feature_extractor)
        # A federated client must not merge its metrics with other processes' clients (sync_metrics=False);
        # under a multi-GPU Trainer the default syncs them like any torchmetrics metric.
        sync = {"sync_on_compute": sync_metrics}
        self.train_loss = MeanMetric(**sync)
        self.test_metrics = AnomalyMetrics(**sync)

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        client_id: int | None = None,
        feature_extractor: FeatureExtractor | None = None,
        *,
        model: ModelSettings | None = None,
        memory: MemoryReduceSettings | None = None,
    ) -> FedDyMemModule:
        """The module a run with config ``cfg`` (a :class:`~feddymem.config.TrainConfig` or its OmegaConf
        form) trains for client ``client_id`` (``None``: one centralised model); ``feature_extractor``
        shares a frozen backbone already built for the same config; ``model`` / ``memory`` replace the
        config's settings (a strategy's, such as PatchCore's scoring)."""
        return cls(
            model or model_settings(cfg),
            memory or memory_reduce_settings(cfg),
            optim_settings(cfg),
            cfg.seed + (client_id or 0),
            log_prefix="" if client_id is None else f"client/{client_id}/",
            sync_metrics=client_id is None,
            feature_extractor=feature_extractor,
        )

    # --- helpers --------------------------------------------------------------------------------
    def features(self, batch: dict[str, Any]) -> torch.Tensor:
        """Backbone features of a batch: the cached ones, or extracted from its images."""
        if "features" in batch:
            return batch["features"].to(self.device)
        return self.model.extract(batch["image"].to(self.device))

    @staticmethod
    def image_size(batch: dict[str, Any]) -> tuple[int, int]:
        """(H, W) of the batch's images (of its masks when it holds cached features)."""
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

    def build_memory(self, batches: Iterable[dict[str, Any]], products: Sequence[str] | None = None) -> MemoryBank:
        """Dynamic memory + memory-reduce over the client's normal training images; ``products``: each
        image's product, in the order of ``batches`` (a coreset reduce then runs per product when the memory
        settings' ``per_product``)."""
        settings = self.memory_settings
        return self.model.build_memory(
            self.embed_batches(batches),
            settings,
            seed=self.seed,
            gpu=self.device.type == "cuda",
            image_groups=products if settings.per_product else None,
        )

    # --- training -------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the generator and the loss's radius; the backbone is frozen."""
        params = [*self.model.generator.parameters(), *self.model.loss.parameters()]
        return torch.optim.AdamW(params, lr=self.optim_settings.lr, weight_decay=self.optim_settings.weight_decay)

    def on_train_epoch_start(self) -> None:
        """Under a plain Trainer, the dynamic memory: built from the training data with the current
        generator at the start of every epoch (``rebuild_memory_every_epoch``), or once when the module
        has none. The federation rebuilds it every round instead."""
        if self.model.has_memory and not self.rebuild_memory_every_epoch:
            return
        loader = self.trainer.train_dataloader
        if loader is None:
            raise RuntimeError("FedDyMemModule needs a training dataloader to build its memory")
        self.set_global_memory(self.build_memory(loader).items)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The metric loss of a batch against the memory."""
        loss = self.model.compute_loss(self.model.embed(self.features(batch)))
        self.train_loss.update(loss.detach())
        return loss

    def on_train_epoch_end(self) -> None:
        """Log the epoch's mean loss (plain Trainer use)."""
        if self.train_loss.update_count:
            self.log(self._name("train_loss"), self.train_loss.compute())
        self.train_loss.reset()

    # --- evaluation -----------------------------------------------------------------------------
    def score_batch(self, batch: dict[str, Any], maps: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(anomaly maps (B, H, W), image scores (B,)) for a batch; ``maps=False`` when only the scores are
        used (the context map is then skipped where it does not enter them)."""
        return self.model.score_features(self.features(batch), self.image_size(batch), maps=maps)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """Score a batch and update image AUROC, and pixel AUROC and AUPRO where masks exist (a batch
        without masks counts for image AUROC only)."""
        maps, scores = self.score_batch(batch)
        if "mask" in batch:
            masks, has_mask = batch["mask"], batch.get("has_mask")
        else:
            masks, has_mask = torch.zeros_like(maps), torch.zeros(len(scores), dtype=torch.bool)
        self.test_metrics.update(scores, maps, batch["label"], masks, has_mask)
        return {"pred_score": scores.detach()}

    def compute_test_metrics(self) -> dict[str, float]:
        """Image AUROC, and pixel AUROC and AUPRO when the test set has masks; resets the metrics."""
        return self.test_metrics.compute()

    def on_test_epoch_end(self) -> None:
        """Log the test metrics (plain Trainer use)."""
        for key, value in self.compute_test_metrics().items():
            self.log(self._name(key), value)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Score held-out normal images and synthetic anomalies made from them (the datamodule's
        ``val_dataloader``): the epoch's criterion, threshold and normaliser come from them."""
        if not self.model.has_memory:  # Lightning's sanity check runs before the first epoch builds one
            return
        _, scores = self.score_batch(batch, maps=False)
        products = list(batch.get("product", ["all"] * len(scores)))
        self._validation.append((scores.detach().cpu(), torch.as_tensor(batch["label"]).cpu(), products))

    def on_validation_epoch_end(self) -> None:
        """The held-out criterion (image AUROC of the normal images against the synthetic anomalies, on
        per-product normalised scores) logged as ``val/criterion``; the threshold and the normaliser become
        module state. Normal images only: a site has no real defect to tune on."""
        if not self._validation:
            return
        scores = torch.cat([s for s, _, _ in self._validation]).double().numpy()
        labels = torch.cat([y for _, y, _ in self._validation]).long()
        products = [p for _, _, names in self._validation for p in names]
        self._validation.clear()
        normal = (labels == 0).numpy()
        if not normal.any():
            return
        self.normalizer = ScoreNormalizer.fit(scores[normal], [p for p, n in zip(products, normal, strict=True) if n])
        normalised = torch.from_numpy(self.normalizer(scores, products))
        self.threshold.fill_(float(np.percentile(normalised[normal].numpy(), self.threshold_percentile)))
        self.log(self._name("val/threshold"), float(self.threshold))
        if bool((labels == 1).any()):
            self.log(self._name("val/criterion"), float(binary_auroc(normalised, labels)))

    def _normalised(
        self, scores: torch.Tensor, maps: torch.Tensor, products: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps on the normaliser's per-product scale (as they are without one)."""
        if self.normalizer is None:
            return scores, maps
        params = np.array([self.normalizer.params(p) for p in products], dtype=np.float64).reshape(-1, 2)
        loc, scale = (torch.as_tensor(params[:, i], dtype=scores.dtype) for i in (0, 1))
        return (scores - loc) / scale, (maps - loc[:, None, None]) / scale[:, None, None]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """anomalib's fields: ``image_path``, ``pred_score`` and ``anomaly_map`` (on the normaliser's scale
        where validation fitted one), ``pred_label`` and ``pred_mask`` against the module's threshold."""
        maps, scores = self.score_batch(batch)
        products = list(batch.get("product", ["all"] * len(scores)))
        scores, maps = self._normalised(scores.cpu(), maps.cpu(), products)
        threshold = float(self.threshold)
        return {
            "image_path": batch.get("path"),
            "pred_score": scores,
            "pred_label": scores > threshold,
            "anomaly_map": maps,
            "pred_mask": maps > threshold,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The normaliser beside the state dict (plain lists: safe for ``weights_only`` loading)."""
        checkpoint["feddymem_normalizer"] = None if self.normalizer is None else self.normalizer.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The normaliser saved by :meth:`on_save_checkpoint` (the memory takes the saved size by itself)."""
        state = checkpoint.get("feddymem_normalizer")
        self.normalizer = None if state is None else ScoreNormalizer.from_state(state)

    def save_lightning_checkpoint(self, path: str | Path) -> Path:
        """This module as a Lightning checkpoint (``FedDyMemModule.load_from_checkpoint(path)`` reads it),
        written atomically: the state dict (backbone included), the settings and the normaliser."""
        checkpoint: dict[str, Any] = {
            "state_dict": self.state_dict(),
            "hyper_parameters": dict(self.hparams),
            "pytorch-lightning_version": L.__version__,
        }
        self.on_save_checkpoint(checkpoint)
        payload = io.BytesIO()
        torch.save(checkpoint, payload)
        atomic_write_bytes(path, payload.getvalue())
        return Path(path)

    @classmethod
    def from_trained(cls, checkpoint: str | Path, client_id: int = 0) -> FedDyMemModule:
        """Client ``client_id`` of a finished run (``runs/<name>/checkpoints/last.ckpt``): its kept state,
        its settings and its decision threshold, ready for a plain Trainer's ``predict`` or to save as a
        Lightning checkpoint (``feddymem export --format lightning``)."""
        trained = load_trained(checkpoint, client_id)
        module = cls(
            trained.model.settings,
            memory_reduce_settings(trained.config),
            optim_settings(trained.config),
            trained.config.seed + client_id,
            threshold_percentile=trained.config.threshold_percentile,
            rebuild_memory_every_epoch=False,  # it keeps the memory it was trained with
            feature_extractor=trained.model.feature_extractor,
        )
        module.model.load_trainable_state(trained.model.trainable_state())
        module.threshold.fill_(trained.threshold)
        return module.eval()

    # --- checkpoints ----------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A copy of the generator, radius and memory: everything but the frozen backbone (the settings rebuild it)."""
        return self.model.trainable_state()

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state from :meth:`trainable_state`; one that does not fit is a ``ValueError`` naming the key."""
        self.model.load_trainable_state(state)
