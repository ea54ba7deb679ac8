"""Backbone-feature cache: the extractor is frozen, so each image is decoded and embedded once.

The cache is keyed by image path and pre-processing, shared by every client of a process (a test set
held by several clients is stored once), bounded in bytes, and switches to fp16 once it grows past a
threshold. A data set that does not fit in what is left is not cached (its loader decodes as usual).
With a :class:`~feddymem.data.feature_store.FeatureStore` it also reads and writes features on disk, so
another process (a Flower site's next message) or a later run embeds nothing twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from feddymem.data.datasets import ImageDataset
from feddymem.data.feature_store import FeatureStore

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    """What the cache did: images extracted, hits, seconds spent and saved."""

    extracted: int = 0  # images decoded and embedded
    extraction_seconds: float = 0.0
    hits: int = 0  # items served from the cache
    bypassed: int = 0  # data sets that did not fit
    from_disk: int = 0  # images read from the on-disk store instead of extracted
    disk_seconds: float = 0.0  # spent hashing image files and reading entries

    @property
    def seconds_per_image(self) -> float:
        """Mean extraction time per image (0 before any extraction)."""
        return self.extraction_seconds / self.extracted if self.extracted else 0.0

    @property
    def saved_seconds(self) -> float:
        """Decode + extraction time the reads after the first would have cost without the cache."""
        return max(0, self.hits - self.extracted) * self.seconds_per_image


class CachedFeatureDataset(Dataset):
    """Same items as the wrapped :class:`ImageDataset`, with ``features`` instead of ``image``."""

    def __init__(self, cache: FeatureCache, dataset: ImageDataset) -> None:
        self.cache, self.dataset = cache, dataset
        self.keys = [cache.key(dataset, s.path) for s in dataset.samples]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        features, mask = self.cache.store[self.keys[index]]
        sample = self.dataset.samples[index]
        self.cache.stats.hits += 1
        if mask is None:
            mask = torch.zeros(self.dataset.crop_size, self.dataset.crop_size)
        return {
            "features": features.float(),
            "label": sample.label,
            "mask": mask.float(),
            "has_mask": sample.mask is not None,
            "path": sample.path,
            "product": sample.product,
            "index": index,
        }


class FeatureCache:
    """Computes ``extract(images)`` once per image and serves it to every later epoch and round."""

    def __init__(
        self,
        extract: Callable[[torch.Tensor], torch.Tensor] | None,
        *,
        max_bytes: int = 6 << 30,
        fp16_above_bytes: int = 1 << 30,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        progress: Callable[[str, int], Callable[[int], None]] | None = None,
        disk: FeatureStore | None = None,
    ) -> None:
        """``disk``: features on disk, read instead of extracted and written after extraction (across
        processes and runs); by default the cache lives in this process only."""
        self.extract, self.max_bytes, self.fp16_above_bytes = extract, max_bytes, fp16_above_bytes
        self.batch_size, self.device, self.num_workers = batch_size, torch.device(device), num_workers
        self.progress, self.disk = progress, disk
        self.store: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.nbytes = 0
        self.fp16 = False
        self.stats = CacheStats()

    @staticmethod
    def key(dataset: ImageDataset, path: str) -> tuple:
        """The cache key of ``path`` under ``dataset``'s pre-processing."""
        return (path, dataset.image_size, dataset.crop_size)

    def _extract_batch(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.extract is None:  # a process that hosts no client extracts nothing
                raise RuntimeError("this feature cache has no extractor")
            return self.extract(images.to(self.device)).cpu()

    def wrap(self, dataset: ImageDataset, description: str = "features") -> Dataset:
        """Fill the cache for ``dataset`` and return a dataset that reads from it.

        Augmented data sets are returned as they are: their images change every epoch.
        """
        if dataset.augment:
            return dataset
        missing = [i for i, s in enumerate(dataset.samples) if self.key(dataset, s.path) not in self.store]
        if missing and not self._fill(dataset, missing, description):
            return dataset
        return CachedFeatureDataset(self, dataset)

    def _fill(self, dataset: ImageDataset, indices: list[int], description: str) -> bool:
        """Read what the on-disk store has, extract the rest (and write it there); ``False`` when the data set
        does not fit in memory (its entries are then dropped again)."""
        added: list[tuple] = []
        remaining = len(indices)
        start = time.perf_counter()
        disk_keys = {i: self.disk.key(dataset, i) for i in indices} if self.disk else {}
        stored, missing = self._read_store(indices, disk_keys)
        self.stats.disk_seconds += time.perf_counter() - start if self.disk else 0.0
        if stored:
            if not self._admit(dataset, stored, remaining, added, description):
                return False
            remaining -= len(stored)
        if not missing:
            return True
        advance = self.progress(description, len(missing)) if self.progress else None
        chunks = (
            self._extracted(dataset, missing, disk_keys)
            if self.disk is None
            else self._shared(dataset, missing, disk_keys)
        )
        try:
            for items in chunks:
                if not self._admit(dataset, items, remaining, added, description):
                    return False
                remaining -= len(items)
                if advance:
                    advance(len(items))
        finally:
            if self.disk is not None:
                self.disk.flush()  # every entry on disk (or its write error raised) before the data set is used
        return True

    def _extracted(self, dataset: ImageDataset, indices: list[int], disk_keys: dict[int, str]) -> Iterator[list[tuple]]:
        """``(index, features, mask)`` of ``indices``, extracted batch by batch (and written to the store)."""
        loader = DataLoader(
            torch.utils.data.Subset(dataset, indices), batch_size=self.batch_size, num_workers=self.num_workers
        )
        for batch in loader:
            start = time.perf_counter()
            features = self._extract_batch(batch["image"])
            items = []
            for j, index in enumerate(batch["index"].tolist()):  # the wrapped dataset reports its own index
                mask = batch["mask"][j].to(torch.bool) if dataset.samples[index].mask else None
                items.append((index, features[j], mask))
                if self.disk is not None:
                    self.disk.save(disk_keys[index], features[j], mask)
            self.stats.extraction_seconds += time.perf_counter() - start
            self.stats.extracted += len(items)
            yield items

    def _shared(self, dataset: ImageDataset, pending: list[int], disk_keys: dict[int, str]) -> Iterator[list[tuple]]:
        """``(index, features, mask)`` of ``pending``: a batch at a time extracted of what no other process has
        claimed, and what the others wrote read back."""
        assert self.disk is not None
        broken: set[int] = set()  # entries on disk that cannot be read: extracted again here
        while pending:
            mine: list[int] = []
            waiting: list[int] = []
            for index in pending:
                key = disk_keys[index]
                if len(mine) < self.batch_size and self.disk.claim(key):
                    if index in broken or not self.disk.has(key):
                        mine.append(index)
                        continue
                    self.disk.release(key)  # written by another process since we looked
                waiting.append(index)
            items: list[tuple] = []
            try:  # each claim is released once its entry is written (FeatureStore.save)
                for batch in self._extracted(dataset, mine, disk_keys):
                    items += batch
            except BaseException:
                for index in mine:
                    self.disk.release(disk_keys[index])
                raise
            done = [i for i in waiting if i not in broken and self.disk.has(disk_keys[i])]
            if not mine and not done:
                time.sleep(0.2)  # every pending image is being extracted by another process
            stored, unreadable = self._read_store(done, disk_keys)
            broken.update(unreadable)
            finished = set(done)
            pending = [i for i in waiting if i not in finished] + unreadable
            if items or stored:
                yield items + stored

    def _read_store(self, indices: list[int], disk_keys: dict[int, str]) -> tuple[list[tuple], list[int]]:
        """The entries of ``indices`` the on-disk store holds, as ``(index, features, mask)``, and the rest."""
        if self.disk is None:
            return [], indices
        stored, missing = [], []
        for index in indices:
            entry = self.disk.load(disk_keys[index])
            if entry is None:
                missing.append(index)
            else:
                stored.append((index, *entry))
        self.stats.from_disk += len(stored)
        return stored, missing

    def _admit(
        self, dataset: ImageDataset, items: list[tuple], remaining: int, added: list[tuple], description: str
    ) -> bool:
        """Keep ``items`` in memory, unless the ``remaining`` entries of the data set would not fit: then
        undo its entries so far and let its loader decode images each time."""
        item_bytes = items[0][1].nelement() * (2 if self.fp16 else 4)
        projected = self.nbytes + item_bytes * remaining
        if projected > self.max_bytes:
            for key in added:
                self.nbytes -= self._size(self.store.pop(key))
            self.stats.bypassed += 1
            log.warning("feature cache full (%.1f GB limit): %s is not cached", self.max_bytes / 2**30, description)
            return False
        if not self.fp16 and projected > self.fp16_above_bytes:
            self._to_fp16()
        for index, features, mask in items:
            value = (features.clone().to(torch.float16 if self.fp16 else torch.float32), mask)
            key = self.key(dataset, dataset.samples[index].path)
            self.store[key] = value
            self.nbytes += self._size(value)
            added.append(key)
        return True

    @staticmethod
    def _size(value: tuple[torch.Tensor, torch.Tensor | None]) -> int:
        features, mask = value
        return features.element_size() * features.nelement() + (mask.nelement() if mask is not None else 0)

    def _to_fp16(self) -> None:
        self.fp16 = True
        self.store = {k: (f.to(torch.float16), m) for k, (f, m) in self.store.items()}
        self.nbytes = sum(self._size(v) for v in self.store.values())
