"""The Lightning Fabric engine: launch, then rounds of gather (client results) → server → broadcast (its
reply) → gather (evaluations), with a checkpoint after each round.

Round 0 builds the first global memory from untrained generators. Each later round every client trains
its generator for ``local_epochs`` against the current global memory, rebuilds and reduces its memory
and uploads it; the server clusters the uploads into the new global memory and broadcasts it; every
client is evaluated. Only memory crosses the client boundary: generators and optimisers stay with their
client and are never averaged or gradient-synced.

The method lives elsewhere, engine-neutral: the strategy (``strategies.py``: what is sent, how it is
aggregated; the baselines are strategies too), the server (``server.py``), the clients' side
(``client_runner.py``, ``evaluation.py``), checkpoints (``checkpointing.py``) and the run's reports
(``reporting.py``). This module only moves their typed messages (``messages.py``) between processes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from feddymem.config import to_yaml
from feddymem.data.check import check_memory_images, plan_data, verify_plan
from feddymem.data.feature_cache import FeatureCache
from feddymem.data.partition import ClientData
from feddymem.errors import ConfigError, FedDyMemError, PeerFailure
from feddymem.federation.checkpointing import RunCheckpoints, round_payload
from feddymem.federation.client import Client, Loaders, build_clients, make_feature_cache
from feddymem.federation.client_runner import ClientRunner
from feddymem.federation.distributed import (
    barrier,
    broadcast_from_server,
    clients_of_rank,
    gather_to_server,
    make_fabric,
)
from feddymem.federation.evaluation import Evaluator, test_set_scored
from feddymem.federation.messages import ServerReply
from feddymem.federation.reporting import RunReporter, final_summary, kept_record, run_loggers
from feddymem.federation.server import Server, TooFewClients
from feddymem.federation.strategies import make_strategy
from feddymem.io import atomic_write_json, atomic_write_text, claim_output_dir, run_dir_problem
from feddymem.logging.console import Reporter
from feddymem.memory.kmeans import resolve_gpu


class FederatedOrchestrator:
    """Runs a whole federated experiment described by a validated config, on one or many processes.

    Rank 0 is the server; client k lives on rank ``k % world_size``. Every rank runs this same code.
    """

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: str | Path,
        reporter: Reporter | None = None,
        resume: bool = False,
        feature_cache: FeatureCache | None = None,
    ) -> None:
        """``feature_cache``: reuse another run's backbone features (same backbone and pre-processing),
        as the benchmark suite does across methods; by default every run extracts its own."""
        self.cfg, self.run_dir, self.resume, self.shared_cache = cfg, Path(run_dir), resume, feature_cache
        self.strategy = make_strategy(cfg, server_gpu=resolve_gpu(cfg.server.gpu))
        self.method = self.strategy.name  # a label for records and tables: behaviour is the strategy's
        f = cfg.federation
        if self.strategy.pooled and f.devices * f.num_nodes > 1:  # checked before any process starts
            raise ConfigError(
                f"method={self.method} pools all data in one process; got {f.devices * f.num_nodes} processes"
            )
        loggers = run_loggers(cfg, self.run_dir)
        self.fabric = make_fabric(f.accelerator, f.devices, f.num_nodes, f.collective_timeout_s, loggers)
        self.reporter = reporter or Reporter(quiet=cfg.quiet)
        self.all_clients: list[ClientData] = []
        self.server: Server | None = None  # rank 0 only
        self.history: list[dict[str, Any]] = []  # the stored form of every round's record (rank 0)
        self.final_tests: dict[int, dict[str, Any]] = {}  # test metrics of kept states scored at the end
        self.start_round = 0

    @property
    def is_server(self) -> bool:
        """Whether this process is rank 0, the server."""
        return self.fabric.global_rank == 0

    @property
    def clients(self) -> list[Client]:
        """This process's clients."""
        return self.runner.clients

    @property
    def global_memory(self) -> torch.Tensor | None:
        """The last global memory (rank 0; ``None`` elsewhere and for methods that share none)."""
        return self.server.global_memory if self.server else None

    @property
    def global_generator(self) -> dict[str, torch.Tensor] | None:
        """The last averaged generator (FedAvg, FedProx; rank 0)."""
        return self.server.global_generator if self.server else None

    def setup(self) -> None:
        """Launch processes, plan and check the data, build this rank's clients and the server, restore a
        checkpoint."""
        self.fabric.launch()
        if not self.is_server:
            self.reporter = Reporter(quiet=True)
        # Every rank writes into rank 0's run folder (names with a timestamp differ between processes).
        problem = run_dir_problem(self.run_dir, self.resume) if self.is_server else None
        claim = broadcast_from_server(self.fabric, {"run_dir": str(self.run_dir), "error": problem})
        if claim["error"]:
            raise FedDyMemError(claim["error"]) if self.is_server else PeerFailure(claim["error"])
        self.run_dir = Path(claim["run_dir"])
        self.checkpoints = RunCheckpoints(self.run_dir, self.cfg.checkpoint.keep.value)
        self.run_report = RunReporter(self.cfg, self.run_dir, self.reporter, self.fabric.loggers, self.fabric.log_dict)
        self.fabric.seed_everything(self.cfg.seed)
        plan = plan_data(self.cfg)  # cheap listing on every rank; decoding only of this rank's clients
        self.all_clients = plan.clients
        mine = clients_of_rank(len(plan.clients), self.fabric.global_rank, self.fabric.world_size)
        with self.reporter.bars():
            verified = verify_plan(plan, mine, progress=self.reporter.task)
        for warning in verified.warnings:
            self.reporter.warn(warning)
        # After the images (a broken file is the first thing to fix), with the reduce the strategy really uses.
        reduce = self.strategy.memory_settings().method
        check_memory_images(self.cfg, plan, reduce, pooled=self.strategy.pooled)
        if self.is_server:
            claim_output_dir(self.run_dir, "run folder")
            if not self.resume:
                atomic_write_text(self.run_dir / "config.yaml", to_yaml(self.cfg))
        clients = build_clients(self.cfg, plan.clients, mine, self.strategy, self.fabric.setup)
        self.cache = self.shared_cache or make_feature_cache(
            self.cfg, clients, self.fabric.device, progress=self.reporter.task
        )
        loaders = Loaders(self.cfg, self.cache)
        evaluator = Evaluator(self.cfg, loaders, self.fabric.device)
        self.runner = ClientRunner(
            self.cfg, self.strategy, clients, loaders, evaluator, self.fabric.backward, self.reporter.task
        )
        if self.is_server:
            self.server = Server(self.cfg, self.strategy, [len(c.train) for c in plan.clients])
        if self.resume:
            self.restore(self.checkpoints.read())

    def run_round(self, round_idx: int) -> dict[str, Any] | None:
        """One round on every rank; the round's stored record on rank 0, ``None`` elsewhere."""
        start = time.perf_counter()
        local = [self.runner.run_round(c, round_idx) for c in self.runner.training_clients()]
        gathered = gather_to_server(self.fabric, local)
        reply, results = ServerReply(), []
        if self.server is not None and gathered is not None:
            results = [r for rank_results in gathered for r in rank_results]
            reply = self.server.step(results, round_idx)
        reply = broadcast_from_server(self.fabric, reply)
        if reply.error:
            raise TooFewClients(reply.error) if self.is_server else PeerFailure(reply.error)
        update_seconds = self.runner.apply(reply)
        tested = test_set_scored(self.cfg, round_idx)
        evaluations = [self.runner.evaluate(c, round_idx, tested, update_seconds[c.id]) for c in self.clients]
        gathered_eval = gather_to_server(self.fabric, evaluations)
        if self.server is None or gathered_eval is None:
            return None
        evaluations = [e for rank_evals in gathered_eval for e in rank_evals]
        record = self.server.record(round_idx, reply, results, evaluations, self.cfg.threshold_k_sigma or None)
        record.time_s = time.perf_counter() - start
        record.cache = {
            "extraction_s": self.cache.stats.extraction_seconds,
            "saved_s": self.cache.stats.saved_seconds,
            "bytes": self.cache.nbytes,
        }
        self.run_report.log_panels(round_idx, {e.client_id: e.panel for e in evaluations})
        rows = [(e.client_id, *row) for e in evaluations if e.test for row in e.test.scores]
        if rows:  # per-image scores of the latest scored round, for ROC curves (feddymem report)
            self.run_report.write_scores(rows)
        return record.to_dict()

    def final_evaluation(self) -> dict[int, dict[str, Any]]:
        """Test metrics of every client's kept state whose round was not scored on the test set (on rank 0)."""
        untested = [c for c in self.clients if c.kept and not test_set_scored(self.cfg, c.kept.round)]
        local = {c.id: self.runner.test_kept(c) for c in untested}
        gathered = gather_to_server(self.fabric, local)
        if gathered is None:
            return {}
        tested = {k: v for part in gathered for k, v in part.items()}
        results = {k: metrics for k, (metrics, _) in tested.items()}
        if self.history:  # the kept states' anomaly maps, at the last round (W&B)
            self.run_report.log_panels(self.history[-1]["round"], {k: panel for k, (_, panel) in tested.items()})
        rows = [(cid, *row) for cid, metrics in results.items() for row in metrics.scores]
        if rows:  # the kept states' per-image scores, for ROC curves (feddymem report)
            self.run_report.write_scores(rows)
        return {cid: metrics.to_dict() for cid, metrics in results.items()}

    def save(self, round_idx: int) -> None:
        """Atomic checkpoint after a complete round: round, global state, all clients, partition, RNG."""
        gathered = gather_to_server(self.fabric, self.runner.states())
        if self.server is None or gathered is None:
            return
        clients = {}
        for part in gathered:
            for k, state in part.items():
                data = self.all_clients[k]
                clients[k] = {**state, "train": [s.path for s in data.train], "products": data.products}
        kept = kept_record(self.history, self.final_tests)["clients"]
        payload = round_payload(round_idx, self.cfg, self.server.state(), clients, kept, self.history)
        self.checkpoints.write(round_idx, payload, self.summary())

    def restore(self, payload: dict[str, Any]) -> None:
        """Continue after the checkpoint's round: same partition, states, memory and history."""
        self.runner.restore(payload)
        if self.server is not None:
            self.server.restore(payload)
            self.history = list(payload["history"])
        self.start_round = int(payload["round"]) + 1
        torch.set_rng_state(payload["rng"]["torch"])

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` holds: every round's record, each client's kept result, cache statistics."""
        stats = self.cache.stats
        return {
            "run_dir": str(self.run_dir),
            "method": self.method,
            "world_size": self.fabric.world_size,
            "rounds": self.history,
            "final": final_summary(self.history, self.final_tests),
            "cache": {
                "extracted_images": stats.extracted,
                "extraction_s": stats.extraction_seconds,
                "hits": stats.hits,
                "saved_s": stats.saved_seconds,
                "bytes": self.cache.nbytes,
                "fp16": self.cache.fp16,
            },
        }

    def should_stop(self, round_idx: int) -> bool:
        """Early stop (``selection.patience`` > 0): no client has improved its criterion for that many rounds."""
        if self.strategy.single_round:
            return True  # nothing trains: the round-0 memory is the model
        patience = self.cfg.selection.patience
        if patience <= 0 or round_idx >= self.cfg.federation.rounds:
            return False
        stop = None
        if self.is_server:
            latest = max(c.get("kept_round", round_idx) for c in self.history[-1]["clients"].values())
            stop = round_idx - latest >= patience
            if stop:
                self.reporter.print(f"stopping after round {round_idx}: no client improved for {patience} round(s)")
        return bool(broadcast_from_server(self.fabric, stop))

    def run(self) -> dict[str, Any] | None:
        """Set up, run the remaining rounds, checkpoint after each; the summary on rank 0.

        On several processes a user error names the process it happened on; the other processes stop
        with a :class:`PeerFailure`, which the command line does not print."""
        try:
            return self._run()
        except PeerFailure:
            raise
        except FedDyMemError as err:
            if self.fabric.world_size > 1:
                err.args = (f"process {self.fabric.global_rank} of {self.fabric.world_size}: {err}",)
            raise

    def _run(self) -> dict[str, Any] | None:
        self.setup()
        self.reporter.print(
            f"FedDyMem ({self.method}): {len(self.all_clients)} clients on {self.fabric.world_size} process(es), "
            f"rounds {self.start_round}..{self.cfg.federation.rounds}, device {self.fabric.device}, "
            f"run folder {self.run_dir}"
        )
        with self.reporter.bars():
            for round_idx in range(self.start_round, self.cfg.federation.rounds + 1):
                record = self.run_round(round_idx)
                if record is not None:
                    self.history.append(record)
                    self.run_report.log_round(record, tested=test_set_scored(self.cfg, round_idx))
                self.save(round_idx)
                if self.should_stop(round_idx):
                    break
            self.final_tests = self.final_evaluation()
        barrier(self.fabric)
        if self.server is None:
            return None
        if self.final_tests:
            atomic_write_json(self.run_dir / "metrics.json", self.summary())
        self.run_report.log_final(self.history, self.final_tests, self.global_memory)
        self.run_report.finish()
        if self.history:
            self.run_report.print_table(kept_record(self.history, self.final_tests), self.history, self.all_clients)
        return self.summary()
