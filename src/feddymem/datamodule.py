"""``FedDyMemDataModule``: the folder layouts (MVTec, BMAD, ELPV, custom) as a LightningDataModule, so that
:class:`~feddymem.lightning_model.FedDyMemModule` trains in anyone's ``lightning.Trainer``.

Validation uses normal images only, as a site has no defects to tune on: each product's held-out normal
training images (never trained on nor in the memory) and cut-paste anomalies made from them, the same
held-out criterion by which a federated client keeps its best round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from feddymem.data.datasets import ImageDataset, SyntheticAnomalyDataset
from feddymem.data.partition import ClientData, hold_out, partition_clients
from feddymem.data.products import load_product
from feddymem.models.backbone import input_normalisation


class FedDyMemDataModule(L.LightningDataModule):
    """Products (each a mapping as in a data set file: ``{name, layout, root, category, ...}``) pooled as one
    site: train on their normal training images, validate on the held-out ones and synthetic anomalies,
    test and predict on their test images. ``mean``/``std``: the backbone's input normalisation (default:
    the default backbone's; pass ``module.model.feature_extractor.mean`` and ``.std`` for another)."""

    def __init__(
        self,
        products: Sequence[Mapping[str, Any]],
        image_size: int = 224,
        crop_size: int = 224,
        batch_size: int = 4,
        eval_batch_size: int = 32,
        holdout_fraction: float = 0.1,
        synthetic_per_image: int = 2,
        test_fraction: float = 0.2,
        root: str = "",
        seed: int = 0,
        num_workers: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["mean", "std"])
        default_mean, default_std = input_normalisation(None, "imagenet-offline")  # type: ignore[arg-type]
        # Plain floats (a backbone's may be NumPy's): checkpoints hold these, and load with weights_only.
        self.mean = tuple(float(x) for x in (mean if mean is not None else default_mean))
        self.std = tuple(float(x) for x in (std if std is not None else default_std))
        self.hparams.update(mean=list(self.mean), std=list(self.std))
        self.site: ClientData | None = None

    @classmethod
    def from_config(cls, cfg: Any, **changes: Any) -> FedDyMemDataModule:
        """The data of a run's config (``cfg.data``: products, sizes, hold-out, seed) as one site."""
        d = cfg.data
        settings = {
            "products": [dict(p) for p in d.products],
            "image_size": d.image_size,
            "crop_size": d.crop_size,
            "batch_size": cfg.optim.batch_size,
            "eval_batch_size": cfg.optim.eval_batch_size,
            "holdout_fraction": d.holdout_fraction,
            "synthetic_per_image": cfg.selection.synthetic_per_image,
            "test_fraction": d.test_fraction,
            "root": d.root,
            "seed": d.seed,
            "num_workers": cfg.optim.num_workers,
        }
        return cls(**{**settings, **changes})

    def setup(self, stage: str | None = None) -> None:
        """List every product's images (no image is decoded here) and hold out normal ones, seeded."""
        if self.site is not None:
            return
        h: Any = self.hparams
        splits = [load_product(dict(p), h.test_fraction, h.seed, h.root) for p in h.products]
        (site,) = partition_clients(splits, 1, method="table", table=[[1.0] * len(splits)], seed=h.seed)
        hold_out([site], h.holdout_fraction, h.seed)
        self.site = site

    def _images(self, samples: Sequence[Any]) -> ImageDataset:
        h: Any = self.hparams
        return ImageDataset(samples, h.image_size, h.crop_size, self.mean, self.std)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self._settings.num_workers)

    @property
    def _settings(self) -> Any:
        return self.hparams

    def _site(self) -> ClientData:
        if self.site is None:
            self.setup()
        assert self.site is not None
        return self.site

    def train_dataloader(self) -> DataLoader:
        """The normal training images (shuffled): the memory and the metric loss."""
        return self._loader(self._images(self._site().train), self._settings.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Held-out normal images and cut-paste anomalies made from them."""
        h: Any = self.hparams
        holdout = self._site().holdout
        synthetic = SyntheticAnomalyDataset(
            holdout,
            h.synthetic_per_image,
            h.seed,
            image_size=h.image_size,
            crop_size=h.crop_size,
            mean=self.mean,
            std=self.std,
        )
        return self._loader(ConcatDataset([self._images(holdout), synthetic]), h.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """The test images (normal and anomalous, with masks where the layout has them)."""
        return self._loader(self._images(self._site().test), self._settings.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """The test images, for ``trainer.predict``."""
        return self.test_dataloader()
