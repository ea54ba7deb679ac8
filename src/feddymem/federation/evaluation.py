"""How a client is judged: normal-only statistics every round (thresholds, per-product normaliser, the
model-selection criterion) and the test set's metrics; W&B anomaly-map strips. Engine-neutral."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from feddymem.config import to_yaml
from feddymem.data.datasets import ImageDataset
from feddymem.data.partition import per_product_sample
from feddymem.federation.client import Client, Loaders
from feddymem.federation.messages import ClientEvaluation, TestSetMetrics
from feddymem.logging.experiment import heatmap_panel
from feddymem.metrics.auroc import auroc_score
from feddymem.metrics.normalize import ScoreNormalizer
from feddymem.metrics.threshold import NormalScores, normal_threshold


def scores_rank_nothing(scores: np.ndarray, memory: torch.Tensor) -> bool:
    """Whether ``scores`` cannot rank images: all equal up to float rounding, or all zero up to the float32
    rounding of a distance between embeddings as large as the ``memory`` items. A generator collapsed onto one
    point puts every patch on the memory; its distances are then rounding noise of about sqrt(eps)·|item|
    (the square root of a zero squared distance computed as |x|² + |m|² - 2x·m), which no relative tolerance
    on the scores themselves can tell from a ranking. Real scores lie far above 16× that (ELPV and synthetic
    textures: the smallest normal score is ~0.1 of the largest item's norm; the bound is 0.0055 of it)."""
    largest = float(np.abs(scores).max(initial=0.0))
    if np.ptp(scores) <= 1e-5 * max(largest, 1e-12):
        return True
    if memory.numel() == 0:
        return False
    radius = float(memory.detach().norm(dim=1).max())
    return largest <= 16.0 * float(np.sqrt(np.finfo(np.float32).eps)) * radius


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A digest of a client's trainable state (generator, radius, memory): equal states, equal scores."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class TestScores:
    """The test scores of the states a process scored last: clients in the same state (round 0, or frozen
    generators with one global memory) score a product once, whichever order their turns come in. Keyed by
    the scoring setting (config, device), the state's fingerprint, the product and its images; the entries of
    the :data:`KEPT_STATES` latest states are kept. One per process: a site worker's sites share it, as the
    clients of a Fabric process do."""

    KEPT_STATES = 8

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple] = {}  # (setting, state, product, images) → scores, labels, paths, metrics

    def get(self, key: tuple) -> tuple | None:
        """The entry of ``key``, if it is kept."""
        return self._entries.get(key)

    def put(self, key: tuple, entry: tuple) -> None:
        """Keep ``entry``; let go of the entries of states older than the latest :data:`KEPT_STATES`."""
        self._entries[key] = entry
        states = list(dict.fromkeys(k[:2] for k in reversed(self._entries)))[: self.KEPT_STATES]
        self._entries = {k: v for k, v in self._entries.items() if k[:2] in states}


