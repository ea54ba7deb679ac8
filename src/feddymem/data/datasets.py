"""Torch datasets over samples: decode, grayscale → RGB, resize, centre crop, normalise; masks binarised."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from feddymem.data.products import IMAGE_SUFFIXES, Sample
from feddymem.errors import DataError, every_problem

# Pillow modes whose values do not fit 0..255: 16-bit and 32-bit integer, 32-bit float greyscale.
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_8bit(img: Image.Image, window: tuple[float, float] | None = None, path: str = "") -> Image.Image:
    """A 16-bit or float greyscale image mapped onto 8 bits: ``window`` = (low, high) → 0..255 (clipped),
    or the image's own minimum..maximum without one (a constant image becomes black). 8-bit modes pass.

    Pillow's own ``convert`` clips such images at 255, which turns most 16-bit scans all white."""
    if img.mode not in WIDE_MODES:
        return img
    values = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        raise DataError(f"cannot decode image {path}: no finite pixel value (mode {img.mode})")
    low, high = window if window else (float(values[finite].min()), float(values[finite].max()))
    span = high - low
    scaled = np.clip((np.where(finite, values, low) - low) / span, 0.0, 1.0) if span > 0 else np.zeros_like(values)
    return Image.fromarray(np.round(scaled * 255).astype(np.uint8), "L")


def _decode(path: str, mode: str, what: str, window: tuple[float, float] | None = None) -> tuple[Image.Image, str]:
    """Open and fully decode a file in any common mode (8/16-bit, float, palette, alpha, CMYK) to ``mode``;
    returns it and the file's own mode. A missing or corrupt file is a :class:`DataError` naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_8bit(img, window, path).convert(mode), img.mode
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{what} {path} is a folder, not an image file") from None
    except PermissionError:
        raise DataError(f"cannot read {what} {path}: permission denied") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot decode {what} {path}: {err}") from None


def read_image(path: str, window: tuple[float, float] | None = None) -> Image.Image:
    """An 8-bit RGB image: greyscale files become 3-channel, wide ones are mapped by ``window`` (:func:`to_8bit`)."""
    return _decode(path, "RGB", "image", window)[0]


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes; of a folder (AutoVI masks), of its files' names and bytes in order."""
    folder = Path(path)
    digest = hashlib.sha256()
    if folder.is_dir():
        for part in sorted(folder.iterdir()):
            digest.update(f"{part.name}:{file_digest(str(part))}".encode())
        return digest.hexdigest()
    with folder.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_mask(path: str) -> Image.Image:
    """A binary-ish mask; a folder (AutoVI: one file per defect region) gives the union of its masks.
    Wide (16-bit) masks are scaled by their own range, so 0/1 and 0/65535 masks both work."""
    folder = Path(path)
    if folder.is_dir():
        parts = [read_mask(str(p)) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not parts:
            raise DataError(f"mask folder {path} holds no mask images")
        union = np.maximum.reduce([np.asarray(m) for m in parts])
        return Image.fromarray(union)
    return _decode(path, "L", "mask")[0]


class ImageDataset(Dataset):
    """Items are dicts: ``image`` (3, S, S) normalised, ``label``, ``mask`` (S, S) in {0, 1}, ``path``, ``index``."""

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int = 256,
        crop_size: int = 224,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        augment: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.image_size, self.crop_size, self.augment = image_size, crop_size, augment
        # Everything that decides an image's tensor besides its file: names the on-disk feature entries.
        self.preprocessing = ("pil-bilinear-resize", image_size, "center-crop", crop_size, tuple(mean), tuple(std))
        square = (image_size, image_size)
        # torchvision's transforms (on PIL images: PIL's own resampling, antialiased).
        self.image_transform = v2.Compose(
            [
                v2.Resize(square, interpolation=v2.InterpolationMode.BILINEAR),
                v2.CenterCrop(crop_size),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(mean), list(std)),
            ]
        )
        # Flips keep a normal texture normal; applied only to training images (augment=True).
        self.flips = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()])
        self.mask_transform = v2.Compose(
            [v2.Resize(square, interpolation=v2.InterpolationMode.NEAREST), v2.CenterCrop(crop_size), v2.PILToTensor()]
        )

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        """The same pre-processing over the samples at ``indices``."""
        subset = copy.copy(self)
        subset.samples = [self.samples[i] for i in indices]
        return subset

    @property
    def has_masks(self) -> bool:
        """Whether any image of the set has a ground-truth mask."""
        return any(s.mask for s in self.samples)

    def load_image(self, sample: Sample) -> torch.Tensor:
        """The sample's image: resized, centre-cropped, scaled to [0, 1] and normalised (3, S, S)."""
        return self.image_transform(read_image(sample.path, sample.window)).as_subclass(torch.Tensor)

    def item_identity(self, index: int) -> str:
        """What decides item ``index`` besides the code: the pre-processing, the product's window and the bytes
        of its image and mask files (names the item's entry in an on-disk feature store)."""
        sample = self.samples[index]
        mask = file_digest(sample.mask) if sample.mask else None
        return repr((self.preprocessing, sample.window, file_digest(sample.path), mask))

    def load_mask(self, sample: Sample) -> torch.Tensor:
        """The sample's mask, resized nearest-neighbour and binarised (> 127); zeros without one."""
        if sample.mask is None:
            return torch.zeros(self.crop_size, self.crop_size)
        return (self.mask_transform(read_mask(sample.mask))[0] > 127).float()

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = self.load_image(sample)
        if self.augment:
            image = self.flips(image)
        return {
            "image": image,
            "label": sample.label,
            "mask": self.load_mask(sample),
            "has_mask": sample.mask is not None,
            "path": sample.path,
            "product": sample.product,
            "index": index,
        }


