"""The attacks are real: on small synthetic textures, a decoder trained on the server's own images inverts
an image's own embeddings better than an unrelated image of the same kind explains them, and membership
inference tells the images of a raw-patch bank from others."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feddymem.memory.reduce import MemoryReduceSettings, reduce_memory
from feddymem.privacy.attacks import image_windows, invert_images, invert_items, membership_auc, tile, train_decoder
from synthetic import texture


def _images(seed: int, count: int, size: int = 96) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    # One kind of image (stripes of one angle and colour); each image its own phase and noise.
    arrays = [texture(rng, size, angle=0.7, color=(180, 160, 120)) for _ in range(count)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def embedded(fedmodel):
    mean = torch.tensor(fedmodel.feature_extractor.mean).view(1, -1, 1, 1)
    std = torch.tensor(fedmodel.feature_extractor.std).view(1, -1, 1, 1)

    def embed(pixels):
        with torch.no_grad():
            return fedmodel.embed(fedmodel.extract((pixels - mean) / std))

    public, members, others = _images(0, 24), _images(1, 8), _images(2, 8)
    sets = [("public", public), ("members", members), ("others", others)]
    return {name: (pixels, embed(pixels)) for name, pixels in sets}


@pytest.fixture(scope="module")
def decoder(embedded):
    return train_decoder(*_pairs(*embedded["public"]), epochs=30, batch=256)


def _pairs(pixels, emb):
    grid = tuple(emb.shape[-2:])
    return emb.flatten(2).transpose(1, 2).reshape(-1, emb.shape[1]), image_windows(pixels, grid).flatten(0, 1)


def test_windows_tile_back_into_the_image():
    images = _images(3, 2)
    windows = image_windows(images, (12, 12))
    assert windows.shape == (2, 144, 3, 16, 16)
    assert torch.equal(tile(windows[1], (12, 12)), images[1])


@pytest.mark.slow
def test_inversion_of_per_image_embeddings_beats_the_unrelated_image_floor(embedded, decoder):
    (members, member_emb), (others, _) = embedded["members"], embedded["others"]
    result, reconstructions = invert_images(decoder, member_emb, members, others)
    assert reconstructions.shape == members.shape
    assert result.beats_floor and result.identified == 1.0
    assert result.client.psnr > result.floor.psnr + 1.0  # dB
    print(f"per-image: PSNR {result.client.psnr:.2f} vs floor {result.floor.psnr:.2f}")


def test_raw_patches_leak_membership_and_their_reconstructions_match_the_client(embedded, decoder):
    (members, member_emb), (others, other_emb) = embedded["members"], embedded["others"]
    bank = reduce_memory(member_emb, MemoryReduceSettings("coreset", coreset_ratio=0.1))
    _, member_windows = _pairs(members, member_emb)
    _, other_windows = _pairs(others, other_emb)
    result, reconstructions, matches = invert_items(decoder, bank.items, member_windows, other_windows)
    assert reconstructions.shape == matches.shape == (bank.items.shape[0], 3, 16, 16)
    assert np.isfinite([result.client.psnr, result.floor.psnr, result.client.ssim, result.floor.ssim]).all()
    assert 0.0 <= result.identified <= 1.0 and 0.0 <= result.p_value <= 1.0
    products = ["p"] * 8
    assert membership_auc(bank.items, member_emb, other_emb, products, products) > 0.9
    # A memory of cluster means averaging many patches of every image: far less to tell members by.
    means = reduce_memory(member_emb, MemoryReduceSettings("cluster_mean", size=8, min_cluster_size=50))
    assert membership_auc(means.items, member_emb, other_emb, products, products) < 0.9
