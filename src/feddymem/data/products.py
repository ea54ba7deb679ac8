"""Read one product (one image set) from its folder layout into normal-train and test samples.

Layouts: ``mvtec`` (``train/good``, ``test/<defect>``, ``ground_truth/<defect>/<name>_mask.png``) and
``elpv`` (the ELPV solar cells shipped by the PyPI package ``elpv-dataset``, one module type each).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from feddymem.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
NORMAL_NAMES = {"good", "ok"}


@dataclass(frozen=True)
class Sample:
    """One image: where it is, whether it is anomalous, and its mask if it has one."""

    path: str
    label: int  # 0 normal, 1 anomalous
    product: str
    defect: str = "good"
    mask: str | None = None


@dataclass
class ProductSplit:
    name: str
    train: list[Sample] = field(default_factory=list)  # normal images only
    test: list[Sample] = field(default_factory=list)
    has_masks: bool = False


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{what} not found: {path}")


def load_mvtec(name: str, root: Path) -> ProductSplit:
    """MVTec AD style folder (also MPDD, VisA after its split, BTAD with ok/ko)."""
    _require_dir(root, f"product '{name}' folder")
    split = ProductSplit(name)
    train_dirs = [root / "train" / n for n in NORMAL_NAMES if (root / "train" / n).is_dir()]
    if not train_dirs:
        raise DataError(f"product '{name}': no normal training folder {root / 'train' / 'good'}")
    split.train = [Sample(str(p), 0, name) for d in train_dirs for p in list_images(d)]
    if not split.train:
        raise DataError(f"product '{name}': no normal training images in {train_dirs[0]}")
    test_root = root / "test"
    _require_dir(test_root, f"product '{name}' test folder")
    gt_root = root / "ground_truth"
    split.has_masks = gt_root.is_dir()
    for defect_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
        images = list_images(defect_dir)
        if not images:
            raise DataError(f"product '{name}': empty test folder {defect_dir}")
        normal = defect_dir.name in NORMAL_NAMES
        for image in images:
            mask = None
            if not normal and split.has_masks:
                mask_path = gt_root / defect_dir.name / f"{image.stem}_mask.png"
                if not mask_path.is_file():
                    raise DataError(f"product '{name}': mask missing for {image} (expected {mask_path})")
                mask = str(mask_path)
            split.test.append(Sample(str(image), 0 if normal else 1, name, defect_dir.name, mask))
        if not normal and split.has_masks:
            _check_orphan_masks(name, gt_root / defect_dir.name, {p.stem for p in images})
    if not split.test:
        raise DataError(f"product '{name}': no test images under {test_root}")
    return split


def _check_orphan_masks(name: str, mask_dir: Path, stems: set[str]) -> None:
    if not mask_dir.is_dir():
        return
    for mask in list_images(mask_dir):
        if mask.stem.removesuffix("_mask") not in stems:
            raise DataError(f"product '{name}': mask without an image: {mask}")


def load_elpv(name: str, category: str, test_fraction: float, seed: int) -> ProductSplit:
    """ELPV cells of one module type (``mono`` or ``poly``).

    Defect-free cells (probability 0) are split into train and a held-out ``test_fraction``; defective
    cells (probability 1) are test anomalies; the ambiguous cells (1/3, 2/3) are left out.
    """
    if category not in ("mono", "poly"):
        raise DataError(f"product '{name}': ELPV category must be 'mono' or 'poly', got '{category}'")
    try:
        import elpv_dataset
    except ImportError:
        raise DataError("the ELPV data set needs the package 'elpv-dataset': pip install elpv-dataset") from None
    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    if not labels.is_file():
        raise DataError(f"ELPV labels file missing: {labels}")
    normals, anomalies = [], []
    for line in labels.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[2] != category:
            continue
        path, prob = str(labels.parent / parts[0]), float(parts[1])
        if prob == 0.0:
            normals.append(path)
        elif prob == 1.0:
            anomalies.append(path)
    random.Random(seed).shuffle(normals)
    n_test = round(len(normals) * test_fraction)
    split = ProductSplit(name)
    split.train = [Sample(p, 0, name) for p in sorted(normals[n_test:])]
    split.test = [Sample(p, 0, name) for p in sorted(normals[:n_test])]
    split.test += [Sample(p, 1, name, "defective") for p in sorted(anomalies)]
    return split


def load_product(product, test_fraction: float = 0.2, seed: int = 0) -> ProductSplit:
    """Load a product from a config node or dict: ``name``, ``layout`` (mvtec), ``root``, ``category``."""
    name, layout = product["name"], product.get("layout", "mvtec")
    root, category = product.get("root", ""), product.get("category", "")
    if layout == "elpv":
        return load_elpv(name, category or name, test_fraction, seed)
    if layout == "mvtec":
        if not root:
            raise DataError(f"product '{name}': 'root' is empty; set it to the data set folder")
        folder = Path(root).expanduser()
        return load_mvtec(name, folder / category if category else folder)
    raise DataError(f"product '{name}': unknown layout '{layout}'")
