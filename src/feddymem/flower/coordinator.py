"""The coordinator's side of the Flower engine: bind each SuperNode to its client id, then the same
:class:`~feddymem.federation.driver.RoundDriver` as the Fabric engine, its messages carried by Flower's Grid.

The first message to a site (``query.identify``) carries the run's config (``config-yaml``), every later one
only its digest (``config-sha``); each message names its round. A site answers ``train`` with
its upload, ``evaluate`` (which carries the server's reply) with its normal-only statistics and, when the
round is tested, its test metrics; ``query.final`` with the test metrics of its kept state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from feddymem.config import config_from_yaml, to_yaml
from feddymem.data.partition import ClientData
from feddymem.errors import CheckpointError, ConfigError, FedDyMemError
from feddymem.federation.checkpointing import RunCheckpoints
from feddymem.federation.driver import Panel, RoundDriver, T, test_set_scored
from feddymem.federation.messages import ClientEvaluation, ClientResult, ServerReply, TestSetMetrics
from feddymem.federation.reporting import RunReporter, run_loggers
from feddymem.federation.server import Server
from feddymem.federation.strategies import make_strategy
from feddymem.federation.wire import (
    MalformedMessage,
    decode_evaluation,
    decode_result,
    decode_test_metrics,
    encode_reply,
)
from feddymem.flower.records import from_records, to_records
from feddymem.io import atomic_write_text, claim_output_dir, run_dir_problem
from feddymem.logging.console import Reporter
from feddymem.memory.kmeans import resolve_gpu

log = logging.getLogger(__name__)

# How often the coordinator asks the SuperLink for replies: soon after a reply came (the sites' replies come in
# bursts), less and less often while none comes (each ask costs the SuperLink and this process CPU that the
# sites' work needs where they share a machine). Flower's own ``Grid.send_and_receive`` asks every 3 s, which
# leaves a round up to 3 s idle after each of its messages' last reply.
REPLY_POLL_S = (0.1, 1.0)  # the first wait, the longest


class MessageGrid(Protocol):
    """What the coordinator needs of Flower's ``Grid`` (a real one, or :mod:`feddymem.flower.inprocess`'s)."""

    def get_node_ids(self) -> Any:
        """The ids of the connected SuperNodes."""

    def push_messages(self, messages: Any) -> Any:
        """Deliver ``messages``; their ids (an empty one for a message that was refused)."""

    def pull_messages(self, message_ids: Any) -> Any:
        """The replies to ``message_ids`` that have arrived."""


def exchange(grid: MessageGrid, messages: list[Message], timeout: float | None) -> list[Message]:
    """Deliver ``messages`` and collect the replies that come back within ``timeout`` (``None``: until all have)."""
    pending = {message_id for message_id in grid.push_messages(messages) if message_id}
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    wait, longest = REPLY_POLL_S
    while pending:
        pulled = list(grid.pull_messages(pending))
        replies.extend(pulled)
        pending.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
        if pending and deadline is not None and time.monotonic() >= deadline:
            break
        if pending:
            wait = REPLY_POLL_S[0] if pulled else min(1.5 * wait, longest)
            time.sleep(wait)
    return replies


class FlowerTransport:
    """The driver's messages over Flower: one message per site and step, the replies decoded."""

    engine = "flower"
    is_server = True

    def __init__(self, grid: MessageGrid, cfg: Any, yaml: str, timeout: float | None) -> None:
        self.grid, self.cfg, self.yaml, self.timeout = grid, cfg, yaml, timeout
        self.config_sha = hashlib.sha256(yaml.encode()).hexdigest()
        self.nodes: dict[int, int] = {}  # node id → client id
        self.products: dict[int, list[str]] = {}  # client id → its products
        self.sizes: dict[int, int] = {}  # client id → its training images
        self.resumed_round: int | None = None  # a resumed run: the round the sites restore their state from
        self.kept_tests: dict[int, TestSetMetrics] = {}  # sent with the last round's evaluations

    def connect(self) -> None:
        """Wait for one SuperNode per client (``federation.collective_timeout_s``), then bind node ids to clients."""
        wanted, wait = self.cfg.data.num_clients, self.cfg.federation.collective_timeout_s
        deadline = time.monotonic() + wait
        while len(nodes := list(self.grid.get_node_ids())) < wanted and time.monotonic() < deadline:
            time.sleep(0.5)
        messages = [self.message(n, "query.identify", {}) for n in nodes]
        for reply in exchange(self.grid, messages, wait):
            if reply.has_error():
                log.warning("a SuperNode could not identify itself: %s", reply.error.reason)
                continue
            info = from_records(reply.content)
            client_id, images = int(info.metrics["client_id"]), int(info.metrics["train_images"])
            if client_id in self.sizes:
                raise FedDyMemError(f"two SuperNodes claim client {client_id}")
            self.nodes[reply.metadata.src_node_id] = client_id
            self.sizes[client_id] = images
            self.products[client_id] = json.loads(info.config.get("products", "[]"))
        if sorted(self.sizes) != list(range(wanted)):
            raise FedDyMemError(
                f"{len(self.sizes)} of {wanted} sites answered within {wait:g}s (clients {sorted(self.sizes)}): "
                f"every client id 0..{wanted - 1} needs a SuperNode"
            )

    def message(self, node: int, kind: str, content: dict[str, Any]) -> Message:
        """A message to ``node``: the run's config (whole in ``query.identify``, else its digest), and in a
        resumed run the round its sites restore."""
        setup: dict[str, Any] = {"config-sha": self.config_sha}
        if kind == "query.identify":  # the site keeps it for the run's later messages
            setup["config-yaml"] = self.yaml
        records = {"setup": ConfigRecord(setup), **content}
        if self.resumed_round is not None:
            records["resume"] = MetricRecord({"round": self.resumed_round})
        return Message(RecordDict(records), dst_node_id=node, message_type=kind)

    def ask(self, kind: str, content: dict[str, Any]) -> dict[int, Message | str]:
        """Send ``kind`` to every site; each client's reply, or why there is none."""
        messages = [self.message(node, kind, content) for node in self.nodes]
        replies = {m.metadata.src_node_id: m for m in exchange(self.grid, messages, self.timeout)}
        out: dict[int, Message | str] = {}
        for node, client_id in self.nodes.items():
            reply = replies.get(node)
            if reply is None:
                out[client_id] = f"ClientTimeout: client {client_id} sent nothing within {self.timeout}s"
            elif reply.has_error():
                out[client_id] = f"ClientError: client {client_id}: {reply.error.reason}"
            else:
                out[client_id] = reply
        return out

    @staticmethod
    def _round(round_idx: int, tested: bool) -> dict[str, Any]:
        return {"round": MetricRecord({"round": round_idx, "tested": int(tested)})}

    def train(self, round_idx: int, tested: bool) -> list[ClientResult]:
        """Every site's upload; an error result (and a warning) for a site that sent none or a bad one."""
        results = []
        for client_id, answer in self.ask("train", self._round(round_idx, tested)).items():
            try:
                if isinstance(answer, str):
                    raise MalformedMessage(answer)
                results.append(decode_result(from_records(answer.content), client_id=client_id))
            except (MalformedMessage, KeyError, ValueError) as err:
                log.warning("client %d left out of round %d: %s", client_id, round_idx, err)
                results.append(ClientResult(client_id, error=str(err)))
        return results

    def share(self, value: T) -> T:
        """Only the coordinator runs the driver: nothing to share."""
        return value

    def evaluate(
        self, round_idx: int, tested: bool, reply: ServerReply
    ) -> tuple[list[ClientEvaluation], dict[int, str]]:
        """The reply to every site, and their evaluations; why a site sent none."""
        evaluations, unevaluated = [], {}
        content = {**self._round(round_idx, tested), **to_records(encode_reply(reply))}
        # The run's last round: each site sends its kept state's test metrics with its evaluation (where that
        # state's round was not scored), one exchange fewer than asking for them afterwards.
        content["round"]["final"] = int(round_idx == self.cfg.federation.rounds)
        for client_id, answer in self.ask("evaluate", content).items():
            try:
                if isinstance(answer, str):
                    raise MalformedMessage(answer)
                evaluations.append(evaluation := decode_evaluation(from_records(answer.content)))
                if evaluation.kept_test is not None:
                    self.kept_tests[client_id] = evaluation.kept_test
            except (MalformedMessage, KeyError, ValueError) as err:
                log.warning("client %d not evaluated in round %d: %s", client_id, round_idx, err)
                unevaluated[client_id] = f"evaluation: {err}"
        return evaluations, unevaluated

    def test_kept(self, last_record: dict[str, Any] | None) -> dict[int, tuple[TestSetMetrics, Panel]]:
        """The test metrics of every site whose kept round was not scored (no panels): sent with the last
        round's evaluation, else (an early stop, a site that did not send them) asked for now."""
        clients = (last_record or {}).get("clients", {})
        untested = {int(c) for c, line in clients.items() if not test_set_scored(self.cfg, line.get("kept_round", 0))}
        out: dict[int, tuple[TestSetMetrics, Panel]] = {
            cid: (test, None)
            for cid, test in self.kept_tests.items()
            if cid in untested and last_record is not None and last_record["round"] == self.cfg.federation.rounds
        }
        if not (untested - set(out)):
            return out
        for client_id, answer in self.ask("query.final", {}).items():
            if client_id not in untested or client_id in out:
                continue
            if isinstance(answer, str):
                log.warning("client %d's kept state was not scored: %s", client_id, answer)
                continue
            cid, test = decode_test_metrics(from_records(answer.content))
            out[cid] = (test, None)
        return out

    def client_states(self) -> dict[int, dict[str, Any]]:
        """The sites keep their models: the checkpoint holds their products only."""
        return {k: {"products": self.products[k]} for k in sorted(self.products)}

    def details(self) -> dict[str, Any]:
        """The number of sites."""
        return {"sites": len(self.nodes)}


