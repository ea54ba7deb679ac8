"""Loading and checking a configuration: ``configs/train.yaml``, ``dataset=<name>`` (``configs/dataset/<name>.yaml``
or any YAML path, merged into the ``data`` node) and CLI overrides.

Unknown keys, wrong types and values out of range are :class:`~feddymem.errors.ConfigError` that name the key
and list the valid choices, before any data is read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from feddymem.config.choices import (
    Aggregation,
    Engine,
    Partition,
    Reduce,
)
from feddymem.config.profiles import apply_privacy_profile
from feddymem.config.schema import (
    Range,
    TrainConfig,
)
from feddymem.errors import ConfigError
from feddymem.models.settings import context_window_problem

ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")


def config_dir() -> Path:
    """Where the shipped YAML configs are: ``$FEDDYMEM_CONFIG_DIR``, the wheel, or the source tree."""
    if env := os.environ.get("FEDDYMEM_CONFIG_DIR"):
        return Path(env)
    packaged = Path(__file__).parents[1] / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "configs"


def _valid_keys(schema: Any, dotted: str) -> list[str]:
    node = schema
    for part in dotted.split(".")[:-1]:
        if not isinstance(node, DictConfig) or part not in node:
            return sorted(str(k) for k in schema) if isinstance(schema, DictConfig) else []
        node = node[part]
    return sorted(str(k) for k in node) if isinstance(node, DictConfig) else []


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


def check_shape(schema: Any, value: Any, source: str, prefix: str = "") -> None:
    """``value`` (a YAML or override tree) against the dataclass ``schema``: unknown keys, and mappings,
    lists and scalars where the schema wants another, are a ConfigError naming the full key and ``source``."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(value, dict | DictConfig):
        raise ConfigError(f"'{where}' in {source} must be a mapping of keys, got {_kind(value)}")
    hints = get_type_hints(schema)
    names = sorted(f.name for f in fields(schema))
    for name, item in value.items():
        key = f"{prefix}{name!s}"
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
    """A YAML file as OmegaConf, or a ConfigError that names the file."""
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


def load_config(
    overrides: list[str] | None = None, base: Path | None = None, config_file: Path | None = None
) -> DictConfig:
    """Build the validated experiment config: the schema, ``train.yaml`` (or ``base``), the dataset file and
    the overrides; with ``config_file`` (a run's saved ``config.yaml``, or any whole config) that file
    instead of ``train.yaml`` and the dataset file (``dataset=`` among the overrides reloads the data from
    its file). Overrides are ``key=value``; ``key[i]`` addresses a list item (``data.products[0].root=/x``)."""
    plain, indexed = _split_overrides(list(overrides or []))
    try:
        cli = OmegaConf.from_dotlist(plain)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {plain}: {err}") from None
    if cli.get("resume"):
        # Continue a run: its resolved config is the base; overrides (e.g. more rounds) apply on top.
        config_file = Path(str(cli.resume)) / "config.yaml"
        if not config_file.is_file():
            raise ConfigError(f"cannot resume: {config_file} not found")
    cfg = OmegaConf.structured(TrainConfig)
    if config_file is not None:
        cfg = merge_checked(cfg, load_yaml(Path(config_file)), str(config_file))
        if "dataset" in cli and not cli.get("resume"):
            path = dataset_config_path(str(cli.dataset))
            cfg = merge_checked(cfg, {"data": load_yaml(path)}, str(path))
    else:
        cfg = merge_checked(cfg, load_yaml(base or config_dir() / "train.yaml"), str(base or "configs/train.yaml"))
        path = dataset_config_path(str(cli.get("dataset", cfg.dataset)))
        cfg = merge_checked(cfg, {"data": load_yaml(path)}, str(path))
    cfg = merge_checked(cfg, cli, "command-line overrides")
    for key, value in indexed:
        _set_list_item(cfg, key, value)
    apply_privacy_profile(cfg, cli)
    validate(cfg)
    return cfg


