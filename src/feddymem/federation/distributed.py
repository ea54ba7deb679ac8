"""Processes and collectives for the federation: one code path for 1 or N processes.

Clients are never wrapped in DistributedDataParallel: a federated client's gradients must not be
averaged with anyone's. :class:`ClientIsolatedDDPStrategy` keeps Fabric's process launch, process
group and collectives (gloo on CPU, nccl on GPU) and leaves modules as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.fabric.strategies import DDPStrategy
from torch.nn import Module

from feddymem.errors import PeerFailure


class ClientIsolatedDDPStrategy(DDPStrategy):
    """DDP's processes and collectives without DDP's gradient synchronisation."""

    strategy_name = "client_isolated_ddp"

    def setup_module(self, module: Module) -> Module:  # type: ignore[override]  # deliberately no DDP wrapper
        """The module as it is: no DistributedDataParallel wrapper, no gradient sync."""
        return module


def make_fabric(accelerator: str, devices: int, num_nodes: int, timeout_s: float, loggers: list) -> L.Fabric:
    """A Fabric for ``devices`` processes per node on ``num_nodes`` nodes (torchrun/SLURM/``fabric run`` too).

    One process needs no process group: Fabric's single-device strategy, same orchestrator code.
    """
    single = devices * num_nodes == 1
    strategy = "auto" if single else ClientIsolatedDDPStrategy(timeout=timedelta(seconds=timeout_s))
    return L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, loggers=loggers)


@contextmanager
def _collective(fabric: L.Fabric) -> Iterator[None]:
    """A collective that fails because a peer process died (its socket closed, or the timeout passed)
    is a :class:`PeerFailure`: the peer has printed its own error, this process stops quietly."""
    try:
        yield
    except (RuntimeError, dist.DistError) as err:
        raise PeerFailure(
            f"process {fabric.global_rank} of {fabric.world_size}: another process of this run stopped ({err})"
        ) from None


def gather_to_server(fabric: L.Fabric, obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (ordered by rank); ``None`` on the other ranks."""
    if fabric.world_size == 1:
        return [obj]
    out: list[Any] | None = [None] * fabric.world_size if fabric.global_rank == 0 else None
    with _collective(fabric):
        dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_server(fabric: L.Fabric, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if fabric.world_size == 1:
        return obj
    with _collective(fabric):
        return fabric.broadcast(obj, src=0)


def barrier(fabric: L.Fabric) -> None:
    """Wait for every process (a no-op on one)."""
    if fabric.world_size > 1:
        with _collective(fabric):
            fabric.barrier()


def clients_of_rank(num_clients: int, rank: int, world_size: int) -> list[int]:
    """Client ids hosted by ``rank``: round-robin, so a rank may host several clients."""
    return [k for k in range(num_clients) if k % world_size == rank]
