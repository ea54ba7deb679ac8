"""Flower records for FedDyMem's typed messages: a :class:`~feddymem.federation.wire.WireMessage` is one
``ArrayRecord`` (NumPy arrays, saved without pickle), one ``MetricRecord`` and one ``ConfigRecord``; a
client's persistent state between messages is kept the same way in its node's ``context.state``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from feddymem.federation.client import Client, KeptState
from feddymem.federation.wire import MalformedMessage, WireMessage


def _scalar(value: Any) -> int | float:
    return int(value) if isinstance(value, int | np.integer) and not isinstance(value, bool) else float(value)


def to_records(msg: WireMessage) -> RecordDict:
    """``msg`` as Flower records."""
    return RecordDict(
        {
            # np.array, not np.ascontiguousarray: that would make 0-d arrays 1-d.
            "arrays": ArrayRecord({k: Array(np.array(v, order="C")) for k, v in msg.arrays.items()}),
            "metrics": MetricRecord({k: _scalar(v) for k, v in msg.metrics.items()}),
            "config": ConfigRecord(dict(msg.config)),
        }
    )


def from_records(content: RecordDict) -> WireMessage:
    """The :class:`WireMessage` of a received message's records; anything else in it is ignored."""
    arrays, metrics, config = content.get("arrays"), content.get("metrics"), content.get("config")
    if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, MetricRecord):
        raise MalformedMessage("a FedDyMem message needs an ArrayRecord 'arrays' and a MetricRecord 'metrics'")
    return WireMessage(
        arrays={k: a.numpy() for k, a in arrays.items()},
        metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
        config={k: v for k, v in (config or {}).items() if isinstance(v, str)},
    )


def describe(content: RecordDict) -> dict[str, Any]:
    """What ``content`` holds, record by record, without its numbers: arrays' shapes and types, metrics'
    names, configs' strings (long ones by their length). A site's audit log of its messages."""
    out: dict[str, Any] = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            out[name] = {k: {"shape": list(a.shape), "dtype": str(a.dtype)} for k, a in record.items()}
        elif isinstance(record, MetricRecord):
            out[name] = sorted(record.keys())
        elif isinstance(record, ConfigRecord):
            out[name] = {
                k: v if isinstance(v, str) and len(v) <= 256 else f"<{len(str(v))} chars>" for k, v in record.items()
            }
    return out


def _tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


def _array_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.array(v.detach().cpu().numpy(), order="C")) for k, v in tensors.items()})


def save_client_state(client: Client, state: RecordDict) -> None:
    """The client's model, optimiser state, kept round and FedProx anchor into its node's ``context.state``."""
    state["model"] = _array_record(client.module.trainable_state())
    optimizer = client.optimizer.state_dict()["state"]
    state["optimizer"] = _array_record(
        {f"{index}.{name}": value for index, entry in optimizer.items() for name, value in entry.items()}
    )
    if client.kept is not None:
        state["kept"] = _array_record(client.kept.model)
        state["kept_meta"] = MetricRecord({"round": client.kept.round, "criterion": float(client.kept.criterion)})
    if client.anchor is not None:
        state["anchor"] = _array_record(client.anchor)


def load_client_state(client: Client, state: RecordDict) -> None:
    """Undo :func:`save_client_state` on a freshly built client (nothing to do on a node's first message)."""
    if "model" not in state:
        return
    client.module.load_trainable_state(_tensors(state["model"]))  # type: ignore[arg-type]
    entries: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in _tensors(state["optimizer"]).items():  # type: ignore[arg-type]
        index, name = key.split(".", 1)
        entries.setdefault(int(index), {})[name] = value
    groups = client.optimizer.state_dict()["param_groups"]  # the config's, as on the first message
    client.optimizer.load_state_dict({"state": entries, "param_groups": groups})
    if "kept" in state:
        meta = state["kept_meta"]
        client.kept = KeptState(int(meta["round"]), float(meta["criterion"]), _tensors(state["kept"]))  # type: ignore
    if "anchor" in state:
        client.anchor = _tensors(state["anchor"])  # type: ignore[arg-type]
