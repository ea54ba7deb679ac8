import pytest
import torch

pytest.importorskip("flwr")

from feddymem.config import load_config
from feddymem.errors import ConfigError
from feddymem.flower.site import set_site_threads, site_fabric


def test_a_site_trains_on_the_accelerator_of_its_own_node_config():
    cfg = load_config(["federation.accelerator=cpu"])
    assert site_fabric({}, cfg).device.type == "cpu"  # the coordinator's choice when the site says nothing
    assert site_fabric({"accelerator": "cpu"}, load_config([])).device.type == "cpu"
    with pytest.raises(ConfigError, match="node config 'accelerator' must be one of .*; got 'tpu'"):
        site_fabric({"accelerator": "tpu"}, cfg)


def test_a_site_uses_the_cpu_threads_of_its_node_config():
    before = torch.get_num_threads()
    try:
        set_site_threads({"threads": 1})
        assert torch.get_num_threads() == 1
        set_site_threads({})  # no key: torch's own choice stands
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="node config 'threads' must be a whole number .*; got 'many'"):
        set_site_threads({"threads": "many"})