def _split_overrides(overrides: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Plain ``key=value`` overrides, and those that address a list item (``key[i]...=value``)."""
    plain, indexed = [], []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        if "[" in key:
            indexed.append((key, value))
        else:
            plain.append(item)
    return plain, indexed


def _set_list_item(cfg: DictConfig, key: str, value: str) -> None:
    """Set ``key`` (``data.products[0].root``) to ``value`` parsed as an override's value is; the schema
    checks the type; an index past the list's end or an unknown key is a ConfigError naming ``key``."""
    for match in re.finditer(r"\[(\d+)\]", key):
        items = OmegaConf.select(cfg, key[: match.start()])
        if not isinstance(items, ListConfig):
            raise ConfigError(f"cannot set '{key}' from the command line: '{key[: match.start()]}' is not a list")
        if int(match.group(1)) >= len(items):
            raise ConfigError(
                f"cannot set '{key}' from the command line: '{key[: match.start()]}' has {len(items)} items"
            )
    try:
        parsed = OmegaConf.from_dotlist([f"value={value}"]).value
        OmegaConf.update(cfg, key, parsed, merge=True, force_add=False)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot set '{key}' from the command line: {str(err).splitlines()[0]}") from None


def config_from_yaml(text: str, source: str) -> DictConfig:
    """A resolved config as a run writes it (``config.yaml``) or a server sends it, checked and validated;
    ``source`` names it in errors."""
    try:
        node = OmegaConf.create(text)
    except Exception as err:
        raise ConfigError(f"cannot parse the config from {source}: {err}") from None
    cfg = merge_checked(OmegaConf.structured(TrainConfig), node, source)
    validate(cfg)
    return cfg


def _numbers(value: Any, key: str) -> list[tuple[str, Any]]:
    """(key, number) for a scalar or every number of a (nested) list, keys like ``data.table[1][0]``."""
    if isinstance(value, list | ListConfig):
        return [pair for i, item in enumerate(value) for pair in _numbers(item, f"{key}[{i}]")]
    return [(key, value)]


def _ranged_fields(schema: Any, node: Any = None, prefix: str = "") -> Iterator[tuple[str, Range, Any]]:
    """(key, range, value) for every ranged field of ``schema``, recursing into nested configs and lists
    of configs (``data.products[0].window``); without a ``node`` the value is None and list items are
    keyed ``[]``."""
    hints = get_type_hints(schema)
    for f in fields(schema):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        value: Any = None if node is None else node[f.name]
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
    _check_model_and_processes(cfg)
    _check_memory_and_privacy(cfg)
    _check_data(cfg)


def _check_model_and_processes(cfg: DictConfig) -> None:
    if cfg.federation.accelerator not in ACCELERATORS:
        raise ConfigError(
            f"'federation.accelerator' must be one of {', '.join(ACCELERATORS)}; got '{cfg.federation.accelerator}'"
        )
    layers = list(cfg.model.backbone.layers)
    if len(set(layers)) != len(layers):
        raise ConfigError(f"'model.backbone.layers' lists a level twice: {layers}")
    if problem := context_window_problem(cfg.model.scoring.context):
        raise ConfigError(f"'model.scoring.context' {problem}")
    if cfg.data.crop_size > cfg.data.image_size:
        raise ConfigError(
            f"'data.crop_size' ({cfg.data.crop_size}) must not exceed 'data.image_size' ({cfg.data.image_size})"
        )
    # `server.gpu=false` on the command line arrives as the bool False, which the str field spells "False".
    cfg.server.gpu = str(cfg.server.gpu).lower()
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
    if cfg.federation.min_clients > cfg.data.num_clients:
        raise ConfigError(
            f"'federation.min_clients' ({cfg.federation.min_clients}) exceeds 'data.num_clients' "
            f"({cfg.data.num_clients})"
        )


def _check_memory_and_privacy(cfg: DictConfig) -> None:
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
    if cfg.privacy.noise_multiplier > 0 and cfg.memory.reduce not in (Reduce.cluster_mean, Reduce.position_mean):
        raise ConfigError(
            f"'privacy.noise_multiplier' ({cfg.privacy.noise_multiplier}) needs memory.reduce=cluster_mean or "
            f"position_mean, got {cfg.memory.reduce.value}: coreset uploads raw patches, coreset_mean's k-center "
            "centres follow single images' outliers and position_weighted weighs each image by all the others, "
            "so one image's influence has no bound"
        )


def _check_data(cfg: DictConfig) -> None:
    # A Flower coordinator needs no products: every site describes its own (its node's dataset=...).
    if not cfg.data.products and cfg.federation.engine != Engine.flower:
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
    """The config as YAML, as written to a run's ``config.yaml``."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Plain dict (enums as strings) for checkpoints and loggers: safe under ``weights_only=True``."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
