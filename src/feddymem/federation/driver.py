"""The round loop of a federated run, for every engine: round 0 builds the first global memory; each round
the clients train and upload, the server aggregates and replies, the clients are evaluated, the round is
recorded, logged and checkpointed; an early stop; the kept states scored at the end; the run's summary.

Engines differ only in how messages travel, behind a :class:`Transport`: Fabric's collectives between
processes (``orchestrator.py``), Flower's Grid between sites (``feddymem.flower``). On Fabric every process
runs this driver (the server's answers are shared with the others); on Flower only the coordinator does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from omegaconf import DictConfig

from feddymem.errors import FedDyMemError, PeerFailure
from feddymem.federation.checkpointing import RunCheckpoints, round_payload
from feddymem.federation.messages import ClientEvaluation, ClientResult, ServerReply, TestSetMetrics
from feddymem.federation.reporting import RunReporter, final_summary, kept_record
from feddymem.federation.server import Server, TooFewClients
from feddymem.io import atomic_write_json
from feddymem.logging.console import Reporter

T = TypeVar("T")
Panel = list[tuple[str, np.ndarray]] | None


def test_set_scored(cfg: Any, round_idx: int) -> bool:
    """Whether the test set is scored after ``round_idx`` (``federation.eval_every``, and the last round;
    0 = never: each client's kept state is scored once at the end)."""
    every = cfg.federation.eval_every
    return every > 0 and (round_idx % every == 0 or round_idx == cfg.federation.rounds)


class Transport(Protocol):
    """How one engine moves a round's messages. Calls that gather answer ``None`` on a process that is not
    the server."""

    engine: str  # "fabric" | "flower"
    is_server: bool

    def train(self, round_idx: int, tested: bool) -> list[ClientResult] | None:
        """Every client's local training and upload (an error result for a client that sent none)."""

    def share(self, value: T) -> T:
        """The server's ``value`` on every process."""

    def evaluate(
        self, round_idx: int, tested: bool, reply: ServerReply
    ) -> tuple[list[ClientEvaluation], dict[int, str]] | None:
        """Deliver ``reply``, evaluate every client: the evaluations, and why a client sent none."""

    def test_kept(self, last_record: dict[str, Any] | None) -> dict[int, tuple[TestSetMetrics, Panel]] | None:
        """Test metrics (and panels) of every client's kept state whose round was not scored."""

    def client_states(self) -> dict[int, dict[str, Any]] | None:
        """What the server's checkpoint holds of each client (Flower: the sites keep their own models)."""

    def details(self) -> dict[str, Any]:
        """The engine's own entries of a round's record and of the summary (``cache``, ``sites``, ...)."""


class RoundDriver:
    """Runs rounds ``start_round..federation.rounds`` of a set-up run through ``transport``."""

    def __init__(
        self,
        cfg: DictConfig,
        transport: Transport,
        server: Server | None,
        report: RunReporter,
        checkpoints: RunCheckpoints,
        run_dir: Path,
        *,
        method: str,
        single_round: bool,
        history: list[dict[str, Any]] | None = None,
        reporter: Reporter | None = None,
    ) -> None:
        self.cfg, self.transport, self.server, self.report = cfg, transport, server, report
        self.checkpoints, self.run_dir, self.method, self.single_round = checkpoints, run_dir, method, single_round
        self.history: list[dict[str, Any]] = list(history or [])  # every round's stored record (server)
        self.final_tests: dict[int, dict[str, Any]] = {}
        self.reporter = reporter or Reporter(quiet=True)

    def run_round(self, round_idx: int) -> dict[str, Any] | None:
        """One round; its stored record on the server, ``None`` elsewhere."""
        start = time.perf_counter()
        tested = test_set_scored(self.cfg, round_idx)
        results = self.transport.train(round_idx, tested)
        reply = ServerReply()
        if self.server is not None and results is not None:
            reply = self.server.step(results, round_idx)
        reply = self.transport.share(reply)
        if reply.error:
            raise TooFewClients(reply.error) if self.transport.is_server else PeerFailure(reply.error)
        answered = self.transport.evaluate(round_idx, tested, reply)
        if self.server is None or answered is None or results is None:
            return None
        evaluations, unevaluated = answered
        if not evaluations:
            raise FedDyMemError(f"round {round_idx}: no client sent its evaluation ({unevaluated})")
        evaluations.sort(key=lambda e: e.client_id)
        record = self.server.record(round_idx, reply, results, evaluations, self.cfg.threshold_k_sigma or None)
        for client_id, error in unevaluated.items():  # a site gone after its upload: named in the record
            line = record.clients[client_id]
            line.error = f"{line.error}; {error}" if line.error else error
        record.time_s = time.perf_counter() - start
        if cache := self.transport.details().get("cache"):
            record.cache = {"extraction_s": cache["extraction_s"], "saved_s": cache["saved_s"], "bytes": cache["bytes"]}
        self.report.log_panels(round_idx, {e.client_id: e.panel for e in evaluations})
        self._write_scores({e.client_id: e.test for e in evaluations if e.test})
        return record.to_dict()

    def _write_scores(self, tests: dict[int, TestSetMetrics]) -> None:
        """Per-image scores of the latest scored states, for ROC curves (``feddymem report``)."""
        rows = [(cid, *row) for cid, test in tests.items() for row in test.scores]
        if rows:
            self.report.write_scores(rows)

    def should_stop(self, round_idx: int) -> bool:
        """Early stop (``selection.patience`` > 0): no client has improved its criterion for that many rounds."""
        if self.single_round:
            return True  # nothing trains: the round-0 memory is the model
        patience = self.cfg.selection.patience
        if patience <= 0 or round_idx >= self.cfg.federation.rounds:
            return False
        stop = None
        if self.server is not None:
            latest = max(c.get("kept_round", round_idx) for c in self.history[-1]["clients"].values())
            stop = round_idx - latest >= patience
            if stop:
                self.reporter.print(f"stopping after round {round_idx}: no client improved for {patience} round(s)")
        return bool(self.transport.share(stop))

    def save(self, round_idx: int) -> None:
        """The round's checkpoint (atomic), with the summary so far in ``metrics.json``."""
        clients = self.transport.client_states()
        if self.server is None or clients is None:
            return
        kept = kept_record(self.history, self.final_tests)["clients"]
        payload = round_payload(round_idx, self.cfg, self.server.state(), clients, kept, self.history)
        self.checkpoints.write(round_idx, {**payload, "engine": self.transport.engine}, self.summary())

    def final_evaluation(self) -> None:
        """Score every kept state whose round was not scored on the test set; log its panels and scores."""
        tested = self.transport.test_kept(self.history[-1] if self.history else None)
        if tested is None:
            return
        self.final_tests = {cid: metrics.to_dict() for cid, (metrics, _) in tested.items()}
        if self.history:  # the kept states' anomaly maps, at the last round (W&B)
            self.report.log_panels(self.history[-1]["round"], {cid: panel for cid, (_, panel) in tested.items()})
        self._write_scores({cid: metrics for cid, (metrics, _) in tested.items()})

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` holds: every round's record, each client's kept result, the engine's details."""
        return {
            "run_dir": str(self.run_dir),
            "method": self.method,
            "engine": self.transport.engine,
            "rounds": self.history,
            "final": final_summary(self.history, self.final_tests),
            **self.transport.details(),
        }

    def run(self, start_round: int = 0) -> dict[str, Any] | None:
        """The remaining rounds, a checkpoint after each, the final evaluation; the summary on the server."""
        with self.reporter.bars():
            for round_idx in range(start_round, self.cfg.federation.rounds + 1):
                record = self.run_round(round_idx)
                if record is not None:
                    self.history.append(record)
                    self.report.log_round(record, tested=test_set_scored(self.cfg, round_idx))
                self.save(round_idx)
                if self.should_stop(round_idx):
                    break
            self.final_evaluation()
        return self.summary() if self.server is not None else None

    def finish(self, global_memory: Any, partition: list[Any]) -> dict[str, Any]:
        """On the server: ``metrics.json``, the final metrics to every logger, the table."""
        summary = self.summary()
        atomic_write_json(self.run_dir / "metrics.json", summary)
        self.report.log_final(self.history, self.final_tests, global_memory)
        self.report.finish()
        if self.history:
            self.report.print_table(kept_record(self.history, self.final_tests), self.history, partition)
        return summary
