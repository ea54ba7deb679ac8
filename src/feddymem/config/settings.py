"""The core's typed settings from a run's config: built here once, so the core never reads a config."""

from __future__ import annotations

from typing import Any

from feddymem.memory.noise import NoiseSettings
from feddymem.memory.reduce import MemoryReduceSettings
from feddymem.models.settings import ModelSettings, OptimSettings


def model_settings(cfg: Any) -> ModelSettings:
    """The model of ``cfg.model`` (``cfg``: a :class:`~feddymem.config.TrainConfig` or its OmegaConf form)."""
    b, g, loss, s = cfg.model.backbone, cfg.model.generator, cfg.model.loss, cfg.model.scoring
    return ModelSettings(
        backbone=b.name,
        layers=tuple(b.layers),
        weights=b.weights,
        pool_size=b.pool_size,
        generator_reduction=g.reduction,
        coord_channels=g.coord_channels,
        generator_init=g.init,
        k_nearest=loss.k_nearest,
        j_negatives=loss.j_negatives,
        margin=loss.margin,
        radius_init=loss.radius_init,
        score_k=s.k,
        score_method=s.method,
        sigma=s.sigma,
        context=s.context,
        context_in_score=s.context_in_score,
        approximate_above=s.approximate_above,
        nprobe=s.nprobe,
    )


def noise_settings(cfg: Any) -> NoiseSettings:
    """The privacy noise of ``cfg.privacy`` (off when ``noise_multiplier`` is 0)."""
    p = cfg.privacy
    return NoiseSettings(p.noise_multiplier, p.clip_norm, p.patches_per_image, p.kmeans_iters)


def memory_reduce_settings(cfg: Any) -> MemoryReduceSettings:
    """A client's memory-reduce of ``cfg.memory`` with the noise of ``cfg.privacy``."""
    m = cfg.memory
    return MemoryReduceSettings(
        method=m.reduce,
        size=m.size,
        local_kmeans_ratio=m.local_kmeans_ratio,
        coreset_ratio=m.coreset_ratio,
        per_product=m.per_product,
        kmeans_iters=m.kmeans_iters,
        max_points_per_centroid=m.max_points_per_centroid,
        min_cluster_size=m.min_cluster_size,
        min_images_per_item=m.min_images_per_item,
        noise=noise_settings(cfg),
    )


def optim_settings(cfg: Any) -> OptimSettings:
    """The generator's optimiser of ``cfg.optim``."""
    return OptimSettings(lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
