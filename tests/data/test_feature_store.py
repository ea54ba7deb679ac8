"""The on-disk feature store: a second process reads what the first extracted, and any change to an image,
the pre-processing or the extractor's weights misses instead of serving stale features."""

import copy
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from feddymem.data.datasets import ImageDataset, SyntheticAnomalyDataset
from feddymem.data.feature_cache import FeatureCache
from feddymem.data.feature_store import FeatureStore, extractor_fingerprint
from feddymem.data.products import Sample
from feddymem.errors import OutputError


def _samples(root, product="product0", count=4):
    folder = root / product / "train" / "good"
    return [Sample(str(p), 0, product) for p in sorted(folder.iterdir())[:count]]


def _cache(model, folder):
    return FeatureCache(model.extract, batch_size=2, disk=FeatureStore(folder, model.feature_extractor))


def test_a_second_cache_reads_every_feature_back_from_disk(fedmodel, synthetic_root, tmp_path):
    ds = ImageDataset(_samples(synthetic_root), 96, 96, fedmodel.feature_extractor.mean, fedmodel.feature_extractor.std)
    first = _cache(fedmodel, tmp_path / "features")
    written = first.wrap(ds)
    assert first.stats.extracted == 4 and first.stats.from_disk == 0
    entries = sorted((tmp_path / "features").rglob("*.pt"))
    assert len(entries) == 4
    # One item per entry, not the batch it was extracted in.
    item_bytes = written[0]["features"].nelement() * 4
    assert all(item_bytes < e.stat().st_size < item_bytes + 4096 for e in entries)

    second = _cache(fedmodel, tmp_path / "features")  # as a new process would: nothing in memory
    read = second.wrap(ds)
    assert second.stats.extracted == 0 and second.stats.from_disk == 4
    for i in range(4):
        assert torch.equal(read[i]["features"], written[i]["features"])


def test_changed_images_preprocessing_or_weights_miss(fedmodel, synthetic_root, tmp_path):
    samples = _samples(synthetic_root, "product1")
    copies = []
    for i, s in enumerate(samples):  # private copies: one is rewritten below
        path = tmp_path / f"img{i}.png"
        path.write_bytes(Path(s.path).read_bytes())
        copies.append(Sample(str(path), 0, "p"))
    ds = ImageDataset(copies, 96, 96)
    _cache(fedmodel, tmp_path / "f").wrap(ds)

    Image.open(copies[1].path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(copies[1].path)
    again = _cache(fedmodel, tmp_path / "f")
    again.wrap(ds)
    assert again.stats.from_disk == 3 and again.stats.extracted == 1  # only the rewritten image

    cropped = _cache(fedmodel, tmp_path / "f")
    cropped.wrap(ImageDataset(copies, 96, 80))
    assert cropped.stats.from_disk == 0 and cropped.stats.extracted == 4

    other = copy.deepcopy(fedmodel)
    with torch.no_grad():
        next(other.feature_extractor.parameters()).add_(1e-3)
    assert extractor_fingerprint(other.feature_extractor) != extractor_fingerprint(fedmodel.feature_extractor)
    retrained = _cache(other, tmp_path / "f")
    retrained.wrap(ds)
    assert retrained.stats.from_disk == 0 and retrained.stats.extracted == 4


def test_synthetic_anomalies_are_stored_and_keyed_by_their_sources(fedmodel, synthetic_root, tmp_path):
    sources = _samples(synthetic_root, count=3)
    ds = SyntheticAnomalyDataset(sources, per_image=2, seed=1, image_size=96, crop_size=96)
    written = _cache(fedmodel, tmp_path / "f").wrap(ds)
    same = _cache(fedmodel, tmp_path / "f")
    read = same.wrap(SyntheticAnomalyDataset(sources, per_image=2, seed=1, image_size=96, crop_size=96))
    assert same.stats.from_disk == 6 and torch.equal(read[5]["features"], written[5]["features"])
    reseeded = _cache(fedmodel, tmp_path / "f")
    reseeded.wrap(SyntheticAnomalyDataset(sources, per_image=2, seed=2, image_size=96, crop_size=96))
    assert reseeded.stats.from_disk == 0
    fewer = _cache(fedmodel, tmp_path / "f")  # another donor pool: other pastes
    fewer.wrap(SyntheticAnomalyDataset(sources[:2], per_image=2, seed=1, image_size=96, crop_size=96))
    assert fewer.stats.from_disk == 0


def test_an_unreadable_entry_is_extracted_again_and_replaced(fedmodel, synthetic_root, tmp_path, caplog):
    ds = ImageDataset(_samples(synthetic_root, count=2), 96, 96)
    written = _cache(fedmodel, tmp_path / "f").wrap(ds)
    broken = sorted((tmp_path / "f").rglob("*.pt"))[0]
    broken.write_bytes(broken.read_bytes()[:100])
    again = _cache(fedmodel, tmp_path / "f")
    with caplog.at_level(logging.WARNING):
        read = again.wrap(ds)
    assert again.stats.from_disk == 1 and again.stats.extracted == 1
    assert "unreadable" in caplog.text and str(broken) in caplog.text
    # Extracted alone now, in a batch of two before: the same features up to float rounding.
    assert all(torch.allclose(read[i]["features"], written[i]["features"], atol=1e-4) for i in range(2))
    assert torch.load(broken, weights_only=True)["features"].shape == written[0]["features"].shape


def test_a_folder_that_cannot_be_written_is_named(fedmodel, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="a_file"):
        FeatureStore(blocker / "features", fedmodel.feature_extractor)


def test_processes_sharing_the_store_split_the_work_and_read_back_each_others(fedmodel, synthetic_root, tmp_path):
    import os
    import threading
    import time

    ds = ImageDataset(_samples(synthetic_root), 96, 96, fedmodel.feature_extractor.mean, fedmodel.feature_extractor.std)
    reference = FeatureCache(fedmodel.extract, batch_size=2).wrap(ds)  # in memory only
    store = FeatureStore(tmp_path / "features", fedmodel.feature_extractor)
    keys = [store.key(ds, i) for i in range(4)]
    # "Another process" has claimed images 0 and 1, and writes them a moment later.
    assert store.claim(keys[0]) and store.claim(keys[1]) and not store.claim(keys[0])

    def other_process():
        time.sleep(0.5)
        for i in (0, 1):
            store.save(keys[i], reference[i]["features"], None)  # its claim released once written
        store.flush()

    writer = threading.Thread(target=other_process)
    writer.start()
    cache = _cache(fedmodel, tmp_path / "features")
    served = cache.wrap(ds)
    writer.join()
    assert (cache.stats.extracted, cache.stats.from_disk) == (2, 2)  # only the unclaimed two extracted here
    for i in range(4):
        assert torch.allclose(served[i]["features"], reference[i]["features"], atol=1e-5)
    assert not list((tmp_path / "features").rglob("*.claim"))
    # A claim left by a process that died (older than CLAIM_STALE_S) is taken over.
    fresh = FeatureStore(tmp_path / "other", fedmodel.feature_extractor)
    assert fresh.claim(keys[2])
    claim = next((tmp_path / "other").rglob("*.claim"))
    os.utime(claim, (time.time() - 3600, time.time() - 3600))
    assert fresh.claim(keys[2])
