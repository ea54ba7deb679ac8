"""``feddymem flower supernode``: Flower's SuperNode with a paced message poll. The pacing itself, the pinned
flwr's SuperNode module taking it (on a private copy of that module, so no other test sees it), a module it
was not written for left alone, and the command passing every argument to ``flower-supernode``. A real
paced SuperNode runs in the loopback tests (``test_loopback.py``, ``test_site_loss.py``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from feddymem.flower.supernode import FLOWER_IDLE_POLL_S, FLOWER_REPLY_POLL_S, PacedTime, pace


def _recording() -> tuple[PacedTime, list[float]]:
    slept: list[float] = []
    return PacedTime((0.1, 3.0), reply_poll_s=0.05, sleep=slept.append), slept


def test_the_idle_poll_starts_short_and_backs_off_to_flowers_3_s():
    paced, slept = _recording()
    for _ in range(8):
        paced.sleep(FLOWER_IDLE_POLL_S)
    assert slept == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 3.0])
    paced.busy()  # a message came: ask soon again
    paced.sleep(FLOWER_IDLE_POLL_S)
    assert slept[-1] == pytest.approx(0.1)


def test_the_reply_poll_is_short_and_other_sleeps_are_kept():
    paced, slept = _recording()
    paced.sleep(FLOWER_REPLY_POLL_S)
    paced.sleep(1.25)
    assert slept == [0.05, 1.25]
    assert paced.monotonic() <= time.monotonic()  # the rest of the time module is the real one


def _private_copy_of_flowers_supernode_loop() -> types.ModuleType:
    spec = importlib.util.find_spec("flwr.supernode.start_client_internal")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pinned_flowers_supernode_loop_takes_the_pacing():
    module = _private_copy_of_flowers_supernode_loop()
    pull, push = module._pull_and_store_message, module._push_messages
    paced, slept = _recording()
    assert pace(module, paced) == ""
    assert module.time is paced and module._pull_and_store_message is not pull and module._push_messages is not push
    # The loop's own names now go through the pacing: its idle sleep, and a pull that finds nothing.
    module.time.sleep(3)
    module.time.sleep(3)
    assert slept == pytest.approx([0.1, 0.2])
    nothing = module._pull_and_store_message(
        state=None, object_store=None, node_config={}, receive=lambda: None, get_run=None, get_fab=None,
        pull_object=None, confirm_message_received=None, trusted_entities=None,
    )  # fmt: skip
    assert nothing is None and paced.next_wait == pytest.approx(0.4)  # no message: not reset


def test_a_module_it_was_not_written_for_is_left_alone():
    module = types.ModuleType("flwr.supernode.start_client_internal")
    module.time = time
    module._push_messages = lambda *a: None
    problem = pace(module, PacedTime())
    assert "_pull_and_store_message" in problem and module.time is time


def test_the_command_hands_every_argument_to_flower_supernode():
    feddymem = str(Path(sys.executable).parent / "feddymem")
    shown = subprocess.run([feddymem, "flower", "supernode", "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "--superlink" in shown.stdout and "--isolation" in shown.stdout  # flower-supernode's own help
    refused = subprocess.run(
        [feddymem, "flower", "supernode", "--no-such-option"], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0 and "--no-such-option" in refused.stderr
