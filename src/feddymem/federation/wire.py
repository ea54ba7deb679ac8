"""Typed transport for engines whose peers do not trust each other: the round's messages as plain NumPy
arrays, numeric metrics and strings, never pickles.

A :class:`WireMessage` maps one-to-one onto Flower's ``ArrayRecord`` / ``MetricRecord`` / ``ConfigRecord``
(``feddymem.flower``), and onto any other transport that carries arrays and scalars. Decoding never runs
code and never trusts the sender: a result whose arrays are missing or odd decodes to an upload that the
server's checks refuse with the same messages as under Fabric (wrong dtype, shape, non-finite values), or
to a result with an ``error``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from feddymem.federation.messages import ClientEvaluation, ClientResult, ServerReply, TestSetMetrics, Upload
from feddymem.memory.reduce import MemoryBank
from feddymem.metrics.threshold import NormalScores

Scalar = int | float
_GENERATOR = "generator."
_SEP = "/"


@dataclass
class WireMessage:
    """What crosses the wire: named arrays, numeric metrics, and strings."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, Scalar] = field(default_factory=dict)
    config: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what the byte counts of a round measure)."""
        return sum(int(a.nbytes) for a in self.arrays.values())


class MalformedMessage(ValueError):
    """A message that lacks what its kind needs; the text says what."""


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True))


def _put_tensors(arrays: dict[str, np.ndarray], prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    for name, value in tensors.items():
        arrays[prefix + name] = value.detach().cpu().numpy()


def _take_tensors(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: _tensor(v) for k, v in arrays.items() if k.startswith(prefix)}


def _metric(metrics: dict[str, Scalar], key: str, kind: type = float) -> Any:
    if key not in metrics:
        raise MalformedMessage(f"metric '{key}' is missing")
    value = metrics[key]
    if kind is int:
        if isinstance(value, bool) or not float(value).is_integer():
            raise MalformedMessage(f"metric '{key}' must be an integer, got {value!r}")
        return int(value)
    return float(value)


def _optional(metrics: dict[str, Scalar], key: str, kind: type = float) -> Any:
    return _metric(metrics, key, kind) if key in metrics else None


# --- client → server ---------------------------------------------------------------------------------
def encode_result(result: ClientResult) -> WireMessage:
    """A client's round: its upload's arrays, its numbers, and its error if it failed."""
    msg = WireMessage()
    payload = result.upload.payload
    if isinstance(payload, MemoryBank):
        _put_tensors(msg.arrays, "memory.", payload.tensors())
        msg.config["payload"] = "memory"
        msg.metrics["num_images_in_bank"] = payload.num_images
    elif isinstance(payload, dict):
        _put_tensors(msg.arrays, _GENERATOR, payload)
        msg.config["payload"] = "generator"
    msg.metrics.update(client_id=result.client_id, train_loss=result.train_loss, time_s=result.time_s)
    for key in ("memory_items", "num_images"):
        if (value := getattr(result.upload, key)) is not None:
            msg.metrics[key] = value
    if result.upload.releases:
        msg.metrics["releases"] = result.upload.releases
    if result.error is not None:
        msg.config["error"] = result.error
    return msg


def decode_result(msg: WireMessage, client_id: int | None = None) -> ClientResult:
    """The :class:`ClientResult` of ``msg``. ``client_id``: the id the server knows the sender by (its node's
    configured id); a message claiming another id is refused, so one site cannot speak for another."""
    claimed = _metric(msg.metrics, "client_id", int)
    if client_id is not None and claimed != client_id:
        raise MalformedMessage(f"a message from client {client_id} claims to be from client {claimed}")
    kind = msg.config.get("payload")
    payload: MemoryBank | dict[str, torch.Tensor] | None = None
    if kind == "memory":
        if "memory.items" not in msg.arrays or "memory.weights" not in msg.arrays:
            raise MalformedMessage("a memory upload needs the arrays 'memory.items' and 'memory.weights'")
        payload = MemoryBank(
            _tensor(msg.arrays["memory.items"]),
            _tensor(msg.arrays["memory.weights"]),
            _metric(msg.metrics, "num_images_in_bank", int),
        )
    elif kind == "generator":
        payload = _take_tensors(msg.arrays, _GENERATOR)
    elif kind is not None:
        raise MalformedMessage(f"unknown payload kind '{kind}'")
    upload = Upload(
        payload,
        _optional(msg.metrics, "memory_items", int),
        _optional(msg.metrics, "num_images", int),
        _optional(msg.metrics, "releases", int) or 0,
    )
    return ClientResult(
        claimed,
        upload,
        train_loss=_metric(msg.metrics, "train_loss"),
        time_s=_metric(msg.metrics, "time_s"),
        error=msg.config.get("error"),
    )


# --- server → clients --------------------------------------------------------------------------------
def encode_reply(reply: ServerReply) -> WireMessage:
    """The server's reply: the global memory or averaged generator, who took part, its statistics."""
    msg = WireMessage()
    if reply.memory is not None:
        msg.arrays["memory"] = reply.memory.detach().cpu().numpy()
    if reply.generator is not None:
        _put_tensors(msg.arrays, _GENERATOR, reply.generator)
    msg.arrays["participants"] = np.asarray(reply.participants, dtype=np.int64)
    for key, value in reply.stats.items():
        msg.metrics[f"stats{_SEP}{key}"] = int(value) if isinstance(value, bool) else value
        if isinstance(value, bool):
            msg.config[f"bool{_SEP}{key}"] = "1"
    if reply.error is not None:
        msg.config["error"] = reply.error
    return msg


