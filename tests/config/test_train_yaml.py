"""``configs/train.yaml``, the schema and the README's key table say the same thing."""

from __future__ import annotations

import dataclasses
import enum
import re
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from feddymem.config import TrainConfig
from feddymem.config.loading import config_dir

ROOT = Path(__file__).resolve().parents[2]
SET_BY_EACH_DATA_SET = {"data.name", "data.products"}  # no default: every data set file sets them


def schema_defaults(cls: type = TrainConfig, prefix: str = "") -> dict[str, typing.Any]:
    """Every leaf key of the schema and its default."""
    out: dict[str, typing.Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(schema_defaults(hints[f.name], f"{key}."))
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            out[key] = default.value if isinstance(default, enum.Enum) else default
    return out


def yaml_leaves(node: dict, prefix: str = "") -> dict[str, typing.Any]:
    out: dict[str, typing.Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(yaml_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


TRAIN_YAML = config_dir() / "train.yaml"
DEFAULTS = schema_defaults()
IN_YAML = yaml_leaves(OmegaConf.to_container(OmegaConf.load(TRAIN_YAML)))  # type: ignore[arg-type]


def test_train_yaml_holds_every_key_of_the_schema_at_its_default():
    assert set(DEFAULTS) - set(IN_YAML) == SET_BY_EACH_DATA_SET
    assert set(IN_YAML) <= set(DEFAULTS)
    moved = {k: (v, DEFAULTS[k]) for k, v in IN_YAML.items() if v != DEFAULTS[k]}
    assert not moved, f"train.yaml and the schema disagree (yaml, schema): {moved}"
    text = TRAIN_YAML.read_text()
    assert all(key in text for key in SET_BY_EACH_DATA_SET)  # said in a comment


def test_every_key_of_train_yaml_has_its_comment():
    bare = [
        line.strip()
        for line in TRAIN_YAML.read_text().splitlines()
        if re.match(r"^\s*[a-z_]+: \S", line) and "#" not in line
    ]
    assert not bare, f"keys without a comment in train.yaml: {bare}"


def readme_key_table() -> list[tuple[str, str]]:
    rows = []
    for line in (ROOT / "README.md").read_text().splitlines():
        if match := re.match(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", line):
            rows.append((match.group(1), match.group(2)))
    return rows


@pytest.mark.parametrize(("key", "default"), readme_key_table())
def test_the_readme_key_table_states_the_schema_defaults(key, default):
    assert key in DEFAULTS, f"the README's key table names {key}, which the schema does not have"
    stated = OmegaConf.create({"v": OmegaConf.from_dotlist([f"v={default}"]).v}).v if default != '""' else ""
    assert stated == DEFAULTS[key], f"README says {key} = {default}, the schema {DEFAULTS[key]!r}"


def test_the_readme_has_a_key_table():
    assert len(readme_key_table()) >= 8
