"""A synthetic MVTec-AD-style data set: textured products with pasted defects and their masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def texture(rng: np.random.Generator, size: int, angle: float, color: tuple[int, int, int]) -> np.ndarray:
    """Stripes at ``angle`` with a little noise: regular, like a machined or woven surface."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin((x * np.cos(angle) + y * np.sin(angle)) * 0.6 + phase)
    base = stripes[..., None] * np.array(color, np.float32)[None, None] + 40
    base += rng.normal(0, 6, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def paste_defect(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A filled ellipse of a foreign colour; returns the image and its binary mask (0/255)."""
    size = image.shape[0]
    cy, cx = rng.integers(size // 5, size - size // 5, 2)
    ry, rx = rng.integers(size // 12, size // 6, 2)
    y, x = np.mgrid[0:size, 0:size]
    mask = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
    out = image.copy()
    out[mask] = rng.choice([(250, 20, 20), (10, 10, 10), (20, 250, 250)])
    return out, (mask * 255).astype(np.uint8)


def make_product(
    root: Path,
    name: str,
    *,
    n_train: int = 12,
    n_good: int = 4,
    n_bad: int = 4,
    size: int = 96,
    angle: float = 0.0,
    color: tuple[int, int, int] = (180, 160, 120),
    seed: int = 0,
) -> Path:
    """Write ``root/name`` in the MVTec AD layout and return that folder."""
    rng = np.random.default_rng(seed)
    folder = root / name
    for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(texture(rng, size, angle, color)).save(folder / "train/good" / f"{i:03d}.png")
    for i in range(n_good):
        Image.fromarray(texture(rng, size, angle, color)).save(folder / "test/good" / f"{i:03d}.png")
    for i in range(n_bad):
        image, mask = paste_defect(rng, texture(rng, size, angle, color))
        Image.fromarray(image).save(folder / "test/spot" / f"{i:03d}.png")
        Image.fromarray(mask).save(folder / "ground_truth/spot" / f"{i:03d}_mask.png")
    return folder


def make_dataset(root: Path, products: int = 2, **kwargs) -> list[Path]:
    """Several products with different stripe angles and colours."""
    colours = [(180, 160, 120), (90, 140, 200), (120, 200, 90)]
    return [
        make_product(root, f"product{i}", angle=i * 0.9, color=colours[i % 3], seed=i, **kwargs)
        for i in range(products)
    ]


def dataset_yaml(root: Path, folders: list[Path], num_clients: int = 3, **extra) -> Path:
    """A dataset config for the synthetic products, written next to them."""
    lines = ["name: synthetic", "products:"]
    lines += [f"  - {{name: {f.name}, layout: mvtec, root: '{f}'}}" for f in folders]
    lines += [
        f"num_clients: {num_clients}",
        "dirichlet_alpha: 5.0",
        "min_train_per_client: 2",
        "image_size: 96",
        "crop_size: 96",
        "seed: 0",
    ]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path = root / "synthetic.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path
