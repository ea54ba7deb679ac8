"""What one client holds (its data sets, module, optimiser, kept state) and how it is built from the data
plan; loaders over its images or their cached backbone features. Nothing here knows an engine."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from feddymem.data.datasets import ImageDataset, SyntheticAnomalyDataset
from feddymem.data.feature_cache import CachedFeatureDataset, FeatureCache
from feddymem.data.feature_store import FeatureStore
from feddymem.data.partition import ClientData
from feddymem.federation.strategies import Strategy
from feddymem.lightning_model import FedDyMemModule
from feddymem.memory.reduce import MemoryBank

# (module, optimiser) → the same, prepared by an engine (Fabric moves them to its device).
SetupFn = Callable[[FedDyMemModule, torch.optim.Optimizer], tuple[Any, Any]]


@dataclass
class KeptState:
    """The state a client keeps: the round that is best by its held-out, normal-only criterion."""

    round: int
    criterion: float  # image AUROC of held-out normal images against cut-paste anomalies made from them
    model: dict[str, torch.Tensor]  # generator, radius and memory (FedDyMemModule.trainable_state)
    # ScoreNormalizer.state() fitted on this state's held-out scores, so that scoring the kept state at the
    # end need not score every normal image again; None (an older checkpoint, Flower): it is refitted.
    normalizer: dict[str, Any] | None = None


@dataclass
class Client:
    """Everything one client holds; nothing here is shared with other clients."""

    data: ClientData
    module: FedDyMemModule
    optimizer: torch.optim.Optimizer
    train_set: ImageDataset  # what the generator trains on (all clients' images under centralized)
    memory_set: ImageDataset  # what the memory is built from (likewise)
    test_set: ImageDataset
    # Held-out normal images (never in the memory or in training): thresholds, score normalisation and
    # the criterion; the client's own training images when data.holdout_fraction is 0.
    normal_set: ImageDataset
    own_train_set: ImageDataset  # the client's own training images (train_set is pooled under centralized)
    synthetic_set: SyntheticAnomalyDataset | None = None  # cut-paste anomalies of the held-out images
    anchor: dict[str, torch.Tensor] | None = None  # FedProx: the last global generator parameters
    kept: KeptState | None = None

    @property
    def id(self) -> int:
        """The client's id (its index in the partition)."""
        return self.data.client_id


class ClientSideAdapter:
    """A :class:`~feddymem.federation.strategies.ClientSide` over one client."""

    def __init__(self, client: Client, build_memory: Callable[[], MemoryBank]) -> None:
        self.client, self.build_memory = client, build_memory

    def generator_state(self) -> dict[str, torch.Tensor]:
        """The client's generator parameters."""
        return self.client.module.model.generator.state_dict()

    def load_generator(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the client's generator parameters."""
        self.client.module.model.generator.load_state_dict(state)

    def set_memory(self, items: torch.Tensor) -> None:
        """Make ``items`` the client's memory (loss target and scoring reference)."""
        self.client.module.set_global_memory(items)


def build_clients(
    cfg: Any,
    partition: Sequence[ClientData] | Mapping[int, ClientData],
    client_ids: list[int],
    strategy: Strategy,
    setup: SetupFn | None = None,
) -> list[Client]:
    """The clients ``client_ids`` of ``partition`` (by client id: a list, or a mapping for a site that holds
    only its own share): one module each (one shared by all when the strategy
    pools data, over every client's training images), all sharing one frozen backbone, seeded by
    (seed, client id), with the strategy's module settings."""
    d, pooled = cfg.data, strategy.pooled
    parts = list(partition.values()) if isinstance(partition, Mapping) else list(partition)
    every_train = [s for part in parts for s in part.train]
    clients: list[Client] = []
    for client_id in client_ids:
        part = partition[client_id]
        if not (pooled and clients):  # pooled: one model shared by every client
            torch.manual_seed(cfg.seed + client_id)
            # One frozen backbone per process, shared by its clients (it never trains).
            shared = clients[0].module.model.feature_extractor if clients else None
            model, memory = strategy.model_settings(), strategy.memory_settings()
            module = FedDyMemModule.from_config(cfg, client_id, shared, model=model, memory=memory)
            optimizer = module.configure_optimizers()
            if setup is not None:
                module, optimizer = setup(module, optimizer)
        mean, std = module.model.feature_extractor.mean, module.model.feature_extractor.std

        def dataset(samples, augment=False, mean=mean, std=std):
            return ImageDataset(samples, d.image_size, d.crop_size, mean, std, augment=augment)

        own = dataset(part.train)
        per_image = cfg.selection.synthetic_per_image
        synthetic = None
        if part.holdout and per_image > 0:
            synthetic = SyntheticAnomalyDataset(
                part.holdout,
                per_image,
                cfg.seed + client_id,
                image_size=d.image_size,
                crop_size=d.crop_size,
                mean=mean,
                std=std,
            )
        clients.append(
            Client(
                part,
                module,
                optimizer,
                train_set=dataset(every_train if pooled else part.train, augment=d.augment),
                memory_set=dataset(every_train) if pooled else own,
                test_set=dataset(part.test),
                normal_set=dataset(part.holdout) if part.holdout else own,
                own_train_set=own,
                synthetic_set=synthetic,
            )
        )
    return clients


def make_feature_cache(
    cfg: Any,
    clients: Sequence[Client],
    device: torch.device,
    *,
    folder: str | None = None,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
) -> FeatureCache:
    """The backbone-feature cache of one process's clients, as ``cache.*`` and ``optim.*`` say; on disk too
    when ``folder`` (default ``cache.dir``) is set. A process without clients gets one that extracts nothing."""
    folder = cfg.cache.dir if folder is None else folder
    extractor = clients[0].module.model if clients else None
    disk = FeatureStore(folder, extractor.feature_extractor) if folder and extractor is not None else None
    return FeatureCache(
        extractor.extract if extractor is not None else None,
        max_bytes=int(cfg.cache.max_gb * 2**30),
        fp16_above_bytes=int(cfg.cache.fp16_above_gb * 2**30),
        batch_size=cfg.optim.eval_batch_size,
        device=device,
        num_workers=cfg.optim.num_workers,
        progress=progress,
        disk=disk,
    )


class Loaders:
    """Data loaders over a client's images, or over their backbone features from the cache
    (``cache.enabled``); batch sizes and workers from ``cfg.optim``."""

    def __init__(self, cfg: Any, cache: FeatureCache) -> None:
        self.cfg, self.cache = cfg, cache

    def cached(self, dataset: ImageDataset, description: str) -> Dataset:
        """``dataset``'s backbone features from the cache, or the images themselves when it is off."""
        return self.cache.wrap(dataset, description) if self.cfg.cache.enabled else dataset

    def loader(self, dataset: Dataset, *, shuffle: bool, seed: int = 0, train: bool = False) -> DataLoader:
        """Batches of ``dataset``; shuffled with a generator seeded by ``seed`` (same batches on resume)."""
        o = self.cfg.optim
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        # Cached features need no worker processes: workers would only copy tensors around, and the cache's
        # hit counts would stay in the workers.
        workers = 0 if isinstance(dataset, CachedFeatureDataset) else o.num_workers
        return DataLoader(
            dataset,
            batch_size=o.batch_size if train else o.eval_batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=workers,
        )
