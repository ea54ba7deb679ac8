"""A site worker (``feddymem flower worker``): a real process on a real Unix socket runs a site's messages
as the ClientApp itself would, keeps the run's runner and features in memory between messages, answers a
failed message with its cause and goes on serving."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, RecordDict

from conftest import FAST
from feddymem.config import load_config
from feddymem.errors import FedDyMemError
from feddymem.flower.inprocess import InProcessGrid, run_in_process
from feddymem.flower.worker import _claim_socket, client_app, forward
from run_compare import assert_same_run


@pytest.fixture
def socket_folder():
    folder = Path(tempfile.mkdtemp(prefix="fdmt-"))  # short: a Unix socket's path has at most 107 bytes
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _start_worker(path: Path, log: Path) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "feddymem"), "flower", "worker", "--socket", str(path)]
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def _message_without_config() -> tuple[Message, Context]:
    InProcessGrid._as(1)
    message = Message(RecordDict({"setup": ConfigRecord({"nothing": "here"})}), dst_node_id=1, message_type="train")
    return message, Context(run_id=1, node_id=1, node_config={"client-id": 0}, state=RecordDict(), run_config={})


@pytest.mark.slow
def test_a_site_worker_runs_the_same_rounds_and_keeps_its_features_in_memory(tmp_path, synthetic_yaml, socket_folder):
    cfg = load_config([f"dataset={synthetic_yaml}", "data.num_clients=2", "federation.rounds=2", *FAST])
    cold = [{"client-id": k, "out": str(tmp_path / "cold" / f"site_{k}"), "cache-dir": ""} for k in range(2)]
    run_in_process(cfg, tmp_path / "cold-run", cold)
    sockets = [socket_folder / f"site{k}.sock" for k in range(2)]
    workers = [_start_worker(path, tmp_path / f"worker{k}.log") for k, path in enumerate(sockets)]
    try:
        # A message the handlers refuse: its cause comes back, and the worker serves the next one.
        message, context = _message_without_config()
        with pytest.raises(FedDyMemError, match="site worker: MalformedMessage: .*config-sha"):
            forward(sockets[0], message, context)
        warm = [
            {**site, "out": str(tmp_path / "warm" / f"site_{k}"), "worker": str(sockets[k])}
            for k, site in enumerate(cold)
        ]
        run_in_process(cfg, tmp_path / "warm-run", warm, client_app)
        with pytest.raises(FedDyMemError, match="already listens"):
            _claim_socket(sockets[1])
        assert all(worker.poll() is None for worker in workers)
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(timeout=30)
    assert not any(path.exists() for path in sockets)  # removed when the workers stopped
    summaries = {run: json.loads((tmp_path / f"{run}-run" / "metrics.json").read_text()) for run in ("cold", "warm")}
    assert_same_run(summaries["warm"], summaries["cold"])
    for k in range(2):
        lines = {
            run: [json.loads(line) for line in (tmp_path / run / f"site_{k}" / "features.jsonl").open()]
            for run in ("cold", "warm")
        }
        assert [line["type"] for line in lines["warm"]] == [line["type"] for line in lines["cold"]]
        # Without a worker (and without a disk cache) every message extracts its images again; the worker
        # extracts each image once and serves it from memory afterwards.
        assert all(line["extracted"] > 0 for line in lines["cold"])
        assert lines["warm"][0]["extracted"] > 0
        assert all(line["extracted"] == line["from_disk"] == 0 < line["hits"] for line in lines["warm"][2:])
        assert "handled in" in (tmp_path / f"worker{k}.log").read_text()


def test_a_site_whose_worker_is_not_running_gets_an_error_that_names_its_socket(socket_folder):
    message, context = _message_without_config()
    path = socket_folder / "nobody.sock"
    with pytest.raises(FedDyMemError, match=f"does not answer on {path}.*feddymem flower worker --socket"):
        forward(path, message, context, timeout=0.5)
