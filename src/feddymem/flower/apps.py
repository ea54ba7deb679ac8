"""FedDyMem as a Flower ServerApp and ClientApp: the same strategies, server checks, K-means, client runner,
checkpoints and reports as the Fabric engine, over Flower's typed records.

Every site runs a SuperNode with ``--node-config "client-id=K"`` (and ``dataset=/path/site.yaml`` when its
data is described there, else the server's ``data`` node is used with client K's share); the coordinator
runs the SuperLink and submits the run with the run config ``config-yaml`` (the whole validated config)
and ``run-dir`` (where the server writes the run folder). Per round the server sends ``train``, checks and
aggregates the uploads, sends its reply with ``evaluate``, and records the round. A ClientApp lives for one
message: its state (generator, optimiser, kept round, memory) is kept in its node's ``context.state``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from feddymem.config import (
    config_from_yaml,
    to_yaml,
)
from feddymem.data.partition import ClientData
from feddymem.errors import ConfigError, FedDyMemError
from feddymem.federation.checkpointing import RunCheckpoints, round_payload
from feddymem.federation.egress import EgressPolicy
from feddymem.federation.evaluation import test_set_scored
from feddymem.federation.messages import ClientEvaluation, ClientResult
from feddymem.federation.reporting import RunReporter, final_summary, kept_record, run_loggers
from feddymem.federation.server import Server, TooFewClients
from feddymem.federation.strategies import make_strategy
from feddymem.federation.wire import (
    MalformedMessage,
    WireMessage,
    decode_evaluation,
    decode_reply,
    decode_result,
    decode_test_metrics,
    encode_evaluation,
    encode_reply,
    encode_result,
    encode_test_metrics,
)
from feddymem.flower.records import from_records, save_client_state, to_records
from feddymem.flower.site import (
    enforce_egress,
    log_feature_cache,
    site_runner,
    site_setup,
    write_site_checkpoint,
)
from feddymem.io import atomic_write_json, atomic_write_text, claim_output_dir
from feddymem.logging.console import Reporter
from feddymem.memory.kmeans import resolve_gpu

log = logging.getLogger(__name__)


server_app = ServerApp()
client_app = ClientApp(mods=[enforce_egress])


# --- the client side: one message at a time ---------------------------------------------------------------
def _number(record: Any, key: str) -> float:
    value = record.get(key) if isinstance(record, MetricRecord) else None
    if not isinstance(value, int | float):
        raise MalformedMessage(f"the message has no number '{key}'")
    return float(value)


def _round(message: Message) -> tuple[int, bool]:
    meta = message.content.get("round")
    return int(_number(meta, "round")), bool(_number(meta, "tested"))


@client_app.query("identify")
def identify(message: Message, context: Context) -> Message:
    """Which client this site is, how many training images it has, and which products."""
    _, client_id, plan, share = site_setup(message.content, dict(context.node_config))
    part = plan.clients[share]
    info = WireMessage(
        metrics={"client_id": client_id, "train_images": len(part.train)},
        config={"products": json.dumps(part.products)},
    )
    return Message(to_records(info), reply_to=message)


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """Local training and the upload of one round."""
    runner = site_runner(message, context)
    round_idx, _ = _round(message)
    result = runner.run_round(runner.clients[0], round_idx)
    save_client_state(runner.clients[0], context.state)
    log_feature_cache(dict(context.node_config), "train", runner)
    policy = EgressPolicy.from_node_config(dict(context.node_config))
    return Message(to_records(encode_result(policy.result(result))), reply_to=message)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Take the server's reply, then the normal-only statistics and (when asked) the test metrics."""
    runner = site_runner(message, context)
    round_idx, tested = _round(message)
    reply = decode_reply(from_records(message.content))
    client = runner.clients[0]
    seconds = runner.apply(reply)
    evaluation = runner.evaluate(client, round_idx, tested, seconds[client.id])
    save_client_state(client, context.state)
    log_feature_cache(dict(context.node_config), "evaluate", runner)
    if out := context.node_config.get("out"):
        write_site_checkpoint(Path(str(out)), runner.cfg, client, evaluation, round_idx, context.state)
    policy = EgressPolicy.from_node_config(dict(context.node_config))
    return Message(to_records(encode_evaluation(policy.evaluation(evaluation))), reply_to=message)