def verify_samples(samples: Sequence[Sample], progress=None) -> list[str]:
    """Decode every image and mask once; masks must have their image's size. Raises one :class:`DataError`
    that lists every file that failed.

    Returns the wide (16-bit or float) images read without a product ``window``: each is scaled by its
    own range, which the caller should say."""
    seen: set[str] = set()
    wide: list[str] = []
    problems: list[str] = []
    for sample in samples:
        if sample.path in seen:
            continue
        seen.add(sample.path)
        try:
            img, file_mode = _decode(sample.path, "RGB", "image", sample.window)
            if sample.window is None and file_mode in WIDE_MODES:
                wide.append(sample.path)
            if sample.mask is not None:
                mask = read_mask(sample.mask)
                if mask.size != img.size:
                    raise DataError(
                        f"mask {sample.mask} is {mask.size[0]}×{mask.size[1]} but its image "
                        f"{sample.path} is {img.size[0]}×{img.size[1]}"
                    )
        except DataError as err:
            problems.append(str(err))
        if progress is not None:
            progress()
    if problems:
        raise every_problem(problems, f"{len(seen)} images")
    return wide


class SyntheticAnomalyDataset(ImageDataset):
    """Cut-paste anomalies made from normal images: needs no real defect, so a site can judge its model.

    Each normal image gives ``per_image`` items: a rectangle (0.5–5 % of the image, aspect 1:3–3:1) cut
    from another normal image of the same product (the image itself when it is alone) and blended in at a
    random place with opacity 0.4–0.9. They are meant to be hard: large, opaque pastes are found by
    every model (their AUROC saturates at 1) and could not tell a better round from a worse one. Items
    are deterministic (seeded by ``seed`` and index), labelled 1, and named ``<path>#cutpaste-<seed>-<j>``
    so the feature cache can hold them.
    """

    def __init__(self, samples: Sequence[Sample], per_image: int = 2, seed: int = 0, **kwargs) -> None:
        self.sources = list(samples)
        self.per_image, self.seed = per_image, seed
        synthetic = [
            Sample(f"{s.path}#cutpaste-{seed}-{j}", 1, s.product, "synthetic")
            for s in self.sources
            for j in range(per_image)
        ]
        super().__init__(synthetic, **kwargs)

    def item_identity(self, index: int) -> str:
        """As :meth:`ImageDataset.item_identity`: the seed, the index and every source image (donors too)."""
        if getattr(self, "_sources_digest", None) is None:
            digest = hashlib.sha256()
            for s in self.sources:
                digest.update(repr((s.product, s.window, file_digest(s.path))).encode())
            self._sources_digest = digest.hexdigest()
        return repr((self.preprocessing, "cutpaste", self.seed, self.per_image, index, self._sources_digest))

    def __getitem__(self, index: int) -> dict:
        source = self.sources[index // self.per_image]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        donors = [s for s in self.sources if s.product == source.product and s.path != source.path] or [source]
        donor = donors[int(torch.randint(len(donors), (1,), generator=g))]
        image = self.load_image(source)
        patch_from = self.load_image(donor)
        size = self.crop_size

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * float(torch.rand((), generator=g))

        area = uniform(0.005, 0.05) * size * size
        aspect = float(np.exp(uniform(np.log(1 / 3), np.log(3))))
        h = int(min(size - 1, max(2, round((area * aspect) ** 0.5))))
        w = int(min(size - 1, max(2, round((area / aspect) ** 0.5))))
        sy, sx, dy, dx = (int(torch.randint(size - d + 1, (1,), generator=g)) for d in (h, w, h, w))
        alpha = uniform(0.4, 0.9)
        target = image[:, dy : dy + h, dx : dx + w]
        image[:, dy : dy + h, dx : dx + w] = (1 - alpha) * target + alpha * patch_from[:, sy : sy + h, sx : sx + w]
        mask = torch.zeros(size, size)
        mask[dy : dy + h, dx : dx + w] = 1.0
        return {
            "image": image,
            "label": 1,
            "mask": mask,
            "has_mask": False,  # a made-up region: not a ground truth for pixel metrics
            "path": self.samples[index].path,
            "product": self.samples[index].product,
            "index": index,
        }
