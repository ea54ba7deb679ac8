"""The Flower engine in one process, without sockets: the coordinator's messages delivered straight to the
ClientApp (its handlers, records and egress policy included), one node context per site, as a SuperNode
would keep it between messages. For tests that hold the two engines' round loops together
(``tests/flower/test_parity.py``) and for trying a deployment's settings quickly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger(__name__)

COORDINATOR_NODE = 0
RUN_ID = 1


class InProcessGrid:
    """A ``Grid`` whose sites are ``client_app`` called in this process, one :class:`Context` per node."""

    def __init__(self, client_app: ClientApp, node_configs: list[dict[str, Any]]) -> None:
        self.client_app = client_app
        self.contexts = {
            node: Context(run_id=RUN_ID, node_id=node, node_config=dict(config), state=RecordDict(), run_config={})
            for node, config in enumerate(node_configs, start=1)
        }
        self.replies: dict[str, Message] = {}  # message id → its site's reply, until pulled
        self._as(COORDINATOR_NODE)

    @staticmethod
    def _as(node: int) -> None:
        """Flower stamps every new message with the sender's identity, which a real process sets once."""
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, node, 1

    def get_node_ids(self) -> list[int]:
        """The sites' node ids."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Each message handled by its site in turn (a handler that raises answers with an error, as a
        SuperNode's ClientApp process does); their ids, as Flower gives them."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message_id = message.object_id
            node = message.metadata.dst_node_id
            self._as(node)
            try:
                reply = self.client_app(message=message, context=self.contexts[node])
            except Exception as err:  # the SuperNode's answer to a failed ClientApp
                log.warning("site %d: %s", node, err)
                reply = Message(Error(code=0, reason=f"{type(err)}:<'{err}'>"), reply_to=message)
            finally:
                self._as(COORDINATOR_NODE)
            self.replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies to ``message_ids`` (each handed out once)."""
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def run_in_process(cfg: Any, run_dir: Path, node_configs: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole Flower run of ``cfg`` in this process (one site per entry of ``node_configs``, each running
    FedDyMem's ClientApp handlers); its summary."""
    from feddymem.config import to_yaml
    from feddymem.flower.apps import client_app as handlers
    from feddymem.flower.coordinator import FlowerServerRun

    grid = InProcessGrid(handlers, node_configs)
    run_config: dict[str, bool | float | int | str] = {"config-yaml": to_yaml(cfg), "run-dir": str(run_dir)}
    context = Context(RUN_ID, COORDINATOR_NODE, node_config={}, state=RecordDict(), run_config=run_config)
    return FlowerServerRun(grid, context).run()
