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

from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig

from feddymem.config import to_yaml
from feddymem.data.check import check_memory_images, plan_data, verify_plan
from feddymem.data.feature_cache import FeatureCache
from feddymem.data.partition import ClientData
from feddymem.errors import CheckpointError, ConfigError, FedDyMemError, PeerFailure
from feddymem.federation.checkpointing import RunCheckpoints
from feddymem.federation.client import Client, Loaders, build_clients, make_feature_cache
from feddymem.federation.client_runner import ClientRunner
from feddymem.federation.distributed import (
    barrier,
    broadcast_from_server,
    clients_of_rank,
    gather_to_server,
    make_fabric,
)
from feddymem.federation.driver import Panel, RoundDriver, T, test_set_scored
from feddymem.federation.evaluation import Evaluator
from feddymem.federation.messages import ClientEvaluation, ClientResult, ServerReply, TestSetMetrics
from feddymem.federation.reporting import RunReporter, run_loggers
from feddymem.federation.server import Server
from feddymem.federation.strategies import make_strategy
from feddymem.io import atomic_write_text, claim_output_dir, run_dir_problem
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
        self.history: list[dict[str, Any]] = []  # a resumed run's earlier rounds (rank 0)
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
        self.driver = RoundDriver(
            self.cfg,
            FabricTransport(self.fabric, self.runner, self.cache, self.all_clients),
            self.server,
            self.run_report,
            self.checkpoints,
            self.run_dir,
            method=self.method,
            single_round=self.strategy.single_round,
            history=self.history,
            reporter=self.reporter,
        )

    def restore(self, payload: dict[str, Any]) -> None:
        """Continue after the checkpoint's round: same partition, states, memory and history."""
        if (engine := payload.get("engine", "fabric")) != "fabric":
            raise CheckpointError(
                f"{self.checkpoints.last} was written by the {engine} engine: resume it with federation.engine={engine}"
            )
        self.runner.restore(payload)
        if self.server is not None:
            self.server.restore(payload)
            self.history = list(payload["history"])
        self.start_round = int(payload["round"]) + 1
        torch.set_rng_state(payload["rng"]["torch"])

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
        summary = self.driver.run(self.start_round)
        barrier(self.fabric)
        if summary is None:
            return None
        return self.driver.finish(self.global_memory, self.all_clients)


class FabricTransport:
    """The driver's messages as Fabric collectives: every process runs its own clients; rank 0 is the server."""

    engine = "fabric"

    def __init__(
        self, fabric: L.Fabric, runner: ClientRunner, cache: FeatureCache, all_clients: list[ClientData]
    ) -> None:
        self.fabric, self.runner, self.cache, self.all_clients = fabric, runner, cache, all_clients
        self.is_server = fabric.global_rank == 0

    def train(self, round_idx: int, tested: bool) -> list[ClientResult] | None:
        """This process's clients train and upload; all uploads on rank 0."""
        local = [self.runner.run_round(c, round_idx) for c in self.runner.training_clients()]
        gathered = gather_to_server(self.fabric, local)
        return None if gathered is None else [r for rank_results in gathered for r in rank_results]

    def share(self, value: T) -> T:
        """Rank 0's ``value`` on every process."""
        return broadcast_from_server(self.fabric, value)

    def evaluate(
        self, round_idx: int, tested: bool, reply: ServerReply
    ) -> tuple[list[ClientEvaluation], dict[int, str]] | None:
        """This process's clients take the reply and are evaluated; all evaluations on rank 0."""
        seconds = self.runner.apply(reply)
        local = [self.runner.evaluate(c, round_idx, tested, seconds[c.id]) for c in self.runner.clients]
        gathered = gather_to_server(self.fabric, local)
        return None if gathered is None else ([e for part in gathered for e in part], {})

    def test_kept(self, last_record: dict[str, Any] | None) -> dict[int, tuple[TestSetMetrics, Panel]] | None:
        """This process's kept states whose round was not scored, scored now; all on rank 0."""
        cfg = self.runner.cfg
        untested = [c for c in self.runner.clients if c.kept and not test_set_scored(cfg, c.kept.round)]
        gathered = gather_to_server(self.fabric, {c.id: self.runner.test_kept(c) for c in untested})
        return None if gathered is None else {k: v for part in gathered for k, v in part.items()}

    def client_states(self) -> dict[int, dict[str, Any]] | None:
        """Every client's state (generator, optimiser, kept state), its training images and products."""
        gathered = gather_to_server(self.fabric, self.runner.states())
        if gathered is None:
            return None
        clients = {}
        for part in gathered:
            for k, state in part.items():
                data = self.all_clients[k]
                clients[k] = {**state, "train": [s.path for s in data.train], "products": data.products}
        return clients

    def details(self) -> dict[str, Any]:
        """The number of processes and the feature cache's statistics."""
        stats = self.cache.stats
        cache = {"extracted_images": stats.extracted, "extraction_s": stats.extraction_seconds, "hits": stats.hits}
        cache |= {"saved_s": stats.saved_seconds, "bytes": self.cache.nbytes, "fp16": self.cache.fp16}
        return {"world_size": self.fabric.world_size, "cache": cache}
