"""A site worker (``feddymem flower worker``): the executor of its SuperNodes' ClientApp tasks. A failed message
is answered with its cause (and the runners it kept let go), another app's run is refused, a real worker
process waits for SuperNodes that are not up yet. Its whole path (Runtime API, kept runners, features in
memory, the same run as Fabric's) is the loopback test's (``test_loopback.py``)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, RecordDict

from feddymem.flower.apps import client_app
from feddymem.flower.inprocess import InProcessGrid
from feddymem.flower.local import APP_DIR
from feddymem.flower.site import WarmRunners
from feddymem.flower.worker import APP_ID, app_problem, handle


def _message_without_config() -> tuple[Message, Context]:
    InProcessGrid._as(1)
    message = Message(RecordDict({"setup": ConfigRecord({"nothing": "here"})}), dst_node_id=1, message_type="train")
    return message, Context(run_id=1, node_id=1, node_config={"client-id": 0}, state=RecordDict(), run_config={})


def test_a_failed_message_is_answered_with_its_cause_and_the_kept_runners_let_go():
    message, context = _message_without_config()
    warm = WarmRunners()
    warm.kept[(1, 1)] = (("key",), object())  # a runner kept from an earlier message
    reply, cause = handle(client_app, message, context, warm)
    assert reply.has_error() and reply.error.reason == cause
    assert cause.startswith("site worker: MalformedMessage:") and "config-sha" in cause
    assert warm.kept == {}  # its state may be half-changed: rebuilt at the next message


def test_a_worker_runs_feddymems_app_only():
    app = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    assert f"{app['tool']['flwr']['app']['publisher']}/{app['project']['name']}" == APP_ID
    assert app_problem(APP_ID) == ""
    problem = app_problem("someone/another-app")
    assert "someone/another-app" in problem and APP_ID in problem


def test_a_worker_waits_for_a_supernode_that_is_not_up_yet(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "worker.log"
    command = [str(Path(sys.executable).parent / "feddymem"), "flower", "worker", "--supernode", f"127.0.0.1:{port}"]
    with log.open("wb") as out:
        worker = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "ready" not in log.read_text() and worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # a few polls of a port that refuses
        assert worker.poll() is None, log.read_text()
        assert f"site worker ready for the SuperNodes at 127.0.0.1:{port}" in log.read_text()
    finally:
        worker.terminate()
        assert worker.wait(timeout=30) == 0  # SIGTERM: a clean stop
    missing = subprocess.run(command[:3], capture_output=True, text=True, check=False)
    assert missing.returncode != 0 and "--supernode" in missing.stderr
