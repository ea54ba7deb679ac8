"""The server of a federation, engine-neutral: it checks what clients upload, aggregates it with the
strategy, keeps the global state and writes each round's record.

Its reference (memory dimension, item and byte limits, the generator's parameter shapes) comes from the
config alone (:func:`server_limits`), never from a client's objects: a server that holds no client,
as in a cross-site deployment, checks uploads exactly as one that does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

import torch

from feddymem.errors import FedDyMemError
from feddymem.federation.messages import (
    ClientEvaluation,
    ClientRecord,
    ClientResult,
    RoundRecord,
    ServerLimits,
    ServerReply,
    Upload,
)
from feddymem.federation.strategies import Strategy
from feddymem.federation.upload import UploadRejected, payload_bytes
from feddymem.metrics.threshold import pooled_threshold
from feddymem.models.backbone import feature_geometry
from feddymem.models.generator import MemoryGenerator
from feddymem.models.torch_model import memory_parts
from feddymem.privacy.accountant import epsilon

log = logging.getLogger(__name__)


class TooFewClients(FedDyMemError):
    """Fewer than ``federation.min_clients`` valid uploads arrived in a round."""


def server_limits(cfg: Any) -> ServerLimits:
    """What the server of ``cfg`` accepts, from the config alone (the backbone's geometry is read on the
    meta device: no weights, no memory)."""
    m, s = cfg.model, cfg.server
    geometry = feature_geometry(m.backbone.name, m.backbone.layers)
    positions = (cfg.data.crop_size // geometry.stride) ** 2
    with torch.device("meta"):  # only names, shapes and dtypes matter
        generator = MemoryGenerator(geometry.channels, m.generator.reduction, m.generator.coord_channels, "random")
    parts = memory_parts(m.scoring.context)  # a context window puts a context item beside each patch item
    return ServerLimits(
        memory_dim=parts * generator.out_channels,
        memory_parts=parts,
        max_items=max(s.max_upload_items, cfg.memory.size, positions),
        max_bytes=int(s.max_upload_mb * 2**20),
        global_items=s.size or positions,
        generator=generator.state_dict(),
        patch_positions=positions,
        # A coreset upload grows with the client's images (coreset_ratio of its patches): a site with
        # thousands of images must not be rejected by the fixed item limit.
        items_per_image=cfg.memory.coreset_ratio * positions,
    )


class Server:
    """Validates uploads, aggregates them with the strategy, and keeps the last global memory or generator."""

    def __init__(self, cfg: Any, strategy: Strategy, train_images: list[int], limits: ServerLimits | None = None):
        """``train_images``: each client's number of training images, by client id (the weights of
        size-weighted aggregation)."""
        self.cfg, self.strategy, self.train_images = cfg, strategy, train_images
        self.limits = limits or server_limits(cfg)
        self.global_memory: torch.Tensor | None = None
        self.global_generator: dict[str, torch.Tensor] | None = None  # FedAvg, FedProx
        self.releases: dict[int, int] = {}  # each client's noisy releases so far (privacy.noise_multiplier > 0)

    def limits_of(self, client_id: int) -> ServerLimits:
        """The limits one client's upload is checked against: coreset uploads may hold ``items_per_image``
        items for each of its training images, above ``max_items``."""
        images = self.train_images[client_id] if client_id < len(self.train_images) else 0
        own = math.ceil(self.limits.items_per_image * images)
        return replace(self.limits, max_items=own) if own > self.limits.max_items else self.limits

    def accept(self, results: list[ClientResult], round_idx: int) -> list[ClientResult]:
        """The results whose uploads are valid (in client order); the others get the reason as their error.

        Raises :class:`TooFewClients` below ``federation.min_clients``."""
        accepted = []
        for result in sorted(results, key=lambda r: r.client_id):
            if result.upload.payload is None:
                continue
            try:
                self.strategy.validate(result.client_id, result.upload.payload, self.limits_of(result.client_id))
                accepted.append(result)
            except UploadRejected as err:
                log.warning("round %d: %s", round_idx, err)
                result.reject(str(err))
        if len(accepted) < self.cfg.federation.min_clients:
            errors = "; ".join(r.error for r in results if r.error)
            raise TooFewClients(
                f"round {round_idx}: {len(accepted)} valid uploads, federation.min_clients is "
                f"{self.cfg.federation.min_clients} ({errors or 'no errors reported'})"
            )
        return accepted

    def step(self, results: list[ClientResult], round_idx: int) -> ServerReply:
        """Check the uploads and build what goes down; a failed round is a reply with its ``error``."""
        if not self.strategy.uploads_in(round_idx):  # a failing client is recorded, not counted against min_clients
            return ServerReply()
        try:
            accepted = self.accept(results, round_idx)
        except TooFewClients as err:
            return ServerReply(error=str(err))
        reply = self.strategy.aggregate(
            {r.client_id: r.upload.payload for r in accepted},
            {r.client_id: self.train_images[r.client_id] for r in accepted},
            round_idx,
            self.global_memory,
            self.limits,
        )
        if reply.memory is not None:
            self.global_memory = reply.memory
        if reply.generator is not None:
            self.global_generator = reply.generator
        return reply

    def record(
        self,
        round_idx: int,
        reply: ServerReply,
        results: list[ClientResult],
        evaluations: list[ClientEvaluation],
        k_sigma: float | None,
    ) -> RoundRecord:
        """The round's record: every client's result and evaluation, bytes each way, each client's threshold
        (its own, from its held-out normal scores) and one for all (:func:`pooled_threshold`: the sites send
        summaries of their normal scores, never the scores)."""
        down = payload_bytes(reply.memory) + payload_bytes(reply.generator)
        by_id = {r.client_id: r for r in results}
        clients = {}
        for cid, images in enumerate(self.train_images):
            result = by_id.get(cid)  # centralized: only the pooled model trains
            upload = result.upload if result else None
            clients[cid] = ClientRecord(
                time_s=result.time_s if result else 0.0,
                uploaded=upload is not None and upload.payload is not None,
                bytes_up=payload_bytes(upload.payload) if upload else 0,
                bytes_down=down,
                train_images=images,
                train_loss=result.train_loss if result and not result.error else None,
                error=result.error if result else None,
                memory_items=upload.memory_items if upload else None,
                memory_patches=None
                if upload is None or upload.num_images is None
                else upload.num_images * self.limits.patch_positions,
            )
            self.account(cid, clients[cid], upload)
        for ev in evaluations:
            clients[ev.client_id].evaluation = ev
            clients[ev.client_id].threshold = ev.normal.threshold
        return RoundRecord(
            round_idx,
            self.strategy.name,
            reply.participants,
            reply.stats,
            clients,
            threshold=pooled_threshold([ev.normal for ev in evaluations], k_sigma),
            privacy=self.privacy_spent(),
        )

    def account(self, client_id: int, record: ClientRecord, upload: Upload | None) -> None:
        """Add the noisy releases of ``upload`` to the client's total (a rejected upload was still seen)."""
        releases = upload.releases if upload else 0
        if releases:
            self.releases[client_id] = self.releases.get(client_id, 0) + releases
            record.privacy_releases = releases
        if client_id in self.releases:
            p = self.cfg.privacy
            record.privacy_epsilon = epsilon(p.noise_multiplier, self.releases[client_id], p.delta)

    def privacy_spent(self) -> dict[str, float] | None:
        """The privacy of every upload so far: the noise, δ and the largest ε of any client (None without noise)."""
        if not self.releases:
            return None
        p = self.cfg.privacy
        worst = max(self.releases.values())
        return {
            "noise_multiplier": float(p.noise_multiplier),
            "delta": float(p.delta),
            "releases": worst,
            "epsilon": epsilon(p.noise_multiplier, worst, p.delta),
        }

    def state(self) -> dict[str, Any]:
        """The server's part of a checkpoint."""
        return {
            "global_memory": None if self.global_memory is None else self.global_memory.clone(),
            "global_generator": self.global_generator,
        }

    def restore(self, payload: dict[str, Any]) -> None:
        """Continue from a checkpoint's global memory and generator."""
        self.global_memory = payload["global_memory"]
        self.global_generator = payload.get("global_generator")
        self.releases = {}
        for record in payload.get("history", []):
            for cid, stats in record["clients"].items():
                if stats.get("privacy_releases"):
                    self.releases[int(cid)] = self.releases.get(int(cid), 0) + int(stats["privacy_releases"])
