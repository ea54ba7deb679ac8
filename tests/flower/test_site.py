import pytest

pytest.importorskip("flwr")

from feddymem.config import load_config
from feddymem.errors import ConfigError
from feddymem.flower.site import site_fabric


def test_a_site_trains_on_the_accelerator_of_its_own_node_config():
    cfg = load_config(["federation.accelerator=cpu"])
    assert site_fabric({}, cfg).device.type == "cpu"  # the coordinator's choice when the site says nothing
    assert site_fabric({"accelerator": "cpu"}, load_config([])).device.type == "cpu"
    with pytest.raises(ConfigError, match="node config 'accelerator' must be one of .*; got 'tpu'"):
        site_fabric({"accelerator": "tpu"}, cfg)
