import torch
import torch.nn.functional as F

from feddymem.models.anomaly_map import AnomalyMapGenerator, gaussian_kernel1d


def test_matches_upsample_then_gaussian_blur():
    scores = torch.rand(3, 12, 10)
    maps, image_scores = AnomalyMapGenerator(sigma=4.0)(scores, (96, 80))
    ref = F.interpolate(scores[:, None], size=(96, 80), mode="bilinear", align_corners=False)
    k = gaussian_kernel1d(4.0)
    pad = k.numel() // 2
    ref = F.conv2d(F.pad(ref, (pad, pad, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    ref = F.conv2d(F.pad(ref, (0, 0, pad, pad), mode="replicate"), k.view(1, 1, -1, 1))[:, 0]
    assert maps.shape == (3, 96, 80)
    assert torch.allclose(maps, ref, atol=1e-5)
    assert torch.equal(image_scores, maps.flatten(1).amax(1))


def test_blur_spreads_a_spike_and_keeps_mass():
    scores = torch.zeros(1, 8, 8)
    scores[0, 4, 4] = 1.0
    sharp, _ = AnomalyMapGenerator(sigma=0)(scores, (64, 64))
    blurred, _ = AnomalyMapGenerator(sigma=4)(scores, (64, 64))
    assert blurred.max() < sharp.max()
    assert torch.isclose(blurred.sum(), sharp.sum(), rtol=1e-3)
