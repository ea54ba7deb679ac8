import pytest
from omegaconf import OmegaConf
from PIL import Image

from feddymem.data.products import load_elpv, load_mvtec, load_product
from feddymem.errors import DataError
from synthetic import make_product


def test_mvtec_layout_reads_train_test_and_masks(tmp_path):
    folder = make_product(tmp_path, "tile", n_train=5, n_good=2, n_bad=3)
    split = load_mvtec("tile", folder)
    assert len(split.train) == 5 and all(s.label == 0 for s in split.train)
    assert sorted(s.label for s in split.test) == [0, 0, 1, 1, 1]
    assert split.has_masks
    assert all(s.mask and s.mask.endswith("_mask.png") for s in split.test if s.label == 1)


def test_product_config_with_root_and_category(tmp_path):
    make_product(tmp_path, "tile", n_train=3)
    node = OmegaConf.create({"name": "t", "layout": "mvtec", "root": str(tmp_path), "category": "tile"})
    assert len(load_product(node).train) == 3


def test_missing_mask_is_named(tmp_path):
    folder = make_product(tmp_path, "tile")
    missing = folder / "ground_truth/spot/001_mask.png"
    missing.unlink()
    with pytest.raises(DataError, match="mask missing for .*001.png"):
        load_mvtec("tile", folder)


def test_mask_without_image_is_named(tmp_path):
    folder = make_product(tmp_path, "tile")
    (folder / "test/spot/002.png").unlink()
    with pytest.raises(DataError, match="mask without an image: .*002_mask.png"):
        load_mvtec("tile", folder)


def test_empty_folders_and_missing_root(tmp_path):
    folder = make_product(tmp_path, "tile")
    for p in (folder / "train/good").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="no normal training images in .*train/good"):
        load_mvtec("tile", folder)
    with pytest.raises(DataError, match="folder not found: .*nowhere"):
        load_mvtec("x", tmp_path / "nowhere")
    empty = make_product(tmp_path, "other")
    for p in (empty / "test/good").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="empty test folder .*test/good"):
        load_mvtec("other", empty)


def test_btad_ok_folder_is_normal(tmp_path):
    folder = make_product(tmp_path, "btad")
    (folder / "train/good").rename(folder / "train/ok")
    assert len(load_mvtec("btad", folder).train) == 12
    Image.new("RGB", (4, 4)).save(folder / "train/ok/extra.png")
    assert len(load_mvtec("btad", folder).train) == 13


def test_elpv_split_leaves_out_ambiguous_cells():
    mono = load_elpv("mono", "mono", test_fraction=0.2, seed=0)
    # 588 defect-free mono cells: 118 held out; 313 defective cells; the 173 ambiguous ones are not used.
    assert len(mono.train) == 470
    assert sum(s.label == 0 for s in mono.test) == 118 and sum(s.label == 1 for s in mono.test) == 313
    assert not {s.path for s in mono.train} & {s.path for s in mono.test}
    assert load_elpv("mono", "mono", 0.2, 0).train == mono.train  # seeded
    with pytest.raises(DataError, match="'mono' or 'poly'"):
        load_elpv("x", "tri", 0.2, 0)
