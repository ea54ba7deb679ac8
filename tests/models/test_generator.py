import pytest
import torch

from feddymem.models.generator import MemoryGenerator, coordinate_channels


def test_identity_start_preserves_features():
    gen = MemoryGenerator(16, reduction=1)
    x = torch.randn(2, 16, 5, 7)
    assert torch.allclose(gen(x), x)


def test_reduced_generator_is_orthonormal_projection():
    gen = MemoryGenerator(16, reduction=4, coord_channels=False)
    w = gen.conv.weight.view(4, 16)
    assert gen(torch.randn(1, 16, 3, 3)).shape == (1, 4, 3, 3)
    assert torch.allclose(w @ w.T, torch.eye(4), atol=1e-5)


def test_coordinates_reach_the_output_after_training_changes_weights():
    gen = MemoryGenerator(4)
    with torch.no_grad():
        gen.conv.weight[0, 4] = 1.0  # row coordinate into channel 0
    out = gen(torch.zeros(1, 4, 3, 3))
    assert torch.allclose(out[0, 0, :, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert coordinate_channels(2, 3, 4, torch.device("cpu"), torch.float32).shape == (2, 2, 3, 4)


def test_random_init_is_pytorchs_default_and_changes_the_geometry():
    torch.manual_seed(0)
    features = torch.randn(2, 8, 3, 3)
    identity = MemoryGenerator(8, coord_channels=False)
    random = MemoryGenerator(8, coord_channels=False, init="random")
    assert torch.allclose(identity(features), features, atol=1e-6)
    assert not torch.allclose(random(features), features, atol=1e-2)
    bound = 1 / 8**0.5  # Kaiming-uniform(a=√5) of a 1×1 conv with 8 inputs
    assert random.conv.weight.abs().max() <= bound and random.conv.weight.std() > bound / 4
    with pytest.raises(ValueError, match="'identity' or 'random'"):
        MemoryGenerator(8, init="orthogonal")
