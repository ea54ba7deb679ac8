"""Where a site's ClientApp runs: in the process Flower starts for each message, or in the site's worker.

Flower starts a fresh ClientApp process for every message a SuperNode receives. Importing torch, Lightning
and the model and building the backbone cost that process seconds before any work, twice a round; on a
machine that hosts several sites, they compete for the same cores. A **site worker**
(``feddymem flower worker --socket PATH``, started beside the SuperNode by the site's operator) imports all
of that once and keeps the run's client runner (backbone, data plan, features in memory) between messages.
With ``worker=PATH`` in the SuperNode's node config, the ClientApp Flower loads (:data:`client_app`, which
imports neither torch nor the model) hands each message and the node's context to that worker over a Unix
socket and returns its reply; without, it runs the handlers itself, as before. Either way the handlers and
the site's egress policy are the same (:mod:`feddymem.flower.apps`), and the node's ``context.state`` stays
the truth that Flower keeps between messages.

The socket is a file on the site's own machine (mode 0600): nothing of the site crosses a network here.
Several sites on one machine may share a worker (the loopback federation's sites do, when the machine has
fewer cores than sites): it keeps a runner per site and runs their messages one at a time, each with the
threads of its node config.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from multiprocessing.connection import Client as connect
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.supercore.task_identity import TaskIdentity

from feddymem.errors import FedDyMemError

if TYPE_CHECKING:
    from feddymem.flower.site import WarmRunners

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 300.0  # a worker that is still starting (imports, a GPU's first context) is waited for


class SiteApp(ClientApp):
    """The ClientApp every SuperNode loads: each message, whatever its type, goes to the site's worker when
    its node config names one (``worker=PATH``), else to :data:`feddymem.flower.apps.client_app` in this
    process."""

    def __call__(self, message: Message, context: Context) -> Message:
        """Handle one message: in the site's worker, or here."""
        if worker := context.node_config.get("worker"):
            return forward(Path(str(worker)), message, context)
        from feddymem.flower.apps import client_app as handlers

        return handlers(message, context)


client_app = SiteApp()


def _send(connection: Connection, header: dict, *frames: bytes) -> None:
    connection.send_bytes(json.dumps(header).encode())
    for frame in frames:
        connection.send_bytes(frame)


def _connect(path: Path, timeout: float) -> Connection:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect(str(path), family="AF_UNIX")
        except (FileNotFoundError, ConnectionRefusedError) as err:
            if time.monotonic() > deadline:
                raise FedDyMemError(
                    f"this site's worker does not answer on {path} ({err}): start it with "
                    f"'feddymem flower worker --socket {path}', or remove worker= from the node config"
                ) from err
            time.sleep(0.2)


def forward(path: Path, message: Message, context: Context, *, timeout: float = CONNECT_TIMEOUT_S) -> Message:
    """``message`` handled by the site worker listening on ``path``: its reply, and ``context.state`` as the
    worker left it (Flower keeps it for the node's next message)."""
    identity = {"task_id": TaskIdentity.task_id, "run_id": TaskIdentity.run_id, "node_id": TaskIdentity.node_id}
    with _connect(path, timeout) as connection:
        _send(connection, identity, message_to_proto(message).SerializeToString(),
              context_to_proto(context).SerializeToString())  # fmt: skip
        try:
            answer = json.loads(connection.recv_bytes())
            if not answer["ok"]:
                raise FedDyMemError(f"site worker: {answer['error']}")
            reply = message_from_proto(ProtoMessage.FromString(connection.recv_bytes()))
            after = context_from_proto(ProtoContext.FromString(connection.recv_bytes()))
        except EOFError as err:
            raise FedDyMemError(f"this site's worker on {path} stopped while handling a '{_kind(message)}'") from err
    context.state = after.state
    return reply


def _kind(message: Message) -> str:
    return str(message.metadata.message_type)


def _handle(connection: Connection, handlers: ClientApp, warm: WarmRunners) -> None:
    """One message from a SuperNode's ClientApp process: run it, answer with the reply and the node state."""
    identity = json.loads(connection.recv_bytes())
    message = message_from_proto(ProtoMessage.FromString(connection.recv_bytes()))
    context = context_from_proto(ProtoContext.FromString(connection.recv_bytes()))
    # The reply is stamped with the identity of the task Flower started for this message.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
        identity["task_id"], identity["run_id"], identity["node_id"])  # fmt: skip
    started = time.monotonic()
    try:
        reply = handlers(message, context)
    except Exception as err:  # answered to the ClientApp process, which reports it to the server
        warm.forget()
        log.warning("'%s' failed: %s", _kind(message), err)
        _send(connection, {"ok": False, "error": f"{type(err).__name__}: {err}"})
        return
    log.info("'%s' handled in %.1f s", _kind(message), time.monotonic() - started)
    _send(connection, {"ok": True}, message_to_proto(reply).SerializeToString(),
          context_to_proto(context).SerializeToString())  # fmt: skip


def _claim_socket(path: Path) -> None:
    """Refuse a socket another worker answers on; remove one a stopped worker left behind."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    try:
        connect(str(path), family="AF_UNIX").close()
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    raise FedDyMemError(f"another site worker already listens on {path}")


def serve(path: Path) -> None:
    """Listen on the Unix socket ``path`` and handle one message at a time until stopped (SIGTERM, Ctrl-C)."""
    from feddymem.flower import site
    from feddymem.flower.apps import client_app as handlers

    _claim_socket(path)
    site.warm_runners = warm = site.WarmRunners()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that the socket file is removed
    old_mask = os.umask(0o177)  # the socket: this user's only
    try:
        # Sites that share a worker (several on one machine) queue here, each message in turn.
        listener = Listener(str(path), family="AF_UNIX", backlog=64)
    finally:
        os.umask(old_mask)
    log.info("site worker ready on %s", path)
    try:
        while True:
            with listener.accept() as connection:
                try:
                    _handle(connection, handlers, warm)
                except (EOFError, BrokenPipeError, ConnectionResetError):  # its SuperNode went away
                    warm.forget()  # Flower did not keep this message's state: neither does the worker
                    log.warning("a ClientApp process left before its reply")
    finally:
        listener.close()
