"""Backbone features on disk: an image is embedded once per backbone, not once per process.

A Flower site runs every message in a fresh process, and a user reruns experiments on the same images;
both read the features back from here instead of decoding and embedding each image again. An entry is
keyed by what determines it (:meth:`~feddymem.data.datasets.ImageDataset.item_identity`: the bytes of
the image file and its mask, the product's intensity window, the pre-processing) under a folder named
after the extractor's fingerprint (its architecture and every weight), so a change to any of them
misses, and nothing is ever served stale. Entries hold float32 features as the extractor gave them
and are written atomically; an unreadable entry is extracted again and replaced.

Processes that share the folder (several sites of a trial on one machine) share the work too: before
extracting an image a process claims it (``<key>.claim``, created exclusively), and the others wait for
its entry instead of extracting it again. A claim older than :data:`CLAIM_STALE_S` (its process died)
is taken over. Entries are written by a background thread while the next batch is extracted; a claim is
released once its entry is written.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from feddymem.data.datasets import ImageDataset
from feddymem.io import atomic_write_bytes, check_writable

log = logging.getLogger(__name__)

FeatureEntry = tuple[torch.Tensor, "torch.Tensor | None"]  # features (C, H, W), mask (S, S) bool or None
CLAIM_STALE_S = 300.0  # a claim this old belongs to a process that died: one batch takes seconds


def extractor_fingerprint(extractor: nn.Module) -> str:
    """A digest of the extractor's architecture (its ``repr``) and every parameter and buffer."""
    digest = hashlib.sha256(repr(extractor).encode())
    for name, tensor in sorted(extractor.state_dict().items()):
        value = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d buffers (BatchNorm counts) too
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


class FeatureStore:
    """A folder of per-image backbone features for one extractor (see the module's docstring)."""

    def __init__(self, folder: str | Path, extractor: nn.Module) -> None:
        self.root = Path(folder).expanduser()
        check_writable(self.root, "feature cache folder (cache.dir)")
        self.folder = self.root / extractor_fingerprint(extractor)[:32]
        self._writer: ThreadPoolExecutor | None = None  # started at the first save
        self._pending: list[Future] = []

    def key(self, dataset: ImageDataset, index: int) -> str:
        """The entry name of item ``index`` of ``dataset`` (:meth:`ImageDataset.item_identity`)."""
        return hashlib.sha256(dataset.item_identity(index).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def load(self, key: str) -> FeatureEntry | None:
        """The entry ``key``, or ``None`` when there is none or it cannot be read (it is then rewritten)."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            features, mask = entry["features"], entry["mask"]
        except Exception as err:  # truncated or foreign: extract again
            log.warning("feature cache entry %s unreadable (%s): extracting it again", path, err)
            return None
        return features, mask

    def has(self, key: str) -> bool:
        """Whether the entry ``key`` exists (without reading it)."""
        return self._path(key).is_file()

    def claim(self, key: str) -> bool:
        """Take the extraction of ``key`` on for this process: ``False`` while another process holds it."""
        path = self._path(key).with_suffix(".claim")
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return True
            except FileExistsError:
                try:
                    if time.time() - path.stat().st_mtime < CLAIM_STALE_S:
                        return False
                    path.unlink()  # its process died: take it over
                except FileNotFoundError:
                    pass  # released meanwhile: try again
        return False

    def release(self, key: str) -> None:
        """Give up the claim on ``key`` (its entry is written, or extraction failed)."""
        self._path(key).with_suffix(".claim").unlink(missing_ok=True)

    def save(self, key: str, features: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Queue one entry: a background thread writes it atomically (concurrent writers of one key write the
        same bytes), then releases this process's claim on it. :meth:`flush` waits for the queue."""
        # Clones: a row of a batch would otherwise save the whole batch's storage.
        features = features.detach().to(torch.float32).clone()
        entry = {"features": features, "mask": None if mask is None else mask.clone()}
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feature-store")
        self._pending.append(self._writer.submit(self._write, key, entry))

    def _write(self, key: str, entry: dict) -> None:
        try:
            buffer = io.BytesIO()
            torch.save(entry, buffer)
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buffer.getvalue(), durable=False)  # a lost entry is extracted again
        finally:
            self.release(key)

    def flush(self) -> None:
        """Wait until every queued entry is written; a write that failed is raised here (an OutputError that
        names its file)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()
