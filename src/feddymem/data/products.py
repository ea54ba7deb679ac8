"""Read one product (one image set) from its folder layout into normal-train and test samples.

Layouts:

* ``mvtec``: ``train/good``, ``test/<defect>``, ``ground_truth/<defect>/<name>_mask.png`` — MVTec AD,
  MPDD, VisA after its 1-class split (masks named like their image), BTAD (``ok``/``ko``), and AutoVI
  (``ground_truth/<defect>/<name>/0000.png``: a folder of masks, united).
* ``bmad``: ``train/good``, ``valid|test/{good,Ungood}``, with optional ``img``/``label`` sub-folders.
* ``elpv``: the ELPV solar cells shipped by the PyPI package ``elpv-dataset``, one module type each.
* ``custom``: folders and a mask name pattern given in the config.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from feddymem.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
NORMAL_NAMES = ("good", "ok")
LAYOUTS = ("mvtec", "bmad", "elpv", "custom")


@dataclass(frozen=True)
class Sample:
    """One image: where it is, whether it is anomalous, and its mask (a file, or a folder of masks)."""

    path: str
    label: int  # 0 normal, 1 anomalous
    product: str
    defect: str = "good"
    mask: str | None = None
    window: tuple[float, float] | None = None  # the product's window for 16-bit / float images


@dataclass
class ProductSplit:
    """One product's normal training images and labelled test images."""

    name: str
    train: list[Sample] = field(default_factory=list)  # normal images only
    test: list[Sample] = field(default_factory=list)
    valid: list[Sample] = field(default_factory=list)  # BMAD's validation split, when present
    has_masks: bool = False