class Evaluator:
    """Scores the clients of one process (``scores``: a cache shared with the process's other evaluators)."""

    def __init__(
        self, cfg: Any, loaders: Loaders, device: torch.device | str = "cpu", scores: TestScores | None = None
    ) -> None:
        self.cfg, self.loaders, self.device = cfg, loaders, device
        self.scores = scores if scores is not None else TestScores()
        # What besides the state decides a score: the whole config (backbone, input, scoring) and the device.
        self.setting = hashlib.blake2b(f"{to_yaml(cfg)}|{device}".encode(), digest_size=16).hexdigest()

    def image_scores(self, client: Client, dataset: ImageDataset) -> tuple[np.ndarray, list[str]]:
        """Raw image scores of ``dataset`` under the client's current model, and each image's product."""
        cached = self.loaders.cached(dataset, f"client {client.id} features")
        with torch.no_grad():
            scores = [
                client.module.score_batch(b, maps=False)[1].cpu() for b in self.loaders.loader(cached, shuffle=False)
            ]
        return torch.cat(scores).double().numpy(), [s.product for s in dataset.samples]

    def held_out(self, client: Client) -> tuple[ClientEvaluation, ScoreNormalizer]:
        """Normal images only: thresholds per product, the per-product normaliser and the criterion."""
        t0 = time.perf_counter()
        normal_scores, normal_products = self.image_scores(client, client.normal_set)
        normalizer = ScoreNormalizer()
        if self.cfg.model.scoring.normalize.value == "product":
            # Statistics of the held-out normals and of training images: the held-out ones alone are too few
            # to be stable; a sample of the training images (the same each round) is as stable as all of them.
            sample = per_product_sample(
                client.own_train_set.samples, self.cfg.model.scoring.normalize_images, self.cfg.seed + client.id
            )
            train_scores, train_products = self.image_scores(client, client.own_train_set.subset(sample))
            normalizer = ScoreNormalizer.fit(np.r_[normal_scores, train_scores], normal_products + train_products)
        q, k_sigma = self.cfg.threshold_percentile, (self.cfg.threshold_k_sigma or None)
        by_product = {p: normal_scores[np.asarray(normal_products) == p] for p in dict.fromkeys(normal_products)}
        evaluation = ClientEvaluation(
            client.id,
            criterion=self.criterion(client, normalizer, normal_scores, normal_products),
            normal=NormalScores.of(normal_scores, q, k_sigma),
            product_thresholds={p: normal_threshold(v, q, k_sigma) for p, v in by_product.items()},
            normalizer=normalizer.to_dict(),
            held_out_time_s=time.perf_counter() - t0,
        )
        return evaluation, normalizer

    def criterion(
        self, client: Client, normalizer: ScoreNormalizer, normal_raw: np.ndarray, normal_products: list[str]
    ) -> float:
        """Normal-only model-selection criterion: image AUROC of the held-out normal images against cut-paste
        anomalies made from them (NaN without held-out images; 0.5 when the scores rank nothing, as from a
        collapsed generator, whose order would otherwise be noise: :func:`scores_rank_nothing`)."""
        if client.synthetic_set is None:
            return float("nan")
        raw, products = self.image_scores(client, client.synthetic_set)
        if scores_rank_nothing(np.r_[normal_raw, raw], client.module.model.memory):
            return 0.5
        normal, synthetic = normalizer(normal_raw, normal_products), normalizer(raw, products)
        labels = np.r_[np.zeros(len(normal)), np.ones(len(synthetic))]
        return auroc_score(np.r_[normal, synthetic], labels)

    def test(self, client: Client, normalizer: ScoreNormalizer) -> TestSetMetrics:
        """The test set: image AUROC over the client's whole test set, and per product image AUROC, pixel
        AUROC and AUPRO.

        With ``model.scoring.normalize=product`` test scores are z-normalised per product by the client's
        normal images' scores (``normalizer``) before the client-level AUROC; per-product metrics do not
        change under it. The client's pixel AUROC and AUPRO are the means over its products that have masks.
        """
        t0 = time.perf_counter()
        test_set = self.loaders.cached(client.test_set, f"client {client.id} test features")
        module = client.module
        fingerprint = state_fingerprint(module.trainable_state())
        scores, labels, paths, products, per_product = [], [], [], [], {}
        for product in client.data.products:
            key = (
                self.setting,
                fingerprint,
                product,
                tuple(s.path for s in client.test_set.samples if s.product == product),
            )
            if (entry := self.scores.get(key)) is None:
                indices = [i for i, s in enumerate(client.test_set.samples) if s.product == product]
                p_scores, p_labels, p_paths = [], [], []
                with torch.no_grad():
                    for batch_idx, batch in enumerate(self.loaders.loader(Subset(test_set, indices), shuffle=False)):
                        p_scores.append(module.test_step(batch, batch_idx)["pred_score"].cpu())
                        p_labels.append(torch.as_tensor(batch["label"]))
                        p_paths += list(batch["path"])
                entry = (torch.cat(p_scores), torch.cat(p_labels), p_paths, module.compute_test_metrics())
                self.scores.put(key, entry)
            p_scores, p_labels, p_paths, per_product[product] = entry
            scores.append(p_scores)
            labels.append(p_labels)
            paths += p_paths
            products += [product] * len(p_paths)
        raw, labels_all = torch.cat(scores).double().numpy(), torch.cat(labels).numpy()
        scores_all = normalizer(raw, products)
        per_key = {k: [m[k] for m in per_product.values() if k in m] for k in ("pixel_auroc", "aupro")}
        return TestSetMetrics(
            image_auroc=auroc_score(scores_all, labels_all),
            products=per_product,
            eval_time_s=time.perf_counter() - t0,
            image_auroc_raw=auroc_score(raw, labels_all)
            if self.cfg.model.scoring.normalize.value == "product"
            else None,
            pixel_auroc=float(np.mean(per_key["pixel_auroc"])) if per_key["pixel_auroc"] else None,
            aupro=float(np.mean(per_key["aupro"])) if per_key["aupro"] else None,
            scores=[(p, int(y), float(v)) for p, y, v in zip(paths, labels_all, scores_all, strict=True)],
        )

    def panel(self, client: Client) -> list[tuple[str, np.ndarray]] | None:
        """(path, input | heatmap overlay | mask strip) for up to ``panel_images`` test images, for W&B."""
        if self.cfg.logger.value != "wandb" or self.cfg.panel_images <= 0:
            return None
        samples = client.test_set.samples
        picks = np.linspace(0, len(samples) - 1, min(self.cfg.panel_images, len(samples))).round().astype(int)
        items = [client.test_set[i] for i in dict.fromkeys(picks.tolist())]
        with torch.no_grad():
            maps, _ = client.module.model(torch.stack([it["image"] for it in items]).to(self.device))
        vmax = float(maps.max())
        mean, std = client.module.model.feature_extractor.mean, client.module.model.feature_extractor.std
        return [
            (it["path"], heatmap_panel(it["image"], m, it["mask"] if it["has_mask"] else None, mean, std, vmax))
            for it, m in zip(items, maps, strict=True)
        ]
