"""The client side of a round for the clients of one process, usable without any engine: local training,
memory build and upload through the strategy, the server's reply, evaluation, model selection, timeouts
and failure isolation (a failing client is reported in its result, never raised)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from feddymem.errors import CheckpointError
from feddymem.federation.baselines import proximal_term
from feddymem.federation.client import Client, ClientSideAdapter, KeptState, Loaders
from feddymem.federation.evaluation import Evaluator
from feddymem.federation.messages import ClientEvaluation, ClientResult, ServerReply, TestSetMetrics
from feddymem.federation.strategies import Strategy
from feddymem.memory.reduce import MemoryBank
from feddymem.metrics.normalize import ScoreNormalizer

log = logging.getLogger(__name__)

Progress = Callable[[str, int], Callable[[int], None]]  # (description, total) → advance(n)


class ClientTimeout(Exception):
    """A client ran past ``federation.client_timeout_s`` in a round."""


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


class ClientRunner:
    """Runs the rounds of ``clients`` (this process's share) under ``strategy``.

    ``backward(loss)`` is the engine's (Fabric's ``fabric.backward``); plain ``loss.backward()`` by default.
    """

    def __init__(
        self,
        cfg: Any,
        strategy: Strategy,
        clients: list[Client],
        loaders: Loaders,
        evaluator: Evaluator,
        backward: Callable[[torch.Tensor], Any] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.cfg, self.strategy, self.clients = cfg, strategy, clients
        self.loaders, self.evaluator = loaders, evaluator
        self.backward = backward or (lambda loss: loss.backward())
        self.progress = progress or _no_progress

    def training_clients(self) -> list[Client]:
        """The clients that train: all of them, or the one pooled model when the strategy pools data."""
        return self.clients[:1] if self.strategy.pooled else self.clients

    # --- before the server ----------------------------------------------------------------------
    def local_training(self, client: Client, round_idx: int, deadline: float) -> float:
        """``local_epochs`` epochs of the metric loss against the client's current memory; mean loss.

        FedProx adds ``prox_mu / 2 · ||w - w_global||²`` over the generator's parameters.
        """
        module, optimizer = client.module, client.optimizer
        train_set = self.loaders.cached(client.train_set, f"client {client.id} features")
        mu = self.strategy.prox_mu
        module.train()
        losses = []
        for epoch in range(self.cfg.federation.local_epochs):
            # Seeded by (round, epoch, client): the same batches on any number of processes and after resume.
            seed = self.cfg.seed + 1_000_003 * round_idx + 1009 * epoch + client.id
            loader = self.loaders.loader(train_set, shuffle=True, seed=seed, train=True)
            advance = self.progress(f"client {client.id} epoch {epoch + 1}", len(loader))
            for batch_idx, batch in enumerate(loader):
                if time.monotonic() > deadline:
                    raise ClientTimeout(f"client {client.id} ran past {self.cfg.federation.client_timeout_s}s")
                optimizer.zero_grad(set_to_none=True)
                loss = module.training_step(batch, batch_idx)
                if mu > 0 and client.anchor is not None:
                    loss = loss + mu / 2 * proximal_term(module.model.generator.named_parameters(), client.anchor)
                self.backward(loss)
                optimizer.step()
                advance(1)
            losses.append(float(module.train_loss.compute()) if module.train_loss.update_count else float("nan"))
            # The engine logs the loss per round with the round as step; the module's own per-epoch self.log
            # is for plain Trainer use and would give the experiment loggers a second step counter.
            module.train_loss.reset()
        module.eval()
        return sum(losses) / len(losses) if losses else float("nan")

    def build_memory(self, client: Client) -> MemoryBank:
        """Rebuild and reduce the client's memory with its current generator."""
        memory_set = self.loaders.cached(client.memory_set, f"client {client.id} features")
        products = [s.product for s in client.memory_set.samples]
        return client.module.build_memory(self.loaders.loader(memory_set, shuffle=False), products)

    def side(self, client: Client) -> ClientSideAdapter:
        """What a strategy may do with ``client`` (its generator, its memory)."""
        return ClientSideAdapter(client, lambda: self.build_memory(client))

    def run_round(self, client: Client, round_idx: int) -> ClientResult:
        """Train (after round 0) and prepare the upload; a failure or timeout is reported, not raised."""
        t0 = time.perf_counter()
        timeout = self.cfg.federation.client_timeout_s
        deadline = time.monotonic() + timeout if timeout > 0 else float("inf")
        try:
            train = round_idx > 0 and self.cfg.federation.local_epochs > 0 and self.strategy.trains
            loss = self.local_training(client, round_idx, deadline) if train else float("nan")
            upload = self.strategy.client_update(self.side(client), round_idx)
            if time.monotonic() > deadline:
                raise ClientTimeout(f"client {client.id} ran past {timeout}s")
        except Exception as err:  # a failing site must not stop the federation
            log.warning("client %d left out of round %d: %s", client.id, round_idx, err)
            return ClientResult(client.id, error=f"{type(err).__name__}: {err}", time_s=time.perf_counter() - t0)
        return ClientResult(client.id, upload, train_loss=loss, time_s=time.perf_counter() - t0)

    # --- after the server -----------------------------------------------------------------------
    def apply(self, reply: ServerReply) -> dict[int, float]:
        """Every client takes the server's reply; the seconds each spent on it."""
        seconds = {}
        for client in self.clients:
            t0 = time.perf_counter()
            self.strategy.apply(self.side(client), reply)
            if reply.generator is not None:
                client.anchor = reply.generator  # FedProx's proximal term pulls towards it (prox_mu > 0)
            seconds[client.id] = time.perf_counter() - t0
        return seconds

    def evaluate(self, client: Client, round_idx: int, tested: bool, update_time_s: float = 0.0) -> ClientEvaluation:
        """Held-out statistics and criterion, the kept round, and when ``tested`` the test metrics and panel."""
        evaluation, normalizer = self.evaluator.held_out(client)
        evaluation.kept_round = self.keep_best(client, round_idx, evaluation.criterion, normalizer)
        evaluation.update_time_s = update_time_s
        if tested:
            evaluation.test = self.evaluator.test(client, normalizer)
            evaluation.panel = self.evaluator.panel(client)
        return evaluation

    def keep_best(
        self, client: Client, round_idx: int, criterion: float, normalizer: ScoreNormalizer | None = None
    ) -> int:
        """Snapshot the client's state (and the ``normalizer`` fitted on it) when ``criterion`` beats the kept
        one (ties keep the earlier round); the round now kept."""
        judged = criterion == criterion  # NaN without held-out images: nothing to judge by, keep the last
        better = client.kept is None or not judged or criterion > client.kept.criterion
        if self.cfg.selection.keep.value == "last" or better:
            state = None if normalizer is None else normalizer.state()
            client.kept = KeptState(round_idx, criterion, client.module.trainable_state(), state)
        assert client.kept is not None
        return client.kept.round

    def test_kept(self, client: Client) -> tuple[TestSetMetrics, list[tuple[str, np.ndarray]] | None]:
        """The test metrics of the client's kept state and its anomaly-map panel (W&B only; the Fabric
        engine's trusted cluster); its current state is restored afterwards."""
        assert client.kept is not None
        current = client.module.trainable_state()
        client.module.load_trainable_state(client.kept.model)
        if client.kept.normalizer is not None:
            normalizer = ScoreNormalizer.from_state(client.kept.normalizer)
        else:
            _, normalizer = self.evaluator.held_out(client)
        metrics = self.evaluator.test(client, normalizer)
        panel = self.evaluator.panel(client)
        client.module.load_trainable_state(current)
        return metrics, panel

    # --- checkpoints ----------------------------------------------------------------------------
    def states(self) -> dict[int, dict[str, Any]]:
        """Each client's module settings, model, optimiser and kept state, by client id (small: no backbone)."""
        return {
            c.id: {
                "module": dict(c.module.hparams),  # rebuilds exactly this module (load_trained)
                "model": c.module.trainable_state(),
                "optimizer": c.optimizer.state_dict(),
                "kept": None if c.kept is None else vars(c.kept),
            }
            for c in self.clients
        }

    def restore(self, payload: dict[str, Any]) -> None:
        """Each client's state from a checkpoint's ``clients`` and the global memory and generator."""
        for client in self.clients:
            saved = payload["clients"].get(client.id)
            if saved is None or saved["train"] != [s.path for s in client.data.train]:
                raise CheckpointError(
                    f"checkpoint does not match client {client.id}'s data partition; "
                    "was the data or the data config changed?"
                )
            try:
                client.module.load_trainable_state(saved["model"])  # includes the client's memory
            except ValueError as err:
                raise CheckpointError(
                    f"cannot resume client {client.id}: {err}; resume with the run's own model.* settings"
                ) from None
            client.optimizer.load_state_dict(saved["optimizer"])
            client.kept = KeptState(**saved["kept"]) if saved.get("kept") else None
            if payload["global_memory"] is not None:
                client.module.set_global_memory(payload["global_memory"])
            client.anchor = payload.get("global_generator")  # FedProx's anchor (unused when prox_mu = 0)