@client_app.query("final")
def final(message: Message, context: Context) -> Message:
    """The test metrics of the client's kept state."""
    runner = site_runner(message, context)
    client = runner.clients[0]
    test = EgressPolicy.from_node_config(dict(context.node_config)).test(runner.test_kept(client)[0])
    log_feature_cache(dict(context.node_config), "final", runner)
    assert test is not None  # test_kept always scores
    return Message(to_records(encode_test_metrics(client.id, test)), reply_to=message)


# --- the server side -----------------------------------------------------------------------------------
class FlowerServerRun:
    """One run on the server: wait for the sites, bind each node to its client id, then the rounds."""

    def __init__(self, grid: Grid, context: Context) -> None:
        run_config = context.run_config
        if "config-yaml" not in run_config or "run-dir" not in run_config:
            raise ConfigError("the run config needs 'config-yaml' and 'run-dir'")
        self.grid, self.yaml = grid, str(run_config["config-yaml"])
        self.cfg = config_from_yaml(self.yaml, "run config 'config-yaml'")
        self.run_dir = Path(str(run_config["run-dir"]))
        self.strategy = make_strategy(self.cfg, server_gpu=resolve_gpu(self.cfg.server.gpu))
        if self.strategy.pooled:
            raise ConfigError(f"method={self.strategy.name} pools every site's images: it cannot run across sites")
        f = self.cfg.federation
        # A round's messages wait as long as the Fabric engine waits for its clients: federation.client_timeout_s,
        # or no limit (a site that goes offline is answered for by the SuperLink with an error reply).
        self.timeout: float | None = float(f.client_timeout_s) if f.client_timeout_s > 0 else None
        self.reporter = Reporter(quiet=self.cfg.quiet)
        self.history: list[dict[str, Any]] = []

    def _message(self, node: int, kind: str, content: dict[str, Any]) -> Message:
        setup = ConfigRecord({"config-yaml": self.yaml})
        return Message(RecordDict({"setup": setup, **content}), dst_node_id=node, message_type=kind)

    def _ask(self, kind: str, content: dict[str, Any]) -> dict[int, Message | str]:
        """Send ``kind`` to every site; each client's reply, or why there is none."""
        messages = [self._message(node, kind, content) for node in self.nodes]
        replies = {m.metadata.src_node_id: m for m in self.grid.send_and_receive(messages, timeout=self.timeout)}
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

    def connect(self) -> None:
        """Wait for one SuperNode per client (``federation.collective_timeout_s``), then bind node ids to clients."""
        wanted, deadline = self.cfg.data.num_clients, time.monotonic() + self.cfg.federation.collective_timeout_s
        while len(nodes := list(self.grid.get_node_ids())) < wanted and time.monotonic() < deadline:
            time.sleep(0.5)
        messages = [self._message(n, "query.identify", {}) for n in nodes]
        self.nodes: dict[int, int] = {}
        sizes: dict[int, int] = {}
        self.products: dict[int, list[str]] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.cfg.federation.collective_timeout_s):
            if reply.has_error():
                log.warning("a SuperNode could not identify itself: %s", reply.error.reason)
                continue
            info = from_records(reply.content)
            client_id, images = int(info.metrics["client_id"]), int(info.metrics["train_images"])
            if client_id in sizes:
                raise FedDyMemError(f"two SuperNodes claim client {client_id}")
            self.nodes[reply.metadata.src_node_id] = client_id
            sizes[client_id] = images
            self.products[client_id] = json.loads(info.config.get("products", "[]"))
        if sorted(sizes) != list(range(wanted)):
            raise FedDyMemError(
                f"{len(sizes)} of {wanted} sites answered within {self.cfg.federation.collective_timeout_s:g}s "
                f"(clients {sorted(sizes)}): every client id 0..{wanted - 1} needs a SuperNode"
            )
        self.server = Server(self.cfg, self.strategy, [sizes[k] for k in range(wanted)])

    def run_round(self, round_idx: int) -> dict[str, Any]:
        """One round across the sites; its stored record."""
        start = time.perf_counter()
        meta = {"round": MetricRecord({"round": round_idx, "tested": int(test_set_scored(self.cfg, round_idx))})}
        results: list[ClientResult] = []
        for client_id, answer in self._ask("train", meta).items():
            try:
                if isinstance(answer, str):
                    raise MalformedMessage(answer)
                results.append(decode_result(from_records(answer.content), client_id=client_id))
            except (MalformedMessage, KeyError, ValueError) as err:
                log.warning("client %d left out of round %d: %s", client_id, round_idx, err)
                results.append(ClientResult(client_id, error=str(err)))
        reply = self.server.step(results, round_idx)
        if reply.error:
            raise TooFewClients(reply.error)
        evaluations: list[ClientEvaluation] = []
        unevaluated: dict[int, str] = {}  # a site gone after its upload: recorded, left out of the thresholds
        for client_id, answer in self._ask("evaluate", {**meta, **to_records(encode_reply(reply))}).items():
            try:
                if isinstance(answer, str):
                    raise MalformedMessage(answer)
                evaluations.append(decode_evaluation(from_records(answer.content)))
            except (MalformedMessage, KeyError, ValueError) as err:
                log.warning("client %d not evaluated in round %d: %s", client_id, round_idx, err)
                unevaluated[client_id] = f"evaluation: {err}"
        if not evaluations:
            raise FedDyMemError(f"round {round_idx}: no site sent its evaluation ({unevaluated})")
        evaluations.sort(key=lambda e: e.client_id)
        record = self.server.record(round_idx, reply, results, evaluations, self.cfg.threshold_k_sigma or None)
        for client_id, error in unevaluated.items():
            line = record.clients[client_id]
            line.error = f"{line.error}; {error}" if line.error else error
        record.time_s = time.perf_counter() - start
        self.report.log_panels(round_idx, {e.client_id: e.panel for e in evaluations})
        rows = [(e.client_id, *row) for e in evaluations if e.test for row in e.test.scores]
        if rows:
            self.report.write_scores(rows)
        return record.to_dict()

    def final_tests(self) -> dict[int, dict[str, Any]]:
        """Test metrics of each client's kept state when its round was not scored."""
        last = self.history[-1]["clients"]
        untested = [c for c in sorted(last) if not test_set_scored(self.cfg, last[c].get("kept_round", 0))]
        if not untested:
            return {}
        out, rows = {}, []
        for client_id, answer in self._ask("query.final", {}).items():
            if client_id not in untested or isinstance(answer, str):
                continue
            cid, test = decode_test_metrics(from_records(answer.content))
            out[cid] = test.to_dict()
            rows += [(cid, *row) for row in test.scores]
        if rows:
            self.report.write_scores(rows)
        return out

    def summary(self, final_tests: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """``metrics.json``: as the Fabric engine's, with the engine and the number of sites."""
        return {
            "run_dir": str(self.run_dir),
            "method": self.strategy.name,
            "engine": "flower",
            "sites": len(self.nodes),
            "rounds": self.history,
            "final": final_summary(self.history, final_tests),
        }

    def checkpoint(self, round_idx: int) -> None:
        """The server's part of the run (global memory, history, thresholds): the sites keep their models."""
        kept = kept_record(self.history, {})["clients"]
        clients = {k: {"products": self.products[k]} for k in kept}
        payload = round_payload(round_idx, self.cfg, self.server.state(), clients, kept, self.history)
        self.checkpoints.write(round_idx, {**payload, "engine": "flower"}, self.summary({}))

    def run(self) -> dict[str, Any]:
        """The whole run; the summary written to ``metrics.json``."""
        claim_output_dir(self.run_dir, "run folder")
        atomic_write_text(self.run_dir / "config.yaml", to_yaml(self.cfg))
        loggers = run_loggers(self.cfg, self.run_dir)

        def log_dict(metrics: dict[str, float], step: int) -> None:
            for logger in loggers:
                logger.log_metrics(metrics, step)

        self.report = RunReporter(self.cfg, self.run_dir, self.reporter, loggers, log_dict)
        self.checkpoints = RunCheckpoints(self.run_dir, self.cfg.checkpoint.keep.value)
        self.connect()
        self.reporter.print(
            f"FedDyMem ({self.strategy.name}) over Flower: {len(self.nodes)} sites, "
            f"rounds 0..{self.cfg.federation.rounds}, run folder {self.run_dir}"
        )
        for round_idx in range(self.cfg.federation.rounds + 1):
            self.history.append(self.run_round(round_idx))
            self.report.log_round(self.history[-1], tested=test_set_scored(self.cfg, round_idx))
            self.checkpoint(round_idx)
        final_tests = self.final_tests()
        summary = self.summary(final_tests)
        atomic_write_json(self.run_dir / "metrics.json", summary)
        self.report.log_final(self.history, final_tests, self.server.global_memory)
        self.report.finish()
        self.report.print_table(kept_record(self.history, final_tests), self.history, self._partition())
        return summary

    def _partition(self) -> list[ClientData]:
        return [ClientData(k, products=self.products[k]) for k in sorted(self.products)]


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp: one FedDyMem run."""
    FlowerServerRun(grid, context).run()
