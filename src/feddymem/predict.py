"""``feddymem predict``: score new images with a trained client (or the global model) from a checkpoint.

Writes ``predictions.csv`` (path, score, label against the stored threshold) and one heatmap overlay PNG
per image into the output folder. Unreadable images are reported and skipped; the rest are scored.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader

from feddymem.data.datasets import ImageDataset, read_image
from feddymem.data.products import IMAGE_SUFFIXES, Sample
from feddymem.errors import DataError, FedDyMemError, OutputError
from feddymem.io import atomic_write_bytes, atomic_write_text, claim_output_dir
from feddymem.logging.console import Reporter
from feddymem.logging.experiment import heatmap_panel
from feddymem.trained import load_trained


def collect_images(inputs: list[str]) -> list[Path]:
    """Files as given, and every image under the given folders (recursively), in a stable order."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.exists():
            found.append(path)
        else:
            raise FedDyMemError(f"no such image or folder: {path}")
    return found


def claim_predictions_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """The output folder, created and proven writable. A folder that already holds files is refused (old
    heatmaps would mix with new ones) unless ``overwrite``, which removes the previous predictions.csv and
    heatmaps/ only; other files stay."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise OutputError(
                f"predict --out folder {out_dir} already holds files; choose a new folder, or pass --overwrite "
                "to replace its predictions.csv and heatmaps/"
            )
        try:
            (out_dir / "predictions.csv").unlink(missing_ok=True)
            if (out_dir / "heatmaps").is_dir():
                shutil.rmtree(out_dir / "heatmaps")
        except OSError as err:
            raise OutputError(f"cannot replace the predictions in {out_dir}: {err.strerror or err}") from None
    claim_output_dir(out_dir, "predict --out folder")
    claim_output_dir(out_dir / "heatmaps", "predict --out folder")
    return out_dir


def product_window(cfg: DictConfig) -> tuple[float, float] | None:
    """The window of the checkpoint's products for 16-bit / float images, when they all share one."""
    windows = {(float(p.window[0]), float(p.window[1])) if p.window else None for p in cfg.data.products}
    return windows.pop() if len(windows) == 1 else None


def _decodable(
    images: list[Path], window: tuple[float, float] | None, reporter: Reporter
) -> tuple[list[Path], list[str]]:
    """The images that decode, and the paths of those that do not (each said as a warning)."""
    paths, skipped = [], []
    for path in images:
        try:
            read_image(str(path), window)
            paths.append(path)
        except DataError as err:
            skipped.append(str(path))
            reporter.warn(f"skipped: {err}")
    return paths, skipped


def predict(
    checkpoint: str | Path,
    inputs: list[str],
    out_dir: str | Path,
    client_id: int | None = 0,
    batch_size: int = 16,
    reporter: Reporter | None = None,
    overwrite: bool = False,
    window: tuple[float, float] | None = None,
) -> dict[str, int]:
    """Score ``inputs`` (files and folders); write predictions.csv and heatmaps/ under ``out_dir``.

    Raises :class:`DataError` when no input image could be scored."""
    reporter = reporter or Reporter()
    if batch_size < 1:
        raise FedDyMemError(f"--batch-size must be at least 1, got {batch_size}")
    images = collect_images(inputs)
    if not images:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(inputs)}")
    trained = load_trained(checkpoint, client_id)
    model, cfg, threshold = trained.model, trained.config, trained.threshold
    window = window or product_window(cfg)
    paths, skipped = _decodable(images, window, reporter)
    if not paths:
        raise DataError(f"none of the {len(images)} input image(s) could be decoded; nothing was scored")
    # Only now, with a model and images that decode, are earlier predictions replaced (--overwrite).
    out_dir = claim_predictions_dir(out_dir, overwrite)
    extractor = model.feature_extractor
    dataset = ImageDataset(
        [Sample(str(p), 0, "predict", window=window) for p in paths],
        cfg.data.image_size,
        cfg.data.crop_size,
        extractor.mean,
        extractor.std,
    )
    rows = [("path", "score", "label", "heatmap")]
    with reporter.bars():
        advance = reporter.task("scoring images", len(dataset))
        for batch in DataLoader(dataset, batch_size=batch_size):
            with torch.no_grad():
                maps, scores = model(batch["image"])
            vmax = max(float(maps.max()), threshold if np.isfinite(threshold) else 0.0)
            for index, path, image, amap, score in zip(
                batch["index"].tolist(), batch["path"], batch["image"], maps, scores, strict=True
            ):
                label = "anomalous" if float(score) > threshold else "normal"
                # Numbered: images from different folders may share a name.
                name = f"{index:05d}_{Path(path).stem}.png"
                rows.append((path, f"{float(score):.6g}", label, f"heatmaps/{name}"))
                strip = heatmap_panel(image, amap, None, extractor.mean, extractor.std, vmax)
                width = image.shape[-1]  # keep input | overlay, drop the empty mask panel
                png = io.BytesIO()
                Image.fromarray(strip[:, : 2 * width + 4]).save(png, format="PNG")
                atomic_write_bytes(out_dir / "heatmaps" / name, png.getvalue())
            advance(len(scores))
    table = io.StringIO()
    csv.writer(table).writerows(rows)
    atomic_write_text(out_dir / "predictions.csv", table.getvalue())
    reporter.print(
        f"scored {len(rows) - 1} images, skipped {len(skipped)}; threshold {threshold:.4g}; "
        f"wrote {out_dir / 'predictions.csv'}"
    )
    return {"scored": len(rows) - 1, "skipped": len(skipped)}
