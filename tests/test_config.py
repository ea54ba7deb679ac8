import pytest

from feddymem.config import Reduce, load_config
from feddymem.errors import ConfigError


def test_defaults_and_overrides():
    cfg = load_config(["federation.rounds=3", "model.backbone.name=resnet18", "memory.reduce=position_mean"])
    assert cfg.federation.rounds == 3 and cfg.model.backbone.name == "resnet18"
    assert cfg.memory.reduce == Reduce.position_mean
    assert cfg.data.name == "elpv" and [p.name for p in cfg.data.products] == ["mono", "poly"]


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
    with pytest.raises(ConfigError, match="method=centralized pools all data in one process; got 2 processes"):
        load_config(["method=centralized", "federation.devices=2"])
    with pytest.raises(ConfigError, match="server.aggregation=mean' .* aligned by patch position.*got cluster_mean"):
        load_config(["server.aggregation=mean"])
    with pytest.raises(ConfigError, match="'memory.coreset_ratio' must be in"):
        load_config(["memory.reduce=coreset", "memory.coreset_ratio=0"])
    cfg = load_config(
        ["server.aggregation=mean", "memory.reduce=position_mean", "memory.size=0", "federation.local_epochs=0"]
    )
    assert cfg.server.aggregation.value == "mean" and cfg.federation.local_epochs == 0
