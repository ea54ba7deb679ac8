"""The server on small synthetic uploads: its reference from the config alone, validation, min_clients,
aggregation and the round's record. No backbone weights, no data set, no engine."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from feddymem.config import load_config
from feddymem.federation.messages import ClientEvaluation, ClientResult, ServerLimits, TestSetMetrics, Upload
from feddymem.federation.server import Server, server_limits
from feddymem.federation.strategies import make_strategy
from feddymem.memory.reduce import MemoryBank
from feddymem.metrics.threshold import NormalScores, normal_threshold
from feddymem.models.backbone import FeatureExtractor
from feddymem.models.generator import MemoryGenerator
from feddymem.privacy.accountant import epsilon

DIM = 8


def _cfg(*overrides):
    return load_config(["dataset=shared_industrial", "server.size=16", "server.kmeans_iters=5", *overrides])


def _limits() -> ServerLimits:
    generator = {"conv.weight": torch.zeros(DIM, DIM, 1, 1), "conv.bias": torch.zeros(DIM)}
    return ServerLimits(DIM, max_items=100, max_bytes=2**20, global_items=16, generator=generator, patch_positions=4)


def _result(client_id: int, centre: float, items: int = 40) -> ClientResult:
    g = torch.Generator().manual_seed(client_id)
    bank = MemoryBank(centre + 0.1 * torch.randn(items, DIM, generator=g), torch.full((items,), 2.0), num_images=3)
    return ClientResult(client_id, Upload(bank, items, 3), train_loss=1.5, time_s=0.1)


@pytest.mark.parametrize(
    "overrides", [[], ["model.generator.reduction=4", "data.crop_size=224", "model.scoring.context=9"]]
)
def test_limits_come_from_the_config_and_match_a_real_model(overrides):
    cfg = _cfg(*overrides)
    limits = server_limits(cfg)
    b, g = cfg.model.backbone, cfg.model.generator
    extractor = FeatureExtractor(b.name, b.layers, "none", b.pool_size)  # real modules, random weights
    generator = MemoryGenerator(extractor.out_channels, g.reduction, g.coord_channels, g.init.value)
    features = extractor(torch.zeros(1, 3, cfg.data.crop_size, cfg.data.crop_size))
    parts = 2 if cfg.model.scoring.context else 1  # patch and context items side by side
    assert limits.memory_dim == parts * generator.out_channels == parts * extractor.out_channels // g.reduction
    assert limits.memory_parts == parts
    assert limits.patch_positions == features.shape[-2] * features.shape[-1]
    assert limits.global_items == cfg.server.size
    assert limits.max_items == max(cfg.server.max_upload_items, cfg.memory.size, limits.patch_positions)
    reference = generator.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in limits.generator.items()} == {
        k: (v.shape, v.dtype) for k, v in reference.items()
    }
    assert all(v.is_meta for v in limits.generator.values())  # no weights were made or read


def test_server_size_0_means_one_item_per_patch_position():
    limits = server_limits(_cfg("server.size=0", "data.crop_size=64"))
    assert limits.global_items == limits.patch_positions == (64 // 8) ** 2


def test_valid_uploads_are_clustered_and_malformed_ones_left_out_with_the_reason():
    server = Server(_cfg("federation.min_clients=2"), make_strategy(_cfg()), [5, 6, 7], _limits())
    good = [_result(0, 0.0), _result(2, 3.0)]
    nan = _result(1, 1.0)
    nan.upload.payload = MemoryBank(torch.full((40, DIM), float("nan")), torch.ones(40), 3)
    reply = server.step([good[1], nan, good[0]], round_idx=0)
    assert reply.error is None and reply.participants == [0, 2]
    assert reply.memory.shape == (16, DIM) and server.global_memory is reply.memory
    assert "upload of client 1 rejected: non-finite" in nan.error and nan.upload.payload is None
    assert nan.upload.memory_items == 40  # what the client built is still recorded
    # Items near both clients' centres: the K-means memory covers every accepted upload.
    assert (reply.memory.mean(dim=1) < 1.5).any() and (reply.memory.mean(dim=1) > 1.5).any()


def test_a_large_site_s_coreset_upload_is_accepted_beyond_the_fixed_item_limit():
    # 1 % of 4 patches per image: 0.04 items per image. Client 1 has 5,000 images, so its honest upload of 200
    # items passes although max_items is 100; client 0 (5 images) sending as much is rejected, naming why.
    limits = replace(_limits(), items_per_image=0.01 * _limits().patch_positions)
    server = Server(_cfg("federation.min_clients=1"), make_strategy(_cfg()), [5, 5000], limits)
    small, large = _result(0, 0.0, items=200), _result(1, 3.0, items=200)
    accepted = server.accept([small, large], round_idx=0)
    assert [r.client_id for r in accepted] == [1]
    assert "upload of client 0 rejected: 200 items, allowed 1 to 100" in small.error
    assert server_limits(_cfg("memory.coreset_ratio=0.02")).items_per_image == 0.02 * (224 // 8) ** 2


def test_too_few_valid_uploads_is_a_reply_with_an_error_not_an_exception():
    server = Server(_cfg("federation.min_clients=2"), make_strategy(_cfg()), [5, 6], _limits())
    wide = _result(1, 0.0)
    wide.upload.payload = MemoryBank(torch.zeros(3, DIM + 1), torch.ones(3), 3)
    failed = ClientResult(0, error="RuntimeError: disk lost")
    reply = server.step([failed, wide], round_idx=4)
    assert reply.memory is None and server.global_memory is None
    assert reply.error.startswith("round 4: 0 valid uploads, federation.min_clients is 2 (RuntimeError: disk lost;")
    assert f"items must be (M, {DIM})" in reply.error


def test_fedavg_server_checks_parameter_shapes_against_its_reference():
    strategy = make_strategy(_cfg("method=fedavg"))
    server = Server(_cfg("method=fedavg", "federation.min_clients=1"), strategy, [1, 3], _limits())
    ok = {"conv.weight": torch.ones(DIM, DIM, 1, 1), "conv.bias": torch.ones(DIM)}
    bad = {"conv.weight": torch.ones(DIM, DIM + 2, 1, 1), "conv.bias": torch.ones(DIM)}
    results = [ClientResult(0, Upload(bad)), ClientResult(1, Upload(ok))]
    reply = server.step(results, round_idx=1)
    assert reply.participants == [1] and torch.equal(server.global_generator["conv.weight"], ok["conv.weight"])
    assert "'conv.weight' is (8, 10, 1, 1)" in results[0].error


def test_the_round_record_holds_every_client_bytes_and_thresholds():
    server = Server(_cfg("federation.min_clients=1"), make_strategy(_cfg()), [5, 6, 7], _limits())
    results = [_result(0, 0.0), ClientResult(1, error="ClientTimeout: client 1 ran past 5s", time_s=5.0)]
    reply = server.step(results, round_idx=2)
    normal = [np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0]), np.array([6.0])]
    test = TestSetMetrics(0.75, {"p": {"image_auroc": 0.75}}, 0.2, pixel_auroc=0.9)
    evaluations = [
        ClientEvaluation(
            k, 0.5 + 0.1 * k, NormalScores.of(normal[k]), {"p": 1.0}, {}, 0.01, kept_round=k, test=test if k else None
        )
        for k in range(3)
    ]
    record = server.record(2, reply, results, evaluations, None).to_dict()
    c0, c1, c2 = (record["clients"][k] for k in range(3))
    assert c0["uploaded"] and c0["bytes_up"] == 40 * DIM * 4 + 40 * 4 and c0["train_loss"] == 1.5
    assert c0["memory_items"] == 40 and c0["memory_patches"] == 3 * 4
    assert not c1["uploaded"] and c1["bytes_up"] == 0 and "train_loss" not in c1 and "ClientTimeout" in c1["error"]
    assert "time_s" in c2 and c2["time_s"] == 0.0 and "memory_items" not in c2  # took no part in the round
    down = 16 * DIM * 4
    assert {c["bytes_down"] for c in record["clients"].values()} == {down} and record["bytes_down"] == 3 * down
    assert record["bytes_up"] == c0["bytes_up"] and record["participants"] == [0]
    assert c1["threshold"] == normal_threshold(normal[1], 99.0)
    # One threshold for all from the sites' summaries (no site sends its scores): thresholds by count.
    own = [normal_threshold(n, 99.0) for n in normal]
    assert record["threshold"] == pytest.approx((3 * own[0] + 2 * own[1] + own[2]) / 6)
    assert "image_auroc" not in c0 and c1["image_auroc"] == 0.75 and c1["pixel_auroc"] == 0.9 and "aupro" not in c1
    assert np.isclose(record["mean_image_auroc"], np.nan, equal_nan=True)  # client 0 was not tested
    assert record["mean_criterion"] == pytest.approx(0.6)


def test_noisy_uploads_are_accounted_per_client_over_rounds_and_after_a_resume():
    noisy = ("memory.reduce=cluster_mean", "privacy.noise_multiplier=2", "privacy.delta=1e-6")
    cfg = _cfg("federation.min_clients=1", *noisy)
    server = Server(cfg, make_strategy(cfg), [5, 6], _limits())
    history = []
    for round_idx in range(2):
        results = [_result(0, 0.0), _result(1, 3.0)]
        results[0].upload.releases = 4
        if round_idx == 1:  # a rejected upload was still seen by the server: it counts
            results[1].upload.payload = MemoryBank(torch.full((40, DIM), float("nan")), torch.ones(40), 3)
            results[1].upload.releases = 3
        reply = server.step(results, round_idx=round_idx)
        evaluations = [ClientEvaluation(k, 0.5, NormalScores.of([1.0, 2.0]), {}, {}, 0.0) for k in range(2)]
        history.append(server.record(round_idx, reply, results, evaluations, None).to_dict())
    c0, c1 = history[1]["clients"][0], history[1]["clients"][1]
    assert c0["privacy_releases"] == 4 and c0["privacy_epsilon"] == pytest.approx(epsilon(2.0, 8, 1e-6))
    assert "rejected" in c1["error"] and c1["privacy_releases"] == 3
    assert c1["privacy_epsilon"] == pytest.approx(epsilon(2.0, 3, 1e-6))  # round 0 had no noise for client 1
    assert history[1]["privacy"] == {
        "noise_multiplier": 2.0,
        "delta": 1e-6,
        "releases": 8,
        "epsilon": pytest.approx(epsilon(2.0, 8, 1e-6)),
    }
    resumed = Server(cfg, make_strategy(cfg), [5, 6], _limits())
    resumed.restore({"global_memory": server.global_memory, "history": history})
    assert resumed.releases == {0: 8, 1: 3}
