"""``feddymem flower supernode``: Flower's SuperNode, answering within a fraction of a second.

``flower-supernode`` (flwr 1.42) asks the SuperLink for a message, and when there is none sleeps a fixed
**3 s** before asking again; once it has handed a message to its ClientApp it looks for the reply every
0.5 s. Each exchange of a round therefore waits up to 3 s before a site starts, and the round waits for the
unluckiest of its sites. This command runs the same SuperNode (same arguments, same code) with a paced
poll instead: soon after a message or a reply (the next message of a round comes within seconds), less and
less often while none comes, never less often than Flower's 3 s; the reply is looked for every 0.05 s (an
in-memory check). Nothing else of the SuperNode changes.

The pacing replaces the ``time`` name and wraps two functions of ``flwr.supernode.start_client_internal``;
it is written for the pinned ``flwr==1.42.0`` and checked against it when it is applied: where that module
differs, the SuperNode runs as Flower ships it and says so.
"""

from __future__ import annotations

import logging
import sys
import time
import types
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

FLOWER_IDLE_POLL_S = 3.0  # what flower-supernode sleeps when the SuperLink had no message for it
FLOWER_REPLY_POLL_S = 0.5  # how often it looks for its ClientApp's reply
MESSAGE_POLL_S = (0.1, 3.0)  # the paced poll: the first wait after a message or a reply, the longest
REPLY_POLL_S = 0.05
BACKOFF = 2.0  # each idle poll waits this much longer than the one before


class PacedTime:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: its fixed sleeps become a paced
    message poll and a short reply poll; every other use of ``time`` is the real module's."""

    def __init__(
        self,
        message_poll_s: tuple[float, float] = MESSAGE_POLL_S,
        reply_poll_s: float = REPLY_POLL_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.first, self.longest = message_poll_s
        self.reply_poll_s = reply_poll_s
        self._sleep = sleep
        self.next_wait = self.first

    def sleep(self, seconds: float) -> None:
        """Flower's 3 s idle sleep waits the paced interval (then the next one is longer); its 0.5 s reply
        poll waits :attr:`reply_poll_s`; any other sleep is left as it is."""
        if seconds == FLOWER_IDLE_POLL_S:
            self._sleep(self.next_wait)
            self.next_wait = min(self.next_wait * BACKOFF, self.longest)
        elif seconds == FLOWER_REPLY_POLL_S:
            self._sleep(self.reply_poll_s)
        else:
            self._sleep(seconds)

    def busy(self) -> None:
        """A message came or a reply went: the next message is likely soon, so ask soon."""
        self.next_wait = self.first

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def pace(module: types.ModuleType, paced: PacedTime) -> str:
    """Pace the SuperNode loop of ``module`` (``flwr.supernode.start_client_internal``) with ``paced``.
    Returns ``""``, or why the module is not the one this was written for (then it is left unchanged)."""
    missing = [name for name in ("time", "_pull_and_store_message", "_push_messages") if not hasattr(module, name)]
    if missing:
        return f"{module.__name__} has no {', '.join(missing)}"
    if module.time is not time:
        return f"{module.__name__}.time is not the time module"
    pull, push = module._pull_and_store_message, module._push_messages

    def pull_and_store_message(*args: Any, **kwargs: Any) -> Any:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            paced.busy()
        return run_id

    def push_messages(*args: Any, **kwargs: Any) -> Any:
        try:
            return push(*args, **kwargs)
        finally:
            paced.busy()

    replaced = {"time": paced, "_pull_and_store_message": pull_and_store_message, "_push_messages": push_messages}
    for name, value in replaced.items():  # the SuperNode loop's module globals
        setattr(module, name, value)
    return ""


def main(argv: list[str] | None = None) -> None:
    """Run ``flower-supernode`` with ``argv`` (default: this process's arguments), its polls paced."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    if problem := pace(start_client_internal, PacedTime()):
        print(f"feddymem flower supernode: {problem}; Flower's own 3 s poll is kept", file=sys.stderr)
    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()
