import pytest

from feddymem.config import PrivacyProfile, Reduce, load_config
from feddymem.errors import ConfigError


def test_defaults_and_overrides():
    cfg = load_config(["federation.rounds=3", "model.backbone.name=resnet18", "memory.reduce=position_mean"])
    assert cfg.federation.rounds == 3 and cfg.model.backbone.name == "resnet18"
    assert cfg.memory.reduce == Reduce.position_mean
    assert cfg.data.name == "elpv" and [p.name for p in cfg.data.products] == ["mono", "poly"]


@pytest.mark.parametrize(("given", "read"), [("false", "false"), ("True", "true"), ("auto", "auto")])
def test_server_gpu_reads_a_yes_or_no_however_it_is_spelled(given, read):
    # On the command line `false` arrives as a bool, which the string field would spell "False".
    assert load_config([f"server.gpu={given}"]).server.gpu == read
    with pytest.raises(ConfigError, match="'server.gpu' must be one of auto, true, false; got 'sometimes'"):
        load_config(["server.gpu=sometimes"])


def test_the_strict_privacy_profile_sets_its_upload_settings_and_refuses_looser_ones():
    from feddymem.config.profiles import PRIVACY_PROFILES

    group, images, ratio = PRIVACY_PROFILES[PrivacyProfile.strict]
    standard, strict = load_config([]), load_config(["privacy.profile=strict"])
    assert standard.memory.min_cluster_size < group.value  # the standard profile changes nothing
    assert (strict.memory.min_cluster_size, strict.memory.min_images_per_item) == (group.value, images.value)
    assert strict.memory.coreset_ratio == ratio.value < standard.memory.coreset_ratio
    stricter = load_config(["privacy.profile=strict", f"memory.min_cluster_size={group.value + 5}"])
    assert stricter.memory.min_cluster_size == group.value + 5
    with pytest.raises(ConfigError, match=r"'memory.coreset_ratio=0.02' would make uploads less private"):
        load_config(["privacy.profile=strict", "memory.coreset_ratio=0.02"])
    with pytest.raises(ConfigError, match=r"privacy.profile=strict sets 'memory.min_cluster_size'.*less private"):
        load_config(["privacy.profile=strict", "memory.min_cluster_size=3"])
    with pytest.raises(ConfigError, match="cannot upload raw patches"):
        load_config(["privacy.profile=strict", "memory.reduce=coreset"])
    with pytest.raises(ConfigError, match="privacy.profile"):
        load_config(["privacy.profile=paranoid"])


def test_unknown_key_names_key_and_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'federation\.roundz'.*valid keys here: .*rounds"):
        load_config(["federation.roundz=3"])


def test_wrong_type_and_bad_choice():
    with pytest.raises(ConfigError, match="'optim.lr'"):
        load_config(["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"'memory.reduce'.*expected one of \[position_mean"):
        load_config(["memory.reduce=median"])
    with pytest.raises(ConfigError, match="'federation.local_epochs' must be >= 0"):
        load_config(["federation.local_epochs=-1"])
    with pytest.raises(
        ConfigError, match=r"'method'.*expected one of \[feddymem, local, centralized, patchcore, fedavg"
    ):
        load_config(["method=swarm"])
    with pytest.raises(ConfigError, match="6 processes .* for 5 clients"):
        load_config(["federation.devices=3", "federation.num_nodes=2"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(["rounds"])


def test_dataset_by_name_or_path(tmp_path, synthetic_yaml):
    assert load_config([f"dataset={synthetic_yaml}"]).data.name == "synthetic"
    with pytest.raises(ConfigError, match="unknown dataset 'nope': valid choices are .*elpv"):
        load_config(["dataset=nope"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nproducts: []\nnum_clientz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.num_clientz' in .*bad\.yaml"):
        load_config([f"dataset={bad}"])
    layout = tmp_path / "layout.yaml"
    layout.write_text("name: x\nproducts: [{name: a, layout: zip, root: /x}]\n")
    with pytest.raises(ConfigError, match="layout' is 'zip'; valid choices: mvtec, bmad, elpv, custom"):
        load_config([f"dataset={layout}"])


def test_baseline_and_ablation_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="server.aggregation=mean' .* aligned by patch position.*got coreset_mean"):
        load_config(["server.aggregation=mean"])
    with pytest.raises(ConfigError, match=r"'memory.coreset_ratio' must be > 0, got 0.0 \(valid: \(0, 1\]\)"):
        load_config(["memory.reduce=coreset", "memory.coreset_ratio=0"])
    cfg = load_config(
        ["server.aggregation=mean", "memory.reduce=position_mean", "memory.size=0", "federation.local_epochs=0"]
    )
    assert cfg.server.aggregation.value == "mean" and cfg.federation.local_epochs == 0


def test_every_numeric_key_of_the_schema_declares_its_range():
    """A new int or float key without a Range would slip past validation: the schema must not allow it."""
    from dataclasses import fields, is_dataclass
    from typing import get_args, get_origin, get_type_hints

    from feddymem.config import TrainConfig

    def numeric(hint) -> bool:
        return hint in (int, float) or (get_origin(hint) is list and numeric(get_args(hint)[0]))

    unranged, seen = [], 0

    def walk(schema, prefix=""):
        nonlocal seen
        hints = get_type_hints(schema)
        for f in fields(schema):
            hint = hints[f.name]
            inner = get_args(hint)[0] if get_origin(hint) is list else None
            if is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
            elif inner is not None and is_dataclass(inner):
                walk(inner, f"{prefix}{f.name}[].")
            elif numeric(hint):
                seen += 1
                if "range" not in f.metadata:
                    unranged.append(prefix + f.name)

    walk(TrainConfig)
    assert seen > 40 and unranged == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.table=[[0.6,0.5],[0.6,0.5],[0,0]]", "data.partition=table", "data.num_clients=3"],
            r"'data.table' gives out 1.2 of product",
        ),
        (["data.table=[[0.5,-0.1]]"], r"'data.table\[0\]\[1\]' must be >= 0, got -0.1"),
        (["optim.weight_decay=-inf"], "'optim.weight_decay' must be a finite number"),
        (["data.products.0.nope=1"], "'data.products' in command-line overrides must be a list, got a mapping"),
        (["model.backbone.layers=2"], "'model.backbone.layers' in command-line overrides must be a list"),
    ],
)
def test_values_and_shapes_are_checked_with_the_full_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["dataset=shared_industrial", *overrides])


@pytest.mark.parametrize("window", [1, 2, 8])
def test_a_context_window_must_be_odd_and_at_least_3_patches(window):
    with pytest.raises(ConfigError, match=f"'model.scoring.context' must be 0 .* odd window .* got {window}"):
        load_config([f"model.scoring.context={window}"])
    assert load_config(["model.scoring.context=0"]).model.scoring.context == 0
