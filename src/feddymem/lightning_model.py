"""FedDyMem client as a LightningModule: a thin wrapper around :class:`FedDyMemModel`.

It trains the generator with the metric loss against its memory, builds and reduces memory, and
evaluates with torchmetrics (image AUROC; pixel AUROC and AUPRO where masks exist). It runs under a
plain ``lightning.Trainer`` (fit/test/predict) or under the Fabric orchestrator, which calls the same
hooks. Batches hold either ``image`` (normalised images) or ``features`` (cached backbone features).
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric

from feddymem.config import TrainConfig
from feddymem.memory.reduce import MemoryBank
from feddymem.metrics.anomaly_metrics import AnomalyMetrics
from feddymem.models.backbone import FeatureExtractor
from feddymem.models.torch_model import FedDyMemModel
from feddymem.privacy.mechanism import NoiseSettings


def _value(choice: Any) -> str:
    """An enum member (dataclass config) or its string (OmegaConf config) as the string."""
    return str(getattr(choice, "value", choice))


# Every default is the config's (what ``feddymem train`` runs and the benchmarks measure), defined once in
# feddymem.config: ``FedDyMemModule()`` is the trained default model.
_D = TrainConfig()
# The model's settings and their defaults: FedDyMemModel's keyword arguments, listed once there.
MODEL_SETTINGS = {
    name: p.default
    for name, p in inspect.signature(FedDyMemModel.__init__).parameters.items()
    if name not in ("self", "feature_extractor")
}


class FedDyMemModule(L.LightningModule):
    """One FedDyMem client (or a centralised model): feature extractor + memory generator + memory.

    Build it with keyword arguments (defaults: ``feddymem train``'s), or from a run's config with
    :meth:`from_config`. The model's settings (``backbone``, ``layers``, ``weights``, ``score_method``, ...)
    are :class:`FedDyMemModel`'s keyword arguments, passed through; the others are the memory-reduce and
    optimiser settings below."""

    def __init__(
        self,
        *,
        memory_reduce: str = _D.memory.reduce.value,
        memory_size: int = _D.memory.size,
        local_kmeans_ratio: int = _D.memory.local_kmeans_ratio,
        coreset_ratio: float = _D.memory.coreset_ratio,
        reduce_per_product: bool = _D.memory.per_product,
        kmeans_iters: int = _D.memory.kmeans_iters,
        max_points_per_centroid: int = _D.memory.max_points_per_centroid,
        min_cluster_size: int = _D.memory.min_cluster_size,
        min_images_per_item: int = _D.memory.min_images_per_item,
        noise_multiplier: float = _D.privacy.noise_multiplier,
        clip_norm: float = _D.privacy.clip_norm,
        noise_patches_per_image: int = _D.privacy.patches_per_image,
        noise_iters: int = _D.privacy.kmeans_iters,
        lr: float = _D.optim.lr,
        weight_decay: float = _D.optim.weight_decay,
        seed: int = _D.seed,
        log_prefix: str = "",
        sync_metrics: bool = True,
        feature_extractor: FeatureExtractor | None = None,
        **model_settings: Any,
    ) -> None:
        super().__init__()
        if unknown := sorted(set(model_settings) - set(MODEL_SETTINGS)):
            raise TypeError(f"FedDyMemModule got unknown settings {unknown}; the model's are {sorted(MODEL_SETTINGS)}")
        settings = {**MODEL_SETTINGS, **model_settings}
        settings["layers"] = tuple(int(i) for i in settings["layers"])
        settings = {k: _value(v) if isinstance(v, enum.Enum) else v for k, v in settings.items()}
        # Every setting, defaults included, in hparams: a checkpoint rebuilds exactly this module.
        self.save_hyperparameters(
            {
                **settings,
                "memory_reduce": _value(memory_reduce),
                "memory_size": memory_size,
                "local_kmeans_ratio": local_kmeans_ratio,
                "coreset_ratio": coreset_ratio,
                "reduce_per_product": reduce_per_product,
                "kmeans_iters": kmeans_iters,
                "max_points_per_centroid": max_points_per_centroid,
                "min_cluster_size": min_cluster_size,
                "min_images_per_item": min_images_per_item,
                "noise_multiplier": noise_multiplier,
                "clip_norm": clip_norm,
                "noise_patches_per_image": noise_patches_per_image,
                "noise_iters": noise_iters,
                "lr": lr,
                "weight_decay": weight_decay,
                "seed": seed,
            }
        )
        self.log_prefix = log_prefix
        self.model = FedDyMemModel(**settings, feature_extractor=feature_extractor)
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
        **overrides: Any,
    ) -> FedDyMemModule:
        """The module a run with config ``cfg`` (a :class:`~feddymem.config.TrainConfig` or its OmegaConf
        form) trains for client ``client_id`` (``None``: one centralised model); ``feature_extractor``
        shares a frozen backbone already built for the same config; ``overrides`` replace settings (a
        strategy's, such as PatchCore's scoring)."""
        mem = cfg.memory
        settings = {
            **FedDyMemModel.settings(cfg.model),
            "memory_reduce": _value(mem.reduce),
            "memory_size": mem.size,
            "local_kmeans_ratio": mem.local_kmeans_ratio,
            "coreset_ratio": mem.coreset_ratio,
            "reduce_per_product": mem.per_product,
            "kmeans_iters": mem.kmeans_iters,
            "max_points_per_centroid": mem.max_points_per_centroid,
            "min_cluster_size": mem.min_cluster_size,
            "min_images_per_item": mem.min_images_per_item,
            "noise_multiplier": cfg.privacy.noise_multiplier,
            "clip_norm": cfg.privacy.clip_norm,
            "noise_patches_per_image": cfg.privacy.patches_per_image,
            "noise_iters": cfg.privacy.kmeans_iters,
            "lr": cfg.optim.lr,
            "weight_decay": cfg.optim.weight_decay,
            "seed": cfg.seed + (client_id or 0),
        }
        return cls(
            log_prefix="" if client_id is None else f"client/{client_id}/",
            sync_metrics=client_id is None,
            feature_extractor=feature_extractor,
            **{**settings, **overrides},
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
        image's product, in the order of ``batches`` (a coreset reduce then runs per product when
        ``reduce_per_product``)."""
        hp = self.hparams
        return self.model.build_memory(
            self.embed_batches(batches),
            hp["memory_reduce"],
            size=hp["memory_size"],
            local_kmeans_ratio=hp["local_kmeans_ratio"],
            coreset_ratio=hp["coreset_ratio"],
            iters=hp["kmeans_iters"],
            seed=hp["seed"],
            max_points_per_centroid=hp["max_points_per_centroid"],
            min_cluster_size=hp["min_cluster_size"],
            min_images_per_item=hp["min_images_per_item"],
            gpu=self.device.type == "cuda",
            noise=self.noise_settings,
            image_groups=products if hp["reduce_per_product"] else None,
        )

    @property
    def noise_settings(self) -> NoiseSettings:
        """The privacy noise of this client's uploads (``privacy.*``; off when the multiplier is 0)."""
        hp = self.hparams
        return NoiseSettings(hp["noise_multiplier"], hp["clip_norm"], hp["noise_patches_per_image"], hp["noise_iters"])

    # --- training -------------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the generator and the loss's radius; the backbone is frozen."""
        params = [*self.model.generator.parameters(), *self.model.loss.parameters()]
        return torch.optim.AdamW(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])

    def on_fit_start(self) -> None:
        """Under a plain Trainer without a memory: build one from the training data first."""
        if not self.model.has_memory:
            self.trainer.fit_loop.setup_data()  # public, and idempotent: fit would set the data up next
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
        """Score a batch and update image AUROC, and pixel AUROC and AUPRO where masks exist."""
        maps, scores = self.score_batch(batch)
        self.test_metrics.update(scores, maps, batch["label"], batch["mask"], batch.get("has_mask"))
        return {"pred_score": scores.detach()}

    def compute_test_metrics(self) -> dict[str, float]:
        """Image AUROC, and pixel AUROC and AUPRO when the test set has masks; resets the metrics."""
        return self.test_metrics.compute()

    def on_test_epoch_end(self) -> None:
        """Log the test metrics (plain Trainer use)."""
        for key, value in self.compute_test_metrics().items():
            self.log(self._name(key), value)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Anomaly maps and image scores of a batch, with its paths."""
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
        """Load a state from :meth:`trainable_state`; a mismatch names the keys."""
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("feature_extractor.")]
        if missing or unexpected:
            raise KeyError(f"client state does not match the model: missing {missing}, unexpected {unexpected}")