def list_images(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted (no hidden files)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class _Missing(DataError):
    """A folder the layout needs is absent (the data is probably not downloaded)."""


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise _Missing(f"{what} not found: {path}")


def _images_in(name: str, folder: Path) -> list[Path]:
    images = list_images(folder)
    if not images:
        raise DataError(f"product '{name}': empty folder {folder}")
    return images


def find_mask(mask_dir: Path, stem: str) -> Path | None:
    """``<stem>_mask.*``, ``<stem>.*`` or an AutoVI folder ``<stem>/`` in ``mask_dir``."""
    if not mask_dir.is_dir():
        return None
    for candidate in (f"{stem}_mask", stem):
        for suffix in (".png", *sorted(IMAGE_SUFFIXES - {".png"})):
            if (mask_dir / f"{candidate}{suffix}").is_file():
                return mask_dir / f"{candidate}{suffix}"
    if (mask_dir / stem).is_dir():
        return mask_dir / stem
    return None


def _check_orphan_masks(name: str, mask_dir: Path, stems: set[str]) -> None:
    if not mask_dir.is_dir():
        return
    for mask in [*list_images(mask_dir), *(p for p in mask_dir.iterdir() if p.is_dir())]:
        stem = mask.stem if mask.is_file() else mask.name
        if stem not in stems and stem.removesuffix("_mask") not in stems:
            raise DataError(f"product '{name}': mask without an image: {mask}")


def load_mvtec(name: str, root: Path) -> ProductSplit:
    """MVTec AD style folder (MVTec AD, MPDD, VisA after its split, BTAD, AutoVI)."""
    _require_dir(root, f"product '{name}' folder")
    split = ProductSplit(name)
    train_dirs = [root / "train" / n for n in NORMAL_NAMES if (root / "train" / n).is_dir()]
    if not train_dirs:
        raise _Missing(f"product '{name}': no normal training folder {root / 'train' / 'good'}")
    split.train = [Sample(str(p), 0, name) for d in train_dirs for p in list_images(d)]
    if not split.train:
        raise DataError(f"product '{name}': no normal training images in {train_dirs[0]}")
    test_root = root / "test"
    _require_dir(test_root, f"product '{name}' test folder")
    gt_root = root / "ground_truth"
    split.has_masks = gt_root.is_dir()
    for defect_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
        images = _images_in(name, defect_dir)
        normal = defect_dir.name in NORMAL_NAMES
        for image in images:
            mask = None
            if not normal and split.has_masks:
                found = find_mask(gt_root / defect_dir.name, image.stem)
                if found is None:
                    raise DataError(
                        f"product '{name}': mask missing for {image} "
                        f"(expected {gt_root / defect_dir.name / (image.stem + '_mask.png')})"
                    )
                mask = str(found)
            split.test.append(Sample(str(image), 0 if normal else 1, name, defect_dir.name, mask))
        if not normal and split.has_masks:
            _check_orphan_masks(name, gt_root / defect_dir.name, {p.stem for p in images})
    if not split.test:
        raise DataError(f"product '{name}': no test images under {test_root}")
    return split


def _bmad_split(name: str, folder: Path, label: int) -> tuple[list[Sample], bool]:
    """``folder`` holds images directly, or ``img/`` with optional same-named masks in ``label/``."""
    img_dir = folder / "img" if (folder / "img").is_dir() else folder
    label_dir = folder / "label"
    samples, has_masks = [], False
    images = _images_in(name, img_dir)
    for image in images:
        mask = None
        if label == 1 and label_dir.is_dir():
            found = find_mask(label_dir, image.stem)
            if found is None:
                raise DataError(f"product '{name}': mask missing for {image} (expected {label_dir / image.name})")
            mask, has_masks = str(found), True
        samples.append(Sample(str(image), label, name, "good" if label == 0 else folder.name, mask))
    if label_dir.is_dir():
        _check_orphan_masks(name, label_dir, {p.stem for p in images})
    return samples, has_masks


def load_bmad(name: str, root: Path) -> ProductSplit:
    """BMAD medical layout: ``train/good``, ``valid`` (optional) and ``test`` with ``good``/``Ungood``."""
    _require_dir(root, f"product '{name}' folder")
    _require_dir(root / "train" / "good", f"product '{name}' normal training folder")
    split = ProductSplit(name)
    split.train, _ = _bmad_split(name, root / "train" / "good", 0)
    for part in ("valid", "test"):
        if part == "valid" and not (root / part).is_dir():
            continue
        _require_dir(root / part / "good", f"product '{name}' {part} normal folder")
        _require_dir(root / part / "Ungood", f"product '{name}' {part} anomalous folder")
        good, _ = _bmad_split(name, root / part / "good", 0)
        bad, masks = _bmad_split(name, root / part / "Ungood", 1)
        setattr(split, part, good + bad)
        split.has_masks |= masks and part == "test"
    return split


def load_custom(name: str, root: Path, product: Mapping[str, Any]) -> ProductSplit:
    """Folders (relative to ``root``) and a mask name pattern (``{stem}``, ``{name}``, ``{defect}``) from config."""
    _require_dir(root, f"product '{name}' folder")
    split = ProductSplit(name)
    train_dirs = list(product.get("train_dirs") or [])
    if not train_dirs:
        raise DataError(f"product '{name}': layout 'custom' needs 'train_dirs'")
    for d in train_dirs:
        _require_dir(root / d, f"product '{name}' training folder")
        split.train += [Sample(str(p), 0, name) for p in _images_in(name, root / d)]
    for d in product.get("normal_dirs") or []:
        _require_dir(root / d, f"product '{name}' normal test folder")
        split.test += [Sample(str(p), 0, name) for p in _images_in(name, root / d)]
    mask_dir, pattern = product.get("mask_dir") or "", product.get("mask_pattern") or "{stem}_mask.png"
    for d in product.get("anomalous_dirs") or []:
        _require_dir(root / d, f"product '{name}' anomalous test folder")
        defect = Path(d).name
        for image in _images_in(name, root / d):
            mask = None
            if mask_dir:
                path = (
                    root
                    / mask_dir.format(defect=defect)
                    / pattern.format(stem=image.stem, name=image.name, defect=defect)
                )
                if not path.exists():
                    raise DataError(f"product '{name}': mask missing for {image} (expected {path})")
                mask, split.has_masks = str(path), True
            split.test.append(Sample(str(image), 1, name, defect, mask))
    if not split.test:
        raise DataError(f"product '{name}': layout 'custom' gives no test images ('normal_dirs', 'anomalous_dirs')")
    return split


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


def product_root(product: Mapping[str, Any], data_root: str | Path = "") -> Path:
    """The product's folder: ``root`` (absolute, or relative to ``data_root``) / ``category``."""
    root = Path(str(product.get("root", ""))).expanduser()
    if not root.is_absolute() and data_root:
        root = Path(data_root).expanduser() / root
    category = product.get("category", "")
    return root / category if category else root


def load_product(
    product: Mapping[str, Any], test_fraction: float = 0.2, seed: int = 0, data_root: str = ""
) -> ProductSplit:
    """Load a product from a config node or dict: ``name``, ``layout``, ``root``, ``category`` (+ custom keys).

    A missing folder is a :class:`DataError` that carries the product's ``download`` hint. The product's
    ``window`` (for 16-bit and float images) is set on every sample.
    """
    split = _load_split(product, test_fraction, seed, data_root)
    window = tuple(float(v) for v in product.get("window", None) or ())
    if window:
        for part in ("train", "test", "valid"):
            setattr(split, part, [replace(s, window=window) for s in getattr(split, part)])
    return split


def _load_split(product: Mapping[str, Any], test_fraction: float, seed: int, data_root: str) -> ProductSplit:
    name, layout = product["name"], product.get("layout", "mvtec")
    if layout == "elpv":
        return load_elpv(name, product.get("category", "") or name, test_fraction, seed)
    if layout not in LAYOUTS:
        raise DataError(f"product '{name}': unknown layout '{layout}'; valid choices: {', '.join(LAYOUTS)}")
    if not product.get("root", ""):
        raise DataError(f"product '{name}': 'root' is empty; set it to the data set folder")
    root = product_root(product, data_root)
    try:
        if layout == "mvtec":
            return load_mvtec(name, root)
        if layout == "bmad":
            return load_bmad(name, root)
        return load_custom(name, root, product)
    except _Missing as err:
        hint = product.get("download", "")
        raise DataError(f"{err}. {hint}" if hint else str(err)) from None
