import numpy as np
import pytest
import torch
from PIL import Image

from feddymem.data.datasets import ImageDataset, SyntheticAnomalyDataset, verify_samples
from feddymem.data.feature_cache import FeatureCache
from feddymem.data.products import Sample
from feddymem.errors import DataError


def _write(tmp_path, name, array):
    path = tmp_path / name
    Image.fromarray(array).save(path)
    return str(path)


def test_grayscale_becomes_rgb_resized_and_masks_binarised(tmp_path):
    gray = _write(tmp_path, "g.png", np.full((50, 70), 128, np.uint8))
    mask_array = np.zeros((50, 70), np.uint8)
    mask_array[:, 35:] = 200
    mask = _write(tmp_path, "g_mask.png", mask_array)
    item = ImageDataset([Sample(gray, 1, "p", "d", mask)], 40, 32, mean=(0.5,) * 3, std=(0.5,) * 3)[0]
    assert item["image"].shape == (3, 32, 32)
    assert torch.allclose(item["image"], torch.full((3, 32, 32), 128 / 255 * 2 - 1), atol=1e-6)
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert item["mask"][:, :10].sum() == 0 and item["mask"][:, -10:].min() == 1


def test_verify_names_corrupt_and_missing_files_and_mask_size(tmp_path):
    good = _write(tmp_path, "a.png", np.zeros((8, 8, 3), np.uint8))
    corrupt = tmp_path / "b.png"
    corrupt.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="cannot decode image .*b.png"):
        verify_samples([Sample(good, 0, "p"), Sample(str(corrupt), 0, "p")])
    with pytest.raises(DataError, match="image not found: .*c.png"):
        verify_samples([Sample(str(tmp_path / "c.png"), 0, "p")])
    small_mask = _write(tmp_path, "m.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="mask .*m.png is 4×4 but its image .*a.png is 8×8"):
        verify_samples([Sample(good, 1, "p", "d", small_mask)])


def test_feature_cache_serves_the_same_features_and_counts(fedmodel, synthetic_root):
    folder = synthetic_root / "product0" / "train" / "good"
    samples = [Sample(str(p), 0, "p") for p in sorted(folder.iterdir())[:4]]
    ds = ImageDataset(samples, 96, 96, fedmodel.feature_extractor.mean, fedmodel.feature_extractor.std)
    cache = FeatureCache(fedmodel.extract, batch_size=2)
    cached = cache.wrap(ds)
    direct = fedmodel.extract(ds[1]["image"][None])[0]
    assert torch.allclose(cached[1]["features"], direct, atol=1e-5)
    assert cache.stats.extracted == 4 and cache.nbytes == 4 * direct.nelement() * 4
    cache.wrap(ds)  # already there: nothing extracted again
    assert cache.stats.extracted == 4
    _ = [cached[i] for i in range(4)]
    assert cache.stats.saved_seconds > 0


def test_feature_cache_budget_fp16_and_augmentation(fedmodel, synthetic_root):
    folder = synthetic_root / "product1" / "train" / "good"
    samples = [Sample(str(p), 0, "p") for p in sorted(folder.iterdir())[:4]]
    ds = ImageDataset(samples, 96, 96)
    item_bytes = 152 * 12 * 12 * 4
    tiny = FeatureCache(fedmodel.extract, max_bytes=item_bytes * 2, batch_size=2)
    assert tiny.wrap(ds) is ds and tiny.nbytes == 0 and tiny.stats.bypassed == 1
    half = FeatureCache(fedmodel.extract, fp16_above_bytes=item_bytes, batch_size=2)
    cached = half.wrap(ds)
    assert half.fp16 and half.nbytes == 4 * item_bytes // 2
    assert cached[0]["features"].dtype == torch.float32
    augmented = ImageDataset(samples, 96, 96, augment=True)
    assert half.wrap(augmented) is augmented


def test_synthetic_anomalies_paste_a_region_of_another_normal_image_deterministically(tmp_path):
    dark = _write(tmp_path, "dark.png", np.full((40, 40), 20, np.uint8))
    bright = _write(tmp_path, "bright.png", np.full((40, 40), 230, np.uint8))
    samples = [Sample(dark, 0, "p"), Sample(bright, 0, "p")]
    ds = SyntheticAnomalyDataset(samples, per_image=3, seed=5, image_size=32, crop_size=32)
    assert len(ds) == 6 and len({s.path for s in ds.samples}) == 6
    assert all(s.label == 1 and s.path.startswith((dark, bright)) for s in ds.samples)
    normal = ImageDataset(samples, 32, 32)
    for index in range(len(ds)):
        item, again = ds[index], ds[index]
        assert torch.equal(item["image"], again["image"]) and item["label"] == 1
        region = item["mask"].bool()
        assert 0.005 * 32 * 32 * 0.5 < region.sum() < 0.05 * 32 * 32 * 1.5  # 0.5–5 % of the image
        source = normal[index // 3]["image"]
        assert torch.equal(item["image"][:, ~region], source[:, ~region])  # untouched outside the region
        assert (item["image"][:, region] - source[:, region]).abs().mean() > 0.3  # the other image, blended in
    assert not torch.equal(ds[0]["image"], ds[1]["image"])
    # The feature cache keys synthetic items apart from their source images.
    cache = FeatureCache(lambda x: x.mean(dim=1, keepdim=True))
    cached = cache.wrap(ds)
    assert len(cache.store) == 6 and torch.allclose(cached[2]["features"], ds[2]["image"].mean(0, keepdim=True))


@pytest.mark.parametrize(("image_size", "crop_size"), [(256, 224), (96, 96), (257, 224)])
def test_torchvision_preprocessing_gives_the_hand_written_tensors(tmp_path, image_size, crop_size):
    """The torchvision pipeline (resize, centre crop, scale, normalise; masks nearest + > 127) must give the
    tensors of the PIL code it replaced, so cached features and results stay the same."""
    from PIL import Image

    from feddymem.data.datasets import read_image, read_mask
    from feddymem.data.products import load_product
    from synthetic import make_product

    product = load_product(
        {"name": "p", "layout": "mvtec", "root": str(make_product(tmp_path, "p", n_train=2, size=300))}
    )
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    dataset = ImageDataset(product.test, image_size, crop_size, mean, std)
    off = (image_size - crop_size) // 2
    box = (off, off, off + crop_size, off + crop_size)
    for i, sample in enumerate(dataset.samples):
        item = dataset[i]
        img = read_image(sample.path).resize((image_size, image_size), resample=Image.BILINEAR).crop(box)
        ref = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        ref = (ref - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        assert torch.allclose(item["image"], ref, atol=1e-6)
        if sample.mask:
            mask = read_mask(sample.mask).resize((image_size, image_size), resample=Image.NEAREST).crop(box)
            assert torch.equal(item["mask"], torch.from_numpy((np.asarray(mask) > 127).astype(np.float32)))
