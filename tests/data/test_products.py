import numpy as np
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
    with pytest.raises(DataError, match="empty folder .*test/good"):
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


def _png(path, value=0, size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)


def test_bmad_layout_plain_and_with_img_label(tmp_path):
    plain = tmp_path / "plain"
    for rel in (
        "train/good/1.png",
        "train/good/2.png",
        "test/good/3.png",
        "test/Ungood/4.png",
        "valid/good/5.png",
        "valid/Ungood/6.png",
    ):
        _png(plain / rel)
    split = load_product({"name": "ct", "layout": "bmad", "root": str(plain)})
    assert len(split.train) == 2 and [s.label for s in split.test] == [0, 1] and len(split.valid) == 2
    assert not split.has_masks
    labelled = tmp_path / "brain"
    for rel in ("train/good/img/1.png", "test/good/img/2.png", "test/Ungood/img/3.png"):
        _png(labelled / rel)
    _png(labelled / "test/Ungood/label/3.png", 255)
    split = load_product({"name": "brain", "layout": "bmad", "root": str(labelled)})
    assert split.has_masks and split.test[1].mask.endswith("label/3.png")
    (labelled / "test/Ungood/label/3.png").unlink()
    _png(labelled / "test/Ungood/label/9.png", 255)
    with pytest.raises(DataError, match="mask missing for .*img/3.png"):
        load_product({"name": "brain", "layout": "bmad", "root": str(labelled)})


def test_visa_btad_and_autovi_mask_names(tmp_path):
    from feddymem.data.datasets import read_mask

    root = tmp_path / "visa"
    _png(root / "train/good/0.png")
    _png(root / "test/bad/1.JPG".lower())
    _png(root / "ground_truth/bad/1.png", 255)  # VisA/BTAD: mask named like the image
    assert load_mvtec("visa", root).test[0].mask.endswith("ground_truth/bad/1.png")
    autovi = tmp_path / "autovi"
    _png(autovi / "train/good/0.png")
    _png(autovi / "test/scratch/7.png")
    mask_a = np.zeros((16, 16), np.uint8)
    mask_a[:4] = 255
    Image.fromarray(mask_a).save(
        (autovi / "ground_truth/scratch/7").mkdir(parents=True) or autovi / "ground_truth/scratch/7/0000.png"
    )
    Image.fromarray(mask_a.T.copy()).save(autovi / "ground_truth/scratch/7/0001.png")
    sample = load_mvtec("autovi", autovi).test[0]
    union = np.asarray(read_mask(sample.mask)) > 0
    assert union[:4].all() and union[:, :4].all() and not union[8:, 8:].any()


def test_custom_layout(tmp_path):
    for rel in ("normal/a.png", "normal/b.png", "eval/ok/c.png", "eval/dent/d.png"):
        _png(tmp_path / rel)
    _png(tmp_path / "masks/dent/d-gt.png", 255)
    product = {
        "name": "c",
        "layout": "custom",
        "root": str(tmp_path),
        "train_dirs": ["normal"],
        "normal_dirs": ["eval/ok"],
        "anomalous_dirs": ["eval/dent"],
        "mask_dir": "masks/{defect}",
        "mask_pattern": "{stem}-gt.png",
    }
    split = load_product(product)
    assert len(split.train) == 2 and [s.label for s in split.test] == [0, 1]
    assert split.test[1].mask.endswith("masks/dent/d-gt.png") and split.test[1].defect == "dent"
    with pytest.raises(DataError, match="mask missing for .*d.png"):
        load_product({**product, "mask_pattern": "{stem}_mask.png"})


def test_missing_data_error_carries_download_hint(tmp_path):
    product = {"name": "brain", "layout": "bmad", "root": "Brain_AD", "download": "get it from BMAD"}
    with pytest.raises(DataError, match=r"product 'brain' folder not found: .*Brain_AD\. get it from BMAD"):
        load_product(product, data_root=str(tmp_path))