def decode_reply(msg: WireMessage) -> ServerReply:
    """The :class:`ServerReply` of ``msg``."""
    stats: dict[str, Any] = {}
    for key, value in msg.metrics.items():
        if key.startswith(f"stats{_SEP}"):
            name = key[len("stats") + 1 :]
            stats[name] = bool(value) if f"bool{_SEP}{name}" in msg.config else value
    generator = _take_tensors(msg.arrays, _GENERATOR)
    return ServerReply(
        participants=[int(i) for i in msg.arrays.get("participants", np.zeros(0, np.int64))],
        memory=_tensor(msg.arrays["memory"]) if "memory" in msg.arrays else None,
        generator=generator or None,
        stats=stats,
        error=msg.config.get("error"),
    )


# --- a client's evaluation -----------------------------------------------------------------------------
def _flat(prefix: str, values: dict[str, Any], out: dict[str, Scalar]) -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            _flat(f"{prefix}{key}{_SEP}", value, out)
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                out[f"{prefix}{key}{_SEP}{i}"] = item
        else:
            out[f"{prefix}{key}"] = value


def _nested(metrics: dict[str, Scalar], prefix: str, depth: int) -> dict[str, Any]:
    """Undo :func:`_flat` for keys under ``prefix`` whose leaf is ``depth`` levels down."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if not key.startswith(prefix):
            continue
        parts = key[len(prefix) :].rsplit(_SEP, depth - 1)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _put_test(msg: WireMessage, test: TestSetMetrics, name: str = "test") -> None:
    m = msg.metrics
    m.update({f"{name}{_SEP}{k}": v for k, v in test.to_dict().items() if isinstance(v, int | float)})
    _flat(f"{name}_products{_SEP}", test.products, m)
    if test.scores:
        paths, labels, scores = zip(*test.scores, strict=True)
        msg.arrays[f"{name}_labels"] = np.asarray(labels, dtype=np.int64)
        msg.arrays[f"{name}_scores"] = np.asarray(scores, dtype=np.float64)
        msg.config.update({f"{name}_path{_SEP}{i}": p for i, p in enumerate(paths)})


def _take_test(msg: WireMessage, name: str = "test") -> TestSetMetrics | None:
    m = msg.metrics
    if f"{name}{_SEP}image_auroc" not in m:
        return None
    count = len(msg.arrays.get(f"{name}_scores", ()))
    paths = [msg.config[f"{name}_path{_SEP}{i}"] for i in range(count)]
    empty = np.zeros(0)
    labels, scores = msg.arrays.get(f"{name}_labels", empty), msg.arrays.get(f"{name}_scores", empty)
    return TestSetMetrics(
        image_auroc=_metric(m, f"{name}{_SEP}image_auroc"),
        products=_nested(m, f"{name}_products{_SEP}", 2),
        eval_time_s=_metric(m, f"{name}{_SEP}eval_time_s"),
        image_auroc_raw=_optional(m, f"{name}{_SEP}image_auroc_raw"),
        pixel_auroc=_optional(m, f"{name}{_SEP}pixel_auroc"),
        aupro=_optional(m, f"{name}{_SEP}aupro"),
        scores=[(p, int(y), float(s)) for p, y, s in zip(paths, labels, scores, strict=True)],
    )


def encode_test_metrics(client_id: int, test: TestSetMetrics) -> WireMessage:
    """A client's test metrics alone (its kept state scored at the end of a run)."""
    msg = WireMessage(metrics={"client_id": client_id})
    _put_test(msg, test)
    return msg


