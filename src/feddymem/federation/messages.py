"""The typed messages of a round, shared by every engine.

A client's round gives a :class:`ClientResult` (what it sends up) and, after the server's
:class:`ServerReply`, a :class:`ClientEvaluation`; the server turns them into the round's
:class:`RoundRecord`. Records become plain dicts (:meth:`RoundRecord.to_dict`) only where they are
stored: the run's history in ``metrics.json`` and in checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from feddymem.memory.reduce import MemoryBank
from feddymem.metrics.threshold import NormalScores

Payload = MemoryBank | dict[str, torch.Tensor]  # a reduced memory, or generator parameters (FedAvg)


@dataclass
class Upload:
    """What a strategy makes a client send after its round (``payload``, or ``None``) and its memory's size."""

    payload: Payload | None = None
    memory_items: int | None = None
    num_images: int | None = None  # images the memory was built from
    releases: int = 0  # Gaussian releases (privacy noise) that made the payload; 0 = no noise


@dataclass
class ServerReply:
    """What the server sends down after a round: a global memory, or averaged generator parameters."""

    participants: list[int] = field(default_factory=list)
    memory: torch.Tensor | None = None
    generator: dict[str, torch.Tensor] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # the round failed on the server (too few valid uploads): every process stops


@dataclass(frozen=True)
class ServerLimits:
    """The server's reference: what uploads must look like, and the global memory's size."""

    memory_dim: int
    max_items: int
    max_bytes: int
    global_items: int  # server.size, or the patch grid's H·W when it is 0
    generator: dict[str, torch.Tensor] = field(default_factory=dict)  # names, shapes and dtypes uploads must have
    patch_positions: int = 0  # H·W: patches per image at the memory's resolution
    # memory.coreset_ratio · H·W: a coreset upload (coreset_mean, coreset) holds this many items per training image
    items_per_image: float = 0.0
    memory_parts: int = 1  # items are this many descriptors side by side (patch, context), aggregated part by part


@dataclass
class ClientResult:
    """One client's round, as the server receives it: its upload, or the error that left it out."""

    client_id: int
    upload: Upload = field(default_factory=Upload)
    train_loss: float = float("nan")
    time_s: float = 0.0
    error: str | None = None

    def reject(self, reason: str) -> None:
        """The server refused the upload: the client is left out of the round, with the reason."""
        # The server saw it all the same: its releases still count against the client's privacy.
        u = self.upload
        self.error, self.upload = reason, Upload(None, u.memory_items, u.num_images, u.releases)


@dataclass
class TestSetMetrics:
    """A client's test-set metrics; pixel metrics only where its products have masks."""

    __test__ = False  # not a pytest test class, despite its name

    image_auroc: float
    products: dict[str, dict[str, float]]
    eval_time_s: float
    image_auroc_raw: float | None = None  # before per-product normalisation (model.scoring.normalize=product)
    pixel_auroc: float | None = None
    aupro: float | None = None
    scores: list[tuple[str, int, float]] = field(default_factory=list)  # (path, label, score), for scores.csv

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (without the per-image scores, which go to ``scores.csv``)."""
        out: dict[str, Any] = {"image_auroc": self.image_auroc}
        for key in ("image_auroc_raw", "pixel_auroc", "aupro"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return {**out, "products": self.products, "eval_time_s": self.eval_time_s}


@dataclass
class ClientEvaluation:
    """A client's state after the server's reply: normal-only statistics every round, test metrics when scored."""

    client_id: int
    criterion: float  # held-out normal images against cut-paste anomalies made from them (NaN without)
    normal: NormalScores  # the held-out normal images' scores, summarised at the site (thresholds)
    product_thresholds: dict[str, float]
    normalizer: dict[str, list[float]]
    held_out_time_s: float
    kept_round: int = 0
    update_time_s: float = 0.0
    test: TestSetMetrics | None = None
    panel: list[tuple[str, np.ndarray]] | None = None  # W&B anomaly-map strips
    # The kept state's test metrics, where the server asks for them with the run's last evaluation and the
    # kept round was not scored (Flower: the final scoring rides on that message instead of one more).
    kept_test: TestSetMetrics | None = None


@dataclass
class ClientRecord:
    """One client's line of a round's record."""

    time_s: float
    uploaded: bool
    bytes_up: int
    bytes_down: int
    train_images: int
    train_loss: float | None = None  # None when the client did not take part or failed
    error: str | None = None
    memory_items: int | None = None
    memory_patches: int | None = None  # the bank before memory-reduce: every patch of every training image
    privacy_releases: int | None = None  # Gaussian releases in this round's upload (privacy.noise_multiplier > 0)
    privacy_epsilon: float | None = None  # the client's ε over every release so far (at privacy.delta)
    evaluation: ClientEvaluation | None = None
    threshold: float | None = None  # from the held-out normal scores

    def to_dict(self) -> dict[str, Any]:
        """The stored form: optional fields only when set, the evaluation and test metrics inline."""
        out: dict[str, Any] = {
            "time_s": self.time_s,
            "uploaded": self.uploaded,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "train_images": self.train_images,
        }
        for key in ("error", "train_loss", "memory_items", "memory_patches", "privacy_releases", "privacy_epsilon"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if (ev := self.evaluation) is not None:
            out.update(
                criterion=ev.criterion,
                product_thresholds=ev.product_thresholds,
                normalizer=ev.normalizer,
                held_out_time_s=ev.held_out_time_s,
                kept_round=ev.kept_round,
            )
            if ev.test is not None:
                out.update(ev.test.to_dict())
            out["update_time_s"] = ev.update_time_s
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out


@dataclass
class RoundRecord:
    """What a round did: who took part, the server's statistics, every client's line, bytes and time."""

    round: int
    method: str
    participants: list[int]
    server: dict[str, Any]
    clients: dict[int, ClientRecord]
    threshold: float  # the global model's threshold, over every client's held-out normal scores
    time_s: float = 0.0
    cache: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, float] | None = None  # noise multiplier, δ and the largest client ε so far

    @property
    def bytes_up(self) -> int:
        """Bytes every client sent this round."""
        return sum(c.bytes_up for c in self.clients.values())

    @property
    def bytes_down(self) -> int:
        """Bytes the server sent to all clients this round."""
        return sum(c.bytes_down for c in self.clients.values())

    @property
    def mean_image_auroc(self) -> float:
        """NaN in rounds whose test set is not scored (``federation.eval_every``)."""
        tests = [c.evaluation.test if c.evaluation else None for c in self.clients.values()]
        return float(np.mean([t.image_auroc if t else np.nan for t in tests]))

    @property
    def mean_criterion(self) -> float:
        """The mean held-out criterion of the clients that have one."""
        criteria = [c.evaluation.criterion for c in self.clients.values() if c.evaluation]
        judged = [v for v in criteria if v == v]  # NaN without held-out images
        return float(np.mean(judged)) if judged else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """The stored form: one entry of ``metrics.json``'s ``rounds`` and of the checkpoints' history."""
        return {
            "round": self.round,
            "method": self.method,
            "participants": self.participants,
            "server": self.server,
            "clients": {cid: c.to_dict() for cid, c in sorted(self.clients.items())},
            "threshold": self.threshold,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "mean_image_auroc": self.mean_image_auroc,
            "mean_criterion": self.mean_criterion,
            "time_s": self.time_s,
            "cache": self.cache,
            **({"privacy": self.privacy} if self.privacy else {}),
        }
