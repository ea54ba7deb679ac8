import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from feddymem.errors import ConfigError
from feddymem.models.backbone import (
    FeatureExtractor,
    convert_lukemelas_state_dict,
    load_imagenet_classifier,
    offline_weights_file,
)

ESPRESSO, TABBY, EGYPTIAN_CAT = 967, 281, 285


def _classify(model, image):
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None]
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    return model((x - 0.5) / 0.5).softmax(-1)[0]


def test_offline_weights_are_real_imagenet_weights():
    model = load_imagenet_classifier("tf_efficientnet_lite0", "imagenet-offline").eval()
    with torch.no_grad():
        coffee = _classify(model, skdata.coffee())
        cat = _classify(model, skdata.chelsea())
    assert coffee.argmax().item() == ESPRESSO and coffee.max() > 0.5
    assert cat.argmax().item() in (TABBY, EGYPTIAN_CAT)


def test_random_weights_do_not_recognise_the_photo():
    model = load_imagenet_classifier("tf_efficientnet_lite0", "none").eval()
    with torch.no_grad():
        assert _classify(model, skdata.coffee()).max() < 0.2


def test_conversion_maps_every_key_with_matching_shapes():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(offline_weights_file("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    converted = convert_lukemelas_state_dict(state, model)
    assert set(converted) == set(model.state_dict())
    assert converted["conv_stem.weight"].data_ptr() == state["_conv_stem.weight"].data_ptr()


def test_feature_extractor_shapes_and_frozen():
    fe = FeatureExtractor("tf_efficientnet_lite0", (2, 3), "imagenet-offline")
    out = fe(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 40 + 112, 28, 28) and fe.out_channels == 152
    assert not any(p.requires_grad for p in fe.parameters())
    fe.train()
    assert not fe.body.training  # batch-norm statistics never move
    assert fe.mean == (0.5, 0.5, 0.5)


def test_feature_extractor_runs_channels_last_and_returns_the_same_contiguous_descriptors():
    fe = FeatureExtractor("tf_efficientnet_lite0", (2, 3), "imagenet-offline")
    assert fe.body.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    out = fe(images)
    assert out.is_contiguous()  # callers flatten it with view/reshape into patches
    fe.body.to(memory_format=torch.contiguous_format)  # the plain layout: the same descriptors
    reference = fe(images.contiguous())
    assert torch.allclose(out, reference, atol=1e-4, rtol=1e-4) and not torch.equal(out, torch.zeros_like(out))


def test_weights_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="weights file not found"):
        FeatureExtractor("tf_efficientnet_lite0", (2, 3), str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="no offline ImageNet weights for backbone 'resnet18'"):
        FeatureExtractor("resnet18", (1, 2), "imagenet-offline")
    with pytest.raises(ConfigError, match="unknown timm backbone"):
        FeatureExtractor("not_a_model", (1,), "none")


def test_local_weights_file_in_timm_naming(tmp_path):
    import timm

    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    fe = FeatureExtractor("resnet18", (1, 2), str(path))
    assert torch.equal(fe.body.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])
    assert fe(torch.randn(1, 3, 64, 64)).shape == (1, 64 + 128, 16, 16)
