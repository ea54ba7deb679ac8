"""A site worker: the site's own executor of FedDyMem's ClientApp, beside its SuperNode.

By default Flower runs a ClientApp the costly way: the SuperNode starts a SuperExec, which starts a fresh
``flwr-clientapp`` process for every message; that process installs the app bundle, imports torch, Lightning
and the model and builds the backbone before any work, twice a round. A **site worker** takes the SuperExec's
place: the SuperNode runs with ``--isolation process`` (it starts no executor of its own) and the worker
(``feddymem flower worker --supernode HOST:PORT``) asks that SuperNode's Runtime API for ClientApp tasks,
runs each one in its own process with FedDyMem's handlers (:data:`feddymem.flower.apps.client_app`, the same
handlers and egress policy as without a worker) and pushes the reply and the node's state back. It imports
everything once and keeps the run's client runner (backbone, data plan, features in memory) between
messages; the node's ``context.state`` stays the truth that Flower keeps between messages.

The Runtime API is the SuperNode's own (``--port``, on 127.0.0.1 by default): nothing of the site crosses
a network here. Several SuperNodes on one machine may share a worker (the loopback federation's do, when
the machine has fewer cores than sites): it keeps a runner per site and runs their messages one at a time,
each with the threads of its node config. A worker runs FedDyMem's ClientApp only: a task of another app
fails with a message that says so.

The worker speaks the Runtime API with Flower's own client functions (``flwr.supernode.runtime``), pinned
with ``flwr==1.42.0``.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from feddymem.errors import FedDyMemError

if TYPE_CHECKING:
    from feddymem.flower.site import WarmRunners

log = logging.getLogger(__name__)

# How often an idle worker asks its SuperNodes for tasks: soon after a task (the next message of a round comes
# within seconds), less and less often while none comes (each poll is a call to the SuperNode, CPU that the
# sites' work needs). The loopback's SuperNodes pace their own polls alike (feddymem.flower.supernode).
TASK_POLL_S = (0.1, 1.0)  # the first wait, the longest
# How long a claimed task's calls are retried while its SuperNode does not answer (then the task is given up and
# the worker serves its other SuperNodes). Flower's own retries wait forever and end the process on a refusal.
TASK_RETRY_S = 60.0
APP_ID = "feddymem/feddymem-flower"  # the Flower app bundle's publisher/name (flower/app/pyproject.toml)


def _runtime_client(address: str, certificates: bytes | None, token: str | None = None) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API at ``address``; with ``token``, for one claimed task (its calls
    retried for :data:`TASK_RETRY_S`), without, to poll for tasks (no retries: a SuperNode that is not up yet,
    or gone, is asked again at the next poll)."""
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        address,
        insecure=certificates is None,
        root_certificates=certificates,
        interceptors=interceptors,
        retry_invoker=_task_retries() if token is not None else None,
    )


def _task_retries() -> RetryInvoker:
    return RetryInvoker(lambda: exponential(max_delay=5), httpx.TransportError, max_tries=None, max_time=TASK_RETRY_S)


def handle(handlers: ClientApp, message: Message, context: Context, warm: WarmRunners) -> tuple[Message, str]:
    """One message through FedDyMem's handlers: the reply and ``""``, or, when they fail, an error reply that
    names the cause (the server logs it) and the cause (the runners are let go: their state may be
    half-changed)."""
    kind = str(message.metadata.message_type)
    started = time.monotonic()
    try:
        reply = handlers(message, context)
    except Exception as err:  # answered to the server, which names the site and the cause
        warm.forget()
        reason = f"site worker: {type(err).__name__}: {err}"
        log.warning("'%s' failed: %s", kind, reason)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message), reason
    log.info("'%s' handled in %.1f s", kind, time.monotonic() - started)
    return reply, ""


def app_problem(fab_id: str) -> str:
    """Why this worker cannot run a task of the app ``fab_id`` (``""``: it can)."""
    if fab_id == APP_ID:
        return ""
    return f"this site worker runs FedDyMem's ClientApp ({APP_ID}) only; the run's app is '{fab_id}'"


def _heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """Flower's task heartbeat, without its exit: a task the SuperNode gave up on ends with its message."""

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.HTTPError:
            return False
        return True

    return beat


def run_task(address: str, token: str, certificates: bytes | None, handlers: ClientApp, warm: WarmRunners) -> None:
    """The claimed task ``token`` of the SuperNode at ``address``: its message and the node's state pulled, the
    handlers run, the reply and the state pushed back."""
    client = _runtime_client(address, certificates, token)
    heartbeat = HeartbeatSender(_heartbeat(client))
    heartbeat.start()
    context: Context | None = None
    status, details = SubStatus.FAILED, "the site worker could not run the task"
    try:
        message, context, run, _ = pull_task_input(client)
        if problem := app_problem(run.fab_id):
            log.warning("%s", problem)
            reply = Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=problem), reply_to=message)
            details = problem
        else:
            reply, details = handle(handlers, message, context, warm)
            status = SubStatus.FAILED if details else SubStatus.COMPLETED
        push_message(client, reply, context)
    except Exception as err:  # the SuperNode went away or refused mid-task: it did not keep this message's state
        warm.forget()
        status, details = SubStatus.FAILED, f"{type(err).__name__}: {err}"
        log.warning("a task of the SuperNode at %s was given up: %s: %s", address, type(err).__name__, err)
    finally:
        try:  # the node's state as the handlers left it; a failed message leaves it as it was
            push_task_output(client, context if status == SubStatus.COMPLETED else None, status, details)
        except Exception as err:  # a SuperNode that is gone cannot be told
            log.warning("the SuperNode at %s was not told how its task ended: %s", address, err)
        finally:
            heartbeat.stop()
            client.close()


def serve(supernodes: list[str], certificates: Path | None = None, poll_s: tuple[float, float] = TASK_POLL_S) -> None:
    """Ask the Runtime API of each SuperNode in ``supernodes`` (``HOST:PORT``) for ClientApp tasks and run
    them one at a time, until stopped (SIGTERM, Ctrl-C). ``certificates``: the CA of Runtime APIs served over
    TLS (``flower-supernode --ssl-certfile``); without, plain HTTP on the site's own machine."""
    from feddymem.flower import site
    from feddymem.flower.apps import client_app as handlers

    if not supernodes:
        raise FedDyMemError("a site worker needs the Runtime API address of at least one SuperNode (--supernode)")
    ca = certificates.read_bytes() if certificates is not None else None
    site.warm_runners = warm = site.WarmRunners()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    pollers = {address: _runtime_client(address, ca) for address in supernodes}
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    unreachable = set(supernodes)
    log.info("site worker ready for the SuperNodes at %s", ", ".join(supernodes))
    wait = poll_s[0]
    try:
        while True:
            claimed = False
            for address, poller in pollers.items():
                try:
                    task = poller.AcquireTask(request)
                except httpx.HTTPError as err:  # not up yet, or restarting: asked again at the next poll
                    if address not in unreachable:
                        log.warning("the SuperNode at %s does not answer (%s): asking again", address, err)
                        unreachable.add(address)
                    continue
                if address in unreachable:
                    unreachable.discard(address)
                    log.info("the SuperNode at %s answers", address)
                if task.HasField("task") and task.token:
                    run_task(address, task.token, ca, handlers, warm)
                    claimed = True
            wait = poll_s[0] if claimed else min(1.5 * wait, poll_s[1])
            if not claimed:
                time.sleep(wait)
    finally:
        for poller in pollers.values():
            poller.close()