def decode_test_metrics(msg: WireMessage) -> tuple[int, TestSetMetrics]:
    """The (client id, test metrics) of ``msg``."""
    test = _take_test(msg)
    if test is None:
        raise MalformedMessage("test metrics are missing")
    return _metric(msg.metrics, "client_id", int), test


def encode_evaluation(ev: ClientEvaluation) -> WireMessage:
    """A client's evaluation: every statistic as a metric; per-image test scores, their paths and anomaly-map
    panels only where the evaluation holds them (what a site lets leave: :mod:`feddymem.federation.egress`)."""
    msg = WireMessage()
    m = msg.metrics
    _flat(f"normal{_SEP}", vars(ev.normal), m)
    m.update(
        client_id=ev.client_id,
        criterion=ev.criterion,
        held_out_time_s=ev.held_out_time_s,
        kept_round=ev.kept_round,
        update_time_s=ev.update_time_s,
    )
    _flat(f"threshold{_SEP}", ev.product_thresholds, m)
    _flat(f"normalizer{_SEP}", ev.normalizer, m)
    if ev.test is not None:
        _put_test(msg, ev.test)
    if ev.kept_test is not None:
        _put_test(msg, ev.kept_test, "kept_test")
    for i, (path, strip) in enumerate(ev.panel or []):
        msg.arrays[f"panel{_SEP}{i}"] = strip
        msg.config[f"panel_path{_SEP}{i}"] = path
    return msg


def decode_evaluation(msg: WireMessage) -> ClientEvaluation:
    """The :class:`ClientEvaluation` of ``msg``."""
    m = msg.metrics
    normalizer = {p: [v[str(i)] for i in range(len(v))] for p, v in _nested(m, f"normalizer{_SEP}", 2).items()}
    test = _take_test(msg)
    panels = sorted(int(k.rsplit(_SEP, 1)[1]) for k in msg.arrays if k.startswith(f"panel{_SEP}"))
    return ClientEvaluation(
        client_id=_metric(m, "client_id", int),
        criterion=_metric(m, "criterion"),
        normal=NormalScores(
            count=_metric(m, f"normal{_SEP}count", int),
            mean=_metric(m, f"normal{_SEP}mean"),
            std=_metric(m, f"normal{_SEP}std"),
            threshold=_metric(m, f"normal{_SEP}threshold"),
        ),
        product_thresholds=_nested(m, f"threshold{_SEP}", 1),
        normalizer=normalizer,
        held_out_time_s=_metric(m, "held_out_time_s"),
        kept_round=_metric(m, "kept_round", int),
        update_time_s=_metric(m, "update_time_s"),
        test=test,
        panel=[(msg.config[f"panel_path{_SEP}{i}"], msg.arrays[f"panel{_SEP}{i}"]) for i in panels] or None,
        kept_test=_take_test(msg, "kept_test"),
    )
