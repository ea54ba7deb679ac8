"""Federation strategies, in the spirit of Flower's ``Strategy``: what a client sends after its local
round, how the server checks and aggregates what arrives, and what each client does with the answer.

One class per method; :func:`make_strategy` is the one place that picks a strategy by its name. The
strategies know nothing of processes or engines: they act on one client's module (through a
:class:`ClientSide`) and on plain tensors, so every engine (Fabric today) reuses them, and they can be
tested on small synthetic tensors without a backbone or a data set.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, ClassVar, Protocol

import torch

from feddymem.config.choices import Method
from feddymem.config.settings import memory_reduce_settings, model_settings
from feddymem.errors import ConfigError
from feddymem.federation.baselines import average_parameters
from feddymem.federation.messages import ServerLimits, ServerReply, Upload
from feddymem.federation.upload import validate_parameters, validate_upload
from feddymem.memory.aggregate import GlobalMemory, aggregate, coreset_aggregate, mean_aggregate
from feddymem.memory.reduce import MemoryBank, MemoryReduceSettings, distinct_items, rows_side_by_side, split_parts
from feddymem.models.settings import ModelSettings


class ClientSide(Protocol):
    """What a strategy may do with one client: read and replace its generator, give it a memory, and
    have it rebuild (and reduce) its memory from its own images with its current generator."""

    def generator_state(self) -> dict[str, torch.Tensor]:
        """The client's generator parameters."""

    def load_generator(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the client's generator parameters."""

    def set_memory(self, items: torch.Tensor) -> None:
        """Make ``items`` the client's memory."""

    def build_memory(self) -> MemoryBank:
        """Rebuild and reduce the client's memory from its images with its current generator."""


class Strategy:
    """FedDyMem's strategy and the base of the others: reduced memories up, a K-means global memory down."""

    name: ClassVar[str] = "feddymem"
    pooled: ClassVar[bool] = False  # one model over every client's pooled training images
    trains: ClassVar[bool] = True  # the generator learns (after round 0)
    single_round: ClassVar[bool] = False  # the round-0 state is the model: stop after it
    shares_memory: ClassVar[bool] = True  # what leaves a client is its reduced memory (privacy noise applies)

    def __init__(self, cfg: Any, server_gpu: bool = False) -> None:
        self.cfg, self.server_gpu = cfg, server_gpu  # server_gpu: the server's K-means runs on the GPU

    # --- client side ---------------------------------------------------------------------------
    def model_settings(self) -> ModelSettings:
        """The model every client builds: the config's, or what the method fixes over it."""
        return model_settings(self.cfg)

    def memory_settings(self) -> MemoryReduceSettings:
        """Every client's memory-reduce: the config's, or what the method fixes over it."""
        return memory_reduce_settings(self.cfg)

    @property
    def prox_mu(self) -> float:
        """Weight of the proximal term added to the local loss (FedProx); 0 for the others."""
        return 0.0

    def rebuilds_memory(self, round_idx: int) -> bool:
        """Whether clients rebuild their memory this round (``memory.rebuild=once``: round 0 only)."""
        return round_idx == 0 or self.cfg.memory.rebuild.value != "once"

    def uploads_in(self, round_idx: int) -> bool:
        """Whether clients send anything to the server this round."""
        return self.rebuilds_memory(round_idx)

    def client_update(self, client: ClientSide, round_idx: int) -> Upload:
        """After local training: the client's reduced memory, sent to the server."""
        if not self.rebuilds_memory(round_idx):
            return Upload()  # ablation: the round-0 memory is kept
        bank = client.build_memory()
        return Upload(bank, int(bank.items.shape[0]), bank.num_images, bank.releases)

    def apply(self, client: ClientSide, reply: ServerReply) -> None:
        """The client takes the server's reply: the global memory becomes its memory."""
        if reply.memory is not None:
            client.set_memory(reply.memory)

    # --- server side ---------------------------------------------------------------------------
    def validate(self, client_id: int, payload: Any, limits: ServerLimits) -> None:
        """Raise :class:`~feddymem.federation.upload.UploadRejected` for a malformed upload."""
        validate_upload(
            client_id, payload, dim=limits.memory_dim, max_items=limits.max_items, max_bytes=limits.max_bytes
        )

    def aggregate(
        self,
        uploads: dict[int, Any],
        client_sizes: dict[int, int],
        round_idx: int,
        previous: torch.Tensor | None,
        limits: ServerLimits,
    ) -> ServerReply:
        """The global memory from the accepted uploads (by client id): server K-means (or the ablations),
        warm-started from the ``previous`` global memory."""
        t0 = time.perf_counter()
        banks = [uploads[k] for k in sorted(uploads)]
        parts = limits.memory_parts
        previous_parts = previous.chunk(parts, dim=1) if previous is not None else [None] * parts
        # Each part (patch items, context items) is aggregated on its own, then set side by side again; a
        # context part is aggregated without the repeats that pairing it with the patch items made.
        by_part = zip(*(split_parts(b, parts) for b in banks), strict=True)
        results = [
            self._aggregate_part(
                [distinct_items(b) for b in part] if p else list(part), previous_parts[p], round_idx, limits
            )
            for p, part in enumerate(by_part)
        ]
        result = results[0]
        if parts > 1:
            items = rows_side_by_side([r.items for r in results])
            result = GlobalMemory(items, sum(r.objective for r in results), result.num_points, result.gpu)
        return ServerReply(
            sorted(uploads),
            memory=result.items,
            stats={
                "kmeans_objective": result.objective,
                "uploaded_items": result.num_points,
                "global_items": int(result.items.shape[0]),
                "gpu": result.gpu,
                "time_s": time.perf_counter() - t0,
            },
        )

    def _aggregate_part(
        self, banks: list[MemoryBank], previous: torch.Tensor | None, round_idx: int, limits: ServerLimits
    ) -> GlobalMemory:
        """One part's global memory: server K-means (or the ablations)."""
        s = self.cfg.server
        if s.aggregation.value == "mean":
            return mean_aggregate(banks, weight_by_client_size=s.weight_by_client_size)
        if s.aggregation.value == "coreset":
            return coreset_aggregate(banks, limits.global_items, seed=self.cfg.seed + round_idx)
        return aggregate(
            banks,
            limits.global_items,
            previous=previous if s.warm_start else None,
            weight_by_client_size=s.weight_by_client_size,
            iters=s.kmeans_iters,
            seed=self.cfg.seed + round_idx,
            gpu=self.server_gpu,
            max_points=s.kmeans_max_points,
        )


class Local(Strategy):
    """Every client alone with its own memory: nothing is sent."""

    name = "local"
    shares_memory = False

    def uploads_in(self, round_idx: int) -> bool:
        """Never: nothing leaves a local client."""
        return False

    def client_update(self, client: ClientSide, round_idx: int) -> Upload:
        """The client's own memory becomes its memory; nothing is sent."""
        bank = client.build_memory()
        client.set_memory(bank.items)  # the client's own memory; it never leaves
        return Upload(None, int(bank.items.shape[0]), bank.num_images)


class Centralized(Local):
    """All clients' training images pooled in one model: the upper reference."""

    name = "centralized"
    pooled = True


class PatchCore(Centralized):
    """PatchCore in-project: pooled data, a greedy coreset of every patch, no training, one round."""

    name = "patchcore"
    trains = False
    single_round = True

    def model_settings(self) -> ModelSettings:
        """Searched exactly, with PatchCore's reweighted image score and no context map."""
        return replace(super().model_settings(), score_method="patchcore", approximate_above=0, context=0)

    def memory_settings(self) -> MemoryReduceSettings:
        """One greedy coreset of all the raw patches."""
        return replace(super().memory_settings(), method="coreset", per_product=False)


class FedAvg(Strategy):
    """Generator parameters averaged by client size; every client keeps a local memory built with them."""

    name = "fedavg"
    shares_memory = False

    def uploads_in(self, round_idx: int) -> bool:
        """Every round: the generators are averaged from round 0 on."""
        return True

    def client_update(self, client: ClientSide, round_idx: int) -> Upload:
        """The client's generator parameters."""
        return Upload({k: v.detach().cpu().clone() for k, v in client.generator_state().items()})

    def apply(self, client: ClientSide, reply: ServerReply) -> None:
        """Load the averaged generator and rebuild the local memory with it."""
        if reply.generator is not None:
            client.load_generator(reply.generator)
            # The client's local memory, rebuilt with the averaged generator, for training and scoring.
            client.set_memory(client.build_memory().items)

    def validate(self, client_id: int, payload: Any, limits: ServerLimits) -> None:
        """The reference generator's names, shapes and dtypes, finite values, the byte limit."""
        validate_parameters(client_id, payload, reference=limits.generator, max_bytes=limits.max_bytes)

    def aggregate(
        self,
        uploads: dict[int, Any],
        client_sizes: dict[int, int],
        round_idx: int,
        previous: torch.Tensor | None,
        limits: ServerLimits,
    ) -> ServerReply:
        """The generators averaged, weighted by client size when ``server.weight_by_client_size``."""
        t0 = time.perf_counter()
        ids = sorted(uploads)
        by_size = self.cfg.server.weight_by_client_size
        weights = [float(client_sizes[k]) if by_size else 1.0 for k in ids]
        generator = average_parameters([uploads[k] for k in ids], weights)
        return ServerReply(ids, generator=generator, stats={"time_s": time.perf_counter() - t0})


class FedProx(FedAvg):
    """FedAvg with the proximal term ``prox_mu / 2 · ||w - w_global||²`` in local training."""

    name = "fedprox"

    @property
    def prox_mu(self) -> float:
        """``federation.prox_mu``."""
        return float(self.cfg.federation.prox_mu)


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (Strategy, Local, Centralized, PatchCore, FedAvg, FedProx)}


def make_strategy(cfg: Any, server_gpu: bool = False) -> Strategy:
    """The strategy of ``cfg.method``: the one place that branches on a method's name."""
    strategy = STRATEGIES[Method(cfg.method).value](cfg, server_gpu)  # a member or its name
    if cfg.privacy.noise_multiplier > 0 and not strategy.shares_memory:
        raise ConfigError(
            f"'privacy.noise_multiplier' ({cfg.privacy.noise_multiplier}) adds noise to memory uploads; "
            f"method={strategy.name} uploads no memory (use method=feddymem)"
        )
    return strategy
