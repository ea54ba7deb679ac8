"""The real PatchCore: anomalib's (from PyPI), measured beside our rows with our data plan and metric code.

It runs in its own environment (``make anomalib-env`` builds ``.venv-anomalib``: anomalib beside this
package, never in the main install); ``make bench`` calls it as a subprocess::

    .venv-anomalib/bin/python -m feddymem.benchmarks.anomalib_patchcore --out row.json dataset=elpv seed=0

The same as our rows: the data plan (products, partition, and the held-out normals removed from training),
the pre-processing (``data.image_size`` / ``crop_size``, the backbone's mean and std), the backbone with its
offline ImageNet weights (anomalib builds its ``TimmFeatureExtractor`` without weights; ours are loaded into
it after construction) and feature levels, and the metrics (:class:`~feddymem.metrics.AnomalyMetrics` per
client over its own test set and per product; the client-level image AUROC after the same per-product
normaliser, fitted on the client's held-out normals and a sample of its training images).
anomalib's own: everything else at its defaults (``Patchcore(coreset_sampling_ratio=0.1, num_neighbors=9)``:
3×3 feature pooling, the embedding, the k-center-greedy coreset over a random projection, nearest-neighbour
scores, the reweighted image score and the blurred anomaly map). Centralised: one model over every client's
training images.

anomalib's coreset loop touches every training patch once per item it keeps: about 1 s per item on 2 CPU
cores at ELPV's 850 k patches (85 k items: a day), minutes on a GPU. ``coreset_selection="batched"`` makes
the same selection on CPU in minutes: anomalib's own random projection and random first pick, then each next
pick the patch farthest from the picks so far, as anomalib's loop picks it, found in batches by our
:func:`~feddymem.memory.coreset.greedy_coreset` (squared distances by matrix products instead of one norm
per patch and pick, so the picks can part only where two distances tie to float rounding;
:func:`coreset_pair` checks them against anomalib's loop).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import seed_everything
from torch.utils.data import DataLoader

from feddymem.benchmarks.measure import PeakMemory
from feddymem.data.check import plan_data
from feddymem.data.datasets import ImageDataset
from feddymem.data.partition import per_product_sample
from feddymem.errors import ConfigError
from feddymem.memory.coreset import greedy_coreset
from feddymem.metrics import AnomalyMetrics, ScoreNormalizer, auroc_score
from feddymem.models.backbone import input_normalisation, load_imagenet_classifier

METHOD = "anomalib_patchcore"


CORESET_SELECTIONS = ("anomalib", "batched")


@dataclass(frozen=True)
class AnomalibSettings:
    """anomalib's PatchCore settings (its defaults), the batch size for feature extraction and scoring, and
    who runs its k-center loop: ``anomalib`` (its own) or ``batched`` (the same picks in batches; see the
    module's docstring)."""

    coreset_ratio: float = 0.1
    num_neighbors: int = 9
    batch_size: int = 32
    coreset_selection: str = "anomalib"

    def __post_init__(self) -> None:
        if self.coreset_selection not in CORESET_SELECTIONS:
            raise ConfigError(
                f"coreset_selection: {self.coreset_selection!r} is not one of {', '.join(CORESET_SELECTIONS)}"
            )

    def overrides(self) -> list[str]:
        """How the row names its settings in ``results.md`` (anomalib's argument names)."""
        names = [f"coreset_sampling_ratio={self.coreset_ratio}", f"num_neighbors={self.num_neighbors}"]
        return names + ([f"coreset_selection={self.coreset_selection}"] if self.coreset_selection != "anomalib" else [])


def batched_selection(sampler: Any) -> list[int]:
    """``KCenterGreedy.select_coreset_idxs`` of anomalib's ``sampler``, its greedy made in batches: its own
    projection and random first pick (the same random draws, in the same order), then :func:`greedy_coreset`
    on the projected patches."""
    sampler.model.fit(sampler.embedding)
    features = sampler.model.transform(sampler.embedding)
    first = torch.randint(high=sampler.n_observations, size=(1,), device=features.device).squeeze()
    projected = features.float().cpu()
    picks = greedy_coreset(projected, sampler.coreset_size, projection_dim=projected.shape[1], first=int(first))
    return picks.tolist()


@contextmanager
def coreset_selection(selection: str) -> Iterator[None]:
    """anomalib's k-center loop as ``selection`` says, for the duration of the block."""
    from anomalib.models.components.sampling import KCenterGreedy

    own = KCenterGreedy.select_coreset_idxs
    if selection == "batched":
        KCenterGreedy.select_coreset_idxs = batched_selection  # type: ignore[method-assign,unused-ignore]  # typed where anomalib is installed
    try:
        yield
    finally:
        KCenterGreedy.select_coreset_idxs = own  # type: ignore[method-assign,unused-ignore]  # typed where anomalib is installed


def coreset_pair(embedding: torch.Tensor, ratio: float, seed: int = 0) -> dict[str, list[int]]:
    """The picks of anomalib's k-center loop and of the batched one on the same ``embedding`` (N, D),
    each from the same random state: the check that ``batched`` selects what anomalib does."""
    from anomalib.models.components.sampling import KCenterGreedy

    picks: dict[str, list[int]] = {}
    for selection in CORESET_SELECTIONS:
        seed_everything(seed, verbose=False)  # its projection draws from numpy's global state too
        with coreset_selection(selection):
            picks[selection] = KCenterGreedy(embedding, ratio).select_coreset_idxs()
    return picks


def anomalib_layers(backbone: str, layers: list[int]) -> list[str]:
    """Our feature levels (timm ``out_indices``) as the module names anomalib selects layers by."""
    import timm

    with torch.device("meta"):
        info: Any = timm.create_model(backbone, pretrained=False, features_only=True).feature_info
    return [str(info.info[i]["module"]) for i in layers]


def build_patchcore(cfg: Any, settings: AnomalibSettings) -> tuple[Any, tuple[tuple[float, ...], ...]]:
    """anomalib's Lightning ``Patchcore`` on our backbone, feature levels and weights, and the (mean, std)
    its input is normalised with; inputs arrive pre-processed by our :class:`ImageDataset`, so anomalib's
    pre- and post-processing are off."""
    from anomalib.models import Patchcore

    b = cfg.model.backbone
    module = Patchcore(
        backbone=b.name,
        layers=anomalib_layers(b.name, list(b.layers)),
        pre_trained=False,  # no hub here: the weights are loaded below
        coreset_sampling_ratio=settings.coreset_ratio,
        num_neighbors=settings.num_neighbors,
        pre_processor=False,
        post_processor=False,
        evaluator=False,
        visualizer=False,
    )
    body = module.model.feature_extractor.feature_extractor  # timm features_only model
    wanted = body.state_dict()
    classifier = load_imagenet_classifier(b.name, b.weights)
    body.load_state_dict({k: v for k, v in classifier.state_dict().items() if k in wanted}, strict=True)
    return module.eval(), input_normalisation(classifier, b.weights)


def _loader(dataset: ImageDataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def embedding_difference(module: Any, cfg: Any, images: torch.Tensor) -> float:
    """The largest difference between anomalib's patch embeddings and our extractor's descriptors of the
    same images: ~0 when anomalib runs our backbone, weights, levels and pooling."""
    from feddymem.models.backbone import FeatureExtractor

    b = cfg.model.backbone
    ours = FeatureExtractor(b.name, list(b.layers), b.weights).to(images.device)(images)
    with torch.no_grad():
        features = module.model.feature_extractor(images)
        theirs = module.model.generate_embedding({k: module.model.feature_pooler(v) for k, v in features.items()})
    return float((ours - theirs).abs().max())


def fit(module: Any, dataset: ImageDataset, batch_size: int, selection: str = "anomalib") -> dict[str, float]:
    """anomalib's training: collect every training patch's embedding, then its coreset (``Patchcore.fit``;
    its k-center loop as ``selection`` says)."""
    start = time.perf_counter()
    module.model.train()
    with torch.no_grad():
        for batch in _loader(dataset, batch_size):
            module.model(batch["image"].to(module.device))
    embedded = time.perf_counter()
    with coreset_selection(selection):
        module.fit()
    module.model.eval()
    done = time.perf_counter()
    return {"embed_s": embedded - start, "coreset_s": done - embedded, "fit_s": done - start}


@dataclass
class ScoredImages:
    """Images scored by a model: scores (N,), maps and masks (N, H, W), labels, known masks, products."""

    scores: torch.Tensor
    maps: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    has_mask: torch.Tensor
    products: list[str]

    def select(self, keep: list[int]) -> ScoredImages:
        """The images at positions ``keep``."""
        i = torch.as_tensor(keep, dtype=torch.long)
        products = [self.products[k] for k in keep]
        return ScoredImages(self.scores[i], self.maps[i], self.labels[i], self.masks[i], self.has_mask[i], products)

    def product(self, name: str) -> ScoredImages:
        """The images of product ``name``."""
        return self.select([i for i, p in enumerate(self.products) if p == name])


def score(module: Any, dataset: ImageDataset, batch_size: int) -> ScoredImages:
    """anomalib's image scores and anomaly maps of ``dataset``, with its labels, masks and products."""
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for batch in _loader(dataset, batch_size):
            out = module.model(batch["image"].to(module.device))
            n = len(batch["label"])
            maps = out.anomaly_map.reshape(n, *batch["image"].shape[-2:]).float().cpu()
            labels, known = torch.as_tensor(batch["label"]), torch.as_tensor(batch["has_mask"])
            parts.append((out.pred_score.flatten().float().cpu(), maps, labels, batch["mask"], known))
    scores, maps, labels, masks, known = (torch.cat(column) for column in zip(*parts, strict=True))
    return ScoredImages(scores, maps, labels, masks, known, [s.product for s in dataset.samples])


def client_metrics(test: ScoredImages, normal: ScoredImages) -> dict[str, Any]:
    """One client's metrics from its scored test set and its scored normal images (held-out + sample)."""
    products: dict[str, dict[str, float]] = {}
    for product in dict.fromkeys(test.products):
        part = test.product(product)
        metrics = AnomalyMetrics()
        metrics.update(part.scores, part.maps, part.labels, part.masks, part.has_mask)
        products[product] = metrics.compute()
    normalizer = ScoreNormalizer.fit(normal.scores.double().numpy(), normal.products)
    normalised = normalizer(test.scores.double().numpy(), test.products)
    out: dict[str, Any] = {
        "image_auroc": auroc_score(normalised, test.labels.numpy()),
        "image_auroc_raw": auroc_score(test.scores.numpy(), test.labels.numpy()),
        "products": products,
    }
    for key in ("pixel_auroc", "aupro"):
        values = [m[key] for m in products.values() if key in m]
        if values:
            out[key] = float(np.mean(values))
    return out


def run(overrides: list[str], settings: AnomalibSettings) -> dict[str, Any]:
    """Fit anomalib's PatchCore on the pooled training images of the data plan of ``overrides`` (our
    config keys) and measure it per client; the row in the suite's format."""
    from anomalib import __version__ as anomalib_version

    from feddymem.config import load_config

    cfg = load_config(overrides)
    # Its projection draws from numpy's global state too (scikit-learn's sample_without_replacement), so
    # torch's seed alone left the row a new draw each run (head CT, seed 0: 0.857 and 0.876).
    seed_everything(cfg.seed, verbose=False)
    plan = plan_data(cfg)
    d = cfg.data
    module, (mean, std) = build_patchcore(cfg, settings)
    # On a GPU where there is one: anomalib's coreset selection touches every training patch once per item it
    # keeps (about 1 s per item at ELPV's 850k patches on 2 CPU cores, so a day on CPU; minutes on a GPU).
    module = module.to("cuda" if torch.cuda.is_available() else "cpu")

    def dataset(samples) -> ImageDataset:
        return ImageDataset(samples, d.image_size, d.crop_size, mean, std)

    train = [s for c in plan.clients for s in c.train]  # held-out normals are not in c.train
    first = next(iter(_loader(dataset(train), 4)))["image"]
    same_embedding = embedding_difference(module, cfg, first.to(module.device))
    start = time.perf_counter()
    with PeakMemory() as peak:
        timings = fit(module, dataset(train), settings.batch_size, settings.coreset_selection)
        memory_items = int(module.model.memory_bank.shape[0])
        tests = {s.path: s for c in plan.clients for s in c.test}  # a product's images are scored once
        scored = score(module, dataset(list(tests.values())), settings.batch_size)
        position = {path: i for i, path in enumerate(tests)}
        clients: dict[str, dict[str, Any]] = {}
        for c in plan.clients:
            sample = per_product_sample(c.train, cfg.model.scoring.normalize_images, cfg.seed + c.client_id)
            normal = score(module, dataset(c.holdout + [c.train[i] for i in sample]), settings.batch_size)
            clients[str(c.client_id)] = client_metrics(scored.select([position[s.path] for s in c.test]), normal)
    wall = time.perf_counter() - start
    measured = {
        "scoring_memory_items": memory_items,
        "train_images": len(train),
        "embedding_max_abs_diff": same_embedding,
        "round0_s": wall,
        "time_per_round_s": wall,
        "wall_s": wall,
        **timings,
        "peak_rss_mb": peak.rss_mb,
        "peak_rss_resettable": peak.resettable,
        "peak_cuda_mb": peak.cuda_mb,
        "anomalib_version": anomalib_version,
        "device": str(module.device),
        "coreset_selection": settings.coreset_selection,
    }
    return suite_row(cfg.dataset, settings, clients, measured)


def suite_row(
    dataset: str, settings: AnomalibSettings, clients: dict[str, dict[str, Any]], measured: dict[str, Any]
) -> dict[str, Any]:
    """The row in the suite's format from each client's metrics and what was measured: one centralised
    fit, nothing uploaded, no rounds."""
    per_product: dict[str, list[float]] = {}
    for metrics in clients.values():
        for product, values in metrics["products"].items():
            if values["image_auroc"] == values["image_auroc"]:
                per_product.setdefault(product, []).append(values["image_auroc"])

    def mean_of(key: str) -> float | None:
        values = [c[key] for c in clients.values() if key in c]
        return float(np.mean(values)) if values else None

    return {
        "dataset": dataset,
        "method": METHOD,
        "overrides": settings.overrides(),
        "mean_image_auroc": mean_of("image_auroc"),
        "pixel_auroc": mean_of("pixel_auroc"),
        "aupro": mean_of("aupro"),
        "clients": {cid: {k: v for k, v in c.items() if k != "products"} for cid, c in clients.items()},
        "client_products": {cid: c["products"] for cid, c in clients.items()},
        "product_image_auroc": {p: float(np.mean(v)) for p, v in per_product.items()},
        "auroc_per_round": [mean_of("image_auroc")],
        "criterion_per_round": [],
        "kept_rounds": {},
        "bytes_up_per_client_round": 0.0,
        "bytes_down_per_client_round": 0.0,
        "unreduced_bytes_per_client": None,
        "upload_items_per_client": None,
        "rounds": 0,
        **measured,
    }


def aupro_pair(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> dict[str, float]:
    """Our AUPRO and anomalib's on the same maps and masks (N, H, W): the cross-check of our metric."""
    from anomalib.metrics.aupro import _AUPRO

    from feddymem.metrics import aupro_score

    theirs = _AUPRO(fpr_limit=fpr_limit)
    theirs.update(torch.from_numpy(maps).float(), torch.from_numpy(masks > 0).int())
    return {"ours": aupro_score(maps, masks, fpr_limit), "anomalib": float(theirs.compute())}


def _worker(python: str, args: list[str], out: Path) -> dict[str, Any]:
    """Run this module's command line with ``python`` (the anomalib environment's interpreter); its JSON."""
    if not Path(python).is_file():
        raise ConfigError(f"anomalib's environment not found: {python} (make anomalib-env builds it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([python, "-m", __name__, "--out", str(out), *args], capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"anomalib worker failed (exit {done.returncode}):\n{tail}")
    return json.loads(out.read_text())


def run_in_environment(python: str, overrides: list[str], settings: AnomalibSettings, work_dir: Path) -> dict[str, Any]:
    """The row (:func:`run`), computed in the anomalib environment of ``python``."""
    args = [f"--coreset-ratio={settings.coreset_ratio}", f"--num-neighbors={settings.num_neighbors}"]
    args += [f"--batch-size={settings.batch_size}", f"--coreset-selection={settings.coreset_selection}", *overrides]
    return _worker(python, args, work_dir / f"{METHOD}.json")


def coreset_pair_in_environment(
    python: str, embedding: np.ndarray, ratio: float, work_dir: Path
) -> dict[str, list[int]]:
    """:func:`coreset_pair` of ``embedding`` (N, D), computed in the anomalib environment."""
    work_dir.mkdir(parents=True, exist_ok=True)
    arrays = work_dir / "coreset_embedding.npz"
    np.savez(arrays, embedding=embedding.astype(np.float32))
    return _worker(python, ["--coreset-pair", str(arrays), f"--coreset-ratio={ratio}"], work_dir / "coreset_pair.json")


def aupro_in_environment(python: str, maps: np.ndarray, masks: np.ndarray, work_dir: Path) -> dict[str, float]:
    """:func:`aupro_pair` of ``maps`` and ``masks`` (N, H, W), computed in the anomalib environment."""
    work_dir.mkdir(parents=True, exist_ok=True)
    arrays = work_dir / "aupro_maps.npz"
    np.savez(arrays, maps=maps.astype(np.float32), masks=masks.astype(np.uint8))
    return _worker(python, ["--aupro", str(arrays)], work_dir / "aupro.json")


def main(argv: list[str] | None = None) -> int:
    """Command line of the worker (in ``.venv-anomalib``): a bench row, or the AUPRO cross-check."""
    parser = argparse.ArgumentParser(prog="python -m feddymem.benchmarks.anomalib_patchcore", description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--coreset-ratio", type=float, default=AnomalibSettings.coreset_ratio)
    parser.add_argument("--num-neighbors", type=int, default=AnomalibSettings.num_neighbors)
    parser.add_argument("--batch-size", type=int, default=AnomalibSettings.batch_size)
    parser.add_argument("--coreset-selection", choices=CORESET_SELECTIONS, default=AnomalibSettings.coreset_selection)
    parser.add_argument("--aupro", type=Path, help="an .npz of maps and masks: cross-check AUPRO instead")
    parser.add_argument("--coreset-pair", type=Path, help="an .npz of an embedding: compare the two selections")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for feddymem train")
    args = parser.parse_args(argv)
    result: dict[str, Any]
    if args.aupro:
        arrays = np.load(args.aupro)
        result = aupro_pair(arrays["maps"], arrays["masks"])
    elif args.coreset_pair:
        embedding = torch.from_numpy(np.load(args.coreset_pair)["embedding"])
        result = coreset_pair(embedding, args.coreset_ratio)
    else:
        settings = AnomalibSettings(args.coreset_ratio, args.num_neighbors, args.batch_size, args.coreset_selection)
        result = run(args.overrides, settings)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
