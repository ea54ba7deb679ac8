"""The typed transport: every message round-trips exactly through arrays, numbers and strings, and a
hostile or broken message is refused with the server's own words, never unpickled."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from feddymem.config import load_config
from feddymem.federation.messages import (
    ClientEvaluation,
    ClientResult,
    ServerLimits,
    ServerReply,
    TestSetMetrics,
    Upload,
)
from feddymem.federation.server import Server
from feddymem.federation.strategies import make_strategy
from feddymem.federation.wire import (
    MalformedMessage,
    decode_evaluation,
    decode_reply,
    decode_result,
    encode_evaluation,
    encode_reply,
    encode_result,
)
from feddymem.memory.reduce import MemoryBank
from feddymem.metrics.threshold import NormalScores

DIM = 8


def _bank(n: int = 5) -> MemoryBank:
    g = torch.Generator().manual_seed(n)
    return MemoryBank(torch.randn(n, DIM, generator=g), torch.rand(n, generator=g) + 1, num_images=3)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def test_a_memory_upload_round_trips_bit_for_bit():
    result = ClientResult(4, Upload(_bank(), 5, 7, releases=4), train_loss=float("nan"), time_s=1.25)
    msg = encode_result(result)
    assert all(isinstance(v, np.ndarray) for v in msg.arrays.values())
    assert all(isinstance(v, int | float) for v in msg.metrics.values())
    assert all(isinstance(v, str) for v in msg.config.values())
    back = decode_result(msg, client_id=4)
    assert torch.equal(back.upload.payload.items, result.upload.payload.items)
    assert torch.equal(back.upload.payload.weights, result.upload.payload.weights)
    assert back.upload.payload.num_images == 3 and back.upload.memory_items == 5 and back.upload.num_images == 7
    assert back.upload.releases == 4  # the server's privacy accounting needs them
    assert decode_result(encode_result(ClientResult(4, Upload(_bank(), 5, 7)))).upload.releases == 0
    assert back.client_id == 4 and math.isnan(back.train_loss) and back.time_s == 1.25 and back.error is None
    assert msg.nbytes == result.upload.payload.nbytes


def test_generator_uploads_failures_and_replies_round_trip():
    params = {"conv.weight": torch.randn(DIM, DIM, 1, 1), "conv.bias": torch.randn(DIM)}
    back = decode_result(encode_result(ClientResult(1, Upload(params))))
    assert set(back.upload.payload) == set(params)
    assert all(torch.equal(back.upload.payload[k], v) for k, v in params.items())
    failed = decode_result(encode_result(ClientResult(2, error="ClientTimeout: client 2 ran past 5s", time_s=5.0)))
    assert failed.upload.payload is None and failed.error == "ClientTimeout: client 2 ran past 5s"
    stats = {"kmeans_objective": 12.5, "uploaded_items": 40, "global_items": 16, "gpu": False, "time_s": 0.01}
    reply = ServerReply([0, 2], memory=torch.randn(16, DIM), stats=stats)
    again = decode_reply(encode_reply(reply))
    assert again.participants == [0, 2] and torch.equal(again.memory, reply.memory) and again.generator is None
    assert again.stats == stats and type(again.stats["gpu"]) is bool and type(again.stats["uploaded_items"]) is int
    averaged = decode_reply(encode_reply(ServerReply([1], generator=params)))
    assert all(torch.equal(averaged.generator[k], v) for k, v in params.items()) and averaged.memory is None
    assert decode_reply(encode_reply(ServerReply(error="round 3: 0 valid uploads"))).error == "round 3: 0 valid uploads"


def test_an_evaluation_round_trips_with_its_test_scores_and_panel():
    test = TestSetMetrics(
        0.75,
        {"magnetic_tile": {"image_auroc": 0.8, "pixel_auroc": 0.9}, "engine_wiring": {"image_auroc": 0.7}},
        0.5,
        image_auroc_raw=0.74,
        pixel_auroc=0.9,
        scores=[("a/x.png", 0, 1.5), ("b/y.png", 1, 3.25)],
    )
    ev = ClientEvaluation(
        3,
        criterion=float("nan"),
        normal=NormalScores.of([1.0, 2.0, 3.5]),
        product_thresholds={"magnetic_tile": 3.4, "engine_wiring": 2.0},
        normalizer={"magnetic_tile": [1.5, 0.25], "engine_wiring": [2.0, 1.0]},
        held_out_time_s=0.1,
        kept_round=2,
        update_time_s=0.01,
        test=test,
        panel=[("a/x.png", np.zeros((4, 9, 3), np.uint8))],
        kept_test=TestSetMetrics(0.7, {"magnetic_tile": {"image_auroc": 0.71}}, 0.25, scores=[("a/x.png", 0, 1.0)]),
    )
    back = decode_evaluation(encode_evaluation(ev))
    # The kept state's test metrics travel beside the round's own, neither overwriting the other.
    assert back.kept_test.to_dict() == ev.kept_test.to_dict() and back.kept_test.scores == ev.kept_test.scores
    assert back.client_id == 3 and math.isnan(back.criterion) and back.kept_round == 2
    assert back.normal == ev.normal and back.normal.count == 3
    assert back.product_thresholds == ev.product_thresholds and back.normalizer == ev.normalizer
    assert back.test.to_dict() == test.to_dict() and back.test.scores == test.scores
    assert back.panel[0][0] == "a/x.png" and np.array_equal(back.panel[0][1], ev.panel[0][1])
    bare = ClientEvaluation(0, 0.9, NormalScores.of([1.0]), {"p": 1.0}, {"p": [0.0, 1.0]}, 0.1)
    plain = decode_evaluation(encode_evaluation(bare))
    assert (
        plain.test is None
        and plain.kept_test is None
        and plain.panel is None
        and all(_same(getattr(plain, k), getattr(bare, k)) for k in ("criterion", "kept_round", "product_thresholds"))
    )


def test_hostile_messages_are_refused_with_the_servers_words():
    limits = ServerLimits(DIM, max_items=100, max_bytes=2**20, global_items=4)
    cfg = load_config(["dataset=shared_industrial", "server.size=4", "federation.min_clients=1"])
    server = Server(cfg, make_strategy(cfg), [3, 3, 3], limits)
    # float64 items: decoded as sent, refused by the same check as under Fabric.
    wide = encode_result(ClientResult(0, Upload(_bank(), 5, 3)))
    wide.arrays["memory.items"] = wide.arrays["memory.items"].astype(np.float64)
    too_many = encode_result(ClientResult(1, Upload(_bank(500), 500, 3)))
    good = encode_result(ClientResult(2, Upload(_bank(), 5, 3)))
    results = [decode_result(m, client_id=k) for k, m in enumerate([wide, too_many, good])]
    reply = server.step(results, round_idx=0)
    assert reply.participants == [2]
    assert "upload of client 0 rejected: dtype must be float32" in results[0].error
    assert "upload of client 1 rejected: 500 items, allowed 1 to 100" in results[1].error
    # One site cannot speak for another; a message without its parts is named for what it lacks.
    with pytest.raises(MalformedMessage, match="a message from client 1 claims to be from client 2"):
        decode_result(good, client_id=1)
    del good.arrays["memory.weights"]
    with pytest.raises(MalformedMessage, match="needs the arrays 'memory.items' and 'memory.weights'"):
        decode_result(good)
    good.config["payload"] = "pickle"
    with pytest.raises(MalformedMessage, match="unknown payload kind 'pickle'"):
        decode_result(good)