class FlowerServerRun:
    """One run on the coordinator: wait for the sites, bind each node to its client id, then the rounds."""

    def __init__(self, grid: MessageGrid, context: Context) -> None:
        run_config = context.run_config
        if "config-yaml" not in run_config or "run-dir" not in run_config:
            raise ConfigError("the run config needs 'config-yaml' and 'run-dir'")
        yaml = str(run_config["config-yaml"])
        self.cfg = config_from_yaml(yaml, "run config 'config-yaml'")
        self.run_dir = Path(str(run_config["run-dir"]))
        self.strategy = make_strategy(self.cfg, server_gpu=resolve_gpu(self.cfg.server.gpu))
        if self.strategy.pooled:
            raise ConfigError(f"method={self.strategy.name} pools every site's images: it cannot run across sites")
        f = self.cfg.federation
        # A round's messages wait as long as the Fabric engine waits for its clients: federation.client_timeout_s,
        # or no limit (a site that goes offline is answered for by the SuperLink with an error reply).
        timeout = float(f.client_timeout_s) if f.client_timeout_s > 0 else None
        self.transport = FlowerTransport(grid, self.cfg, yaml, timeout)
        self.reporter = Reporter(quiet=self.cfg.quiet)

    def run(self) -> dict[str, Any]:
        """The whole run (or, with ``resume``, its remaining rounds); the summary written to ``metrics.json``."""
        resume = bool(self.cfg.resume)
        if problem := run_dir_problem(self.run_dir, resume):
            raise FedDyMemError(problem)
        claim_output_dir(self.run_dir, "run folder")
        if not resume:
            atomic_write_text(self.run_dir / "config.yaml", to_yaml(self.cfg))
        loggers = run_loggers(self.cfg, self.run_dir)

        def log_dict(metrics: dict[str, float], step: int) -> None:
            for logger in loggers:
                logger.log_metrics(metrics, step)

        report = RunReporter(self.cfg, self.run_dir, self.reporter, loggers, log_dict)
        self.transport.connect()
        server = Server(self.cfg, self.strategy, [self.transport.sizes[k] for k in range(len(self.transport.sizes))])
        checkpoints = RunCheckpoints(self.run_dir, self.cfg.checkpoint.keep.value)
        history, start = [], 0
        if resume:  # the coordinator's part from its checkpoint; every site restores its own (site.restore_site)
            payload = checkpoints.read()
            if payload.get("engine") != "flower":
                raise CheckpointError(
                    f"{checkpoints.last} was written by the {payload.get('engine', 'fabric')} engine: resume it "
                    f"with federation.engine={payload.get('engine', 'fabric')}"
                )
            server.restore(payload)
            history, start = list(payload["history"]), int(payload["round"]) + 1
            self.transport.resumed_round = int(payload["round"])
        self.reporter.print(
            f"FedDyMem ({self.strategy.name}) over Flower: {len(self.transport.nodes)} sites, "
            f"rounds {start}..{self.cfg.federation.rounds}, run folder {self.run_dir}"
        )
        driver = RoundDriver(
            self.cfg,
            self.transport,
            server,
            report,
            checkpoints,
            self.run_dir,
            method=self.strategy.name,
            single_round=self.strategy.single_round,
            history=history,
            reporter=self.reporter,
        )
        driver.run(start)
        partition = [ClientData(k, products=p) for k, p in sorted(self.transport.products.items())]
        return driver.finish(server.global_memory, partition)
