"""FedDyMem as a Flower ServerApp and ClientApp.

The ServerApp hands the run to ``coordinator.FlowerServerRun``: the same round driver as the Fabric engine
(``federation/driver.py``) over Flower's messages. This module holds the ClientApp's handlers.

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
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from feddymem.federation.driver import test_set_scored
from feddymem.federation.egress import EgressPolicy
from feddymem.federation.wire import (
    MalformedMessage,
    WireMessage,
    decode_reply,
    encode_evaluation,
    encode_result,
    encode_test_metrics,
)
from feddymem.flower.coordinator import FlowerServerRun
from feddymem.flower.records import from_records, save_client_state, to_records
from feddymem.flower.site import (
    enforce_egress,
    log_feature_cache,
    site_runner,
    site_setup,
    write_site_checkpoint,
)

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


def _final(message: Message) -> bool:
    """Whether the server asks for the kept state's test metrics with this evaluation (the run's last)."""
    meta = message.content.get("round")
    return isinstance(meta, MetricRecord) and bool(meta.get("final", 0))


@client_app.query("identify")
def identify(message: Message, context: Context) -> Message:
    """Which client this site is, how many training images it has, and which products."""
    _, client_id, plan, share = site_setup(message.content, dict(context.node_config), context.state)
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
    if _final(message) and not test_set_scored(runner.cfg, evaluation.kept_round):
        evaluation.kept_test = runner.test_kept(client)[0]  # the run's final scoring, one message early
        log_feature_cache(dict(context.node_config), "final", runner)
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


# --- the server side: feddymem.flower.coordinator -----------------------------------------------------------
@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp: one FedDyMem run."""
    FlowerServerRun(grid, context).run()
