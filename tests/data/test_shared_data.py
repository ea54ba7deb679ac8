"""Loaders on the four real data sets in ../shared/data (read in place, never copied)."""

import numpy as np
import pytest

from conftest import SHARED_DATA
from feddymem.data.datasets import ImageDataset, verify_samples
from feddymem.data.products import load_product

pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present"),
]


@pytest.mark.parametrize(
    ("root", "layout", "train", "test_normal", "test_anomalous", "masks"),
    [
        ("industrial/magnetic_tile", "mvtec", 761, 191, 392, True),
        ("industrial/engine_wiring", "mvtec", 285, 285, 322, False),
        ("medical/head_ct", "bmad", 70, 30, 100, False),
        ("medical/pneumonia_mnist", "bmad", 1214, 234, 234, False),
    ],
)
def test_shared_sets_load_with_their_counts(root, layout, train, test_normal, test_anomalous, masks):
    split = load_product({"name": root.split("/")[-1], "layout": layout, "root": root}, data_root=str(SHARED_DATA))
    assert len(split.train) == train
    assert sum(s.label == 0 for s in split.test) == test_normal
    assert sum(s.label == 1 for s in split.test) == test_anomalous
    assert split.has_masks is masks
    # Decode a handful (grayscale, variable sizes, 28 px X-rays) through the real pipeline.
    subset = split.test[-3:] + split.train[:2]
    verify_samples(subset)
    ds = ImageDataset(subset, 224, 224)
    for item in (ds[0], ds[len(ds) - 1]):
        assert item["image"].shape == (3, 224, 224) and np.isfinite(item["image"].numpy()).all()
    if masks:
        assert ds[0]["mask"].sum() > 0 and set(ds[0]["mask"].unique().tolist()) <= {0.0, 1.0}
