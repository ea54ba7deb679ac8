"""Held-out normal images: thresholds, per-product normalisation and the round each client keeps."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST
from feddymem.config import load_config
from feddymem.data.partition import per_product_sample
from feddymem.federation.client_runner import ClientRunner
from feddymem.federation.orchestrator import FederatedOrchestrator
from feddymem.io import load_checkpoint
from feddymem.metrics import ScoreNormalizer
from feddymem.metrics.threshold import normal_threshold
from feddymem.trained import load_trained
from synthetic import dataset_yaml, make_dataset


def _run(tmp_path, yaml, name, *extra):
    cfg = load_config([f"dataset={yaml}", "data.num_clients=2", "data.holdout_fraction=0.25", *FAST, *extra])
    orch = FederatedOrchestrator(cfg, tmp_path / name)
    return orch, orch.run()


@pytest.fixture(scope="module")
def many_held_out(tmp_path_factory) -> Path:
    """32 training images per product; with half held out each client judges a round on ~16 normal images
    and ~32 cut-pastes (~500 pairs), so one image moves the criterion by ~0.002 rather than 1/32."""
    root = tmp_path_factory.mktemp("many_held_out")
    folders = make_dataset(root, products=2, n_train=32)
    return dataset_yaml(root, folders)


def test_a_collapsed_generator_is_not_kept_and_patience_stops_the_run(tmp_path, many_held_out, monkeypatch):
    # Local training that collapses the generator onto one point (the trivial minimum of a compactness
    # loss): every patch, normal or not, gets the same embedding, so held-out scores carry no information
    # and the criterion is exactly 0.5 (its tie rule) on every machine. Round 0 (the identity generator on
    # ImageNet features) must beat that by a margin no single held-out image can close.
    extra = ["federation.rounds=4", "selection.patience=2"]
    cfg = load_config([f"dataset={many_held_out}", "data.num_clients=2", "data.holdout_fraction=0.5", *FAST, *extra])
    orch = FederatedOrchestrator(cfg, tmp_path / "wrecked")
    real_training = ClientRunner.local_training

    def collapsing_training(runner, client, round_idx, deadline):
        loss = real_training(runner, client, round_idx, deadline)
        with torch.no_grad():
            client.module.model.generator.conv.weight.zero_()  # output = the bias, wherever the patch
        return loss

    monkeypatch.setattr(ClientRunner, "local_training", collapsing_training)
    summary = orch.run()
    assert all(len(c.normal_set) >= 12 for c in orch.clients)  # the margin below rests on this many
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]  # stopped: no client improved in rounds 1 and 2
    for cid, final in summary["final"]["clients"].items():
        criteria = [r["clients"][cid]["criterion"] for r in rounds]
        assert criteria[1:] == [0.5, 0.5] and criteria[0] > 0.6  # measured 0.79-0.90 (seeds 0-5)
        assert final["kept_round"] == 0
        assert final["image_auroc"] == rounds[0]["clients"][cid]["image_auroc"]  # the kept round's metrics
    # What a user loads is the kept state (round 0's generator), not the wrecked one; resume gets the latter.
    ckpt = load_checkpoint(tmp_path / "wrecked/checkpoints/last.ckpt")
    saved = ckpt["clients"][0]
    assert saved["kept"]["round"] == 0
    model = load_trained(tmp_path / "wrecked/checkpoints/last.ckpt", 0).model
    weight = model.generator.conv.weight
    assert torch.equal(weight, saved["kept"]["model"]["generator.conv.weight"])
    assert not saved["model"]["generator.conv.weight"].any()  # the last (collapsed) state, for resume
    c = weight.shape[0]
    assert torch.allclose(weight.view(c, -1)[:, :c], torch.eye(c))  # round 0: the identity generator


def test_keep_last_takes_the_last_round_and_the_run_goes_on(tmp_path, synthetic_yaml):
    _, summary = _run(tmp_path, synthetic_yaml, "last", "federation.rounds=2", "selection.keep=last")
    assert len(summary["rounds"]) == 3
    assert all(c["kept_round"] == 2 for c in summary["final"]["clients"].values())


def test_thresholds_and_normalisation_come_from_held_out_normal_images(tmp_path, synthetic_yaml):
    orch, summary = _run(tmp_path, synthetic_yaml, "held", "federation.rounds=0", "model.scoring.normalize_images=3")
    ckpt = load_checkpoint(tmp_path / "held/checkpoints/last.ckpt")
    for client in orch.clients:
        held = {s.path for s in client.data.holdout}
        train = {s.path for s in client.data.train}
        assert held and not held & train and {s.path for s in client.normal_set.samples} == held
        raw, products = orch.runner.evaluator.image_scores(client, client.normal_set)
        saved = ckpt["clients"][client.id]
        assert saved["threshold"] == normal_threshold(raw, 99.0)
        for product in client.data.products:
            own = raw[np.asarray(products) == product]
            assert saved["product_thresholds"][product] == normal_threshold(own, 99.0)
        # ... and from at most 3 training images per product (the same sample every round).
        sample = per_product_sample(client.own_train_set.samples, 3, orch.cfg.seed + client.id)
        counts = Counter(client.own_train_set.samples[i].product for i in sample)
        assert counts == {p: min(3, n) for p, n in client.data.counts().items()} and len(sample) < len(train)
        train_raw, train_products = orch.runner.evaluator.image_scores(client, client.own_train_set.subset(sample))
        normalizer = ScoreNormalizer.fit(np.r_[raw, train_raw], products + train_products)
        assert saved["normalizer"] == normalizer.to_dict()
        # The client-level AUROC ranks the normalised test scores; the raw one is reported beside it.
        final = summary["final"]["clients"][client.id]
        assert "image_auroc_raw" in final and 0 <= final["criterion"] <= 1


def test_without_per_round_test_scoring_the_kept_states_are_scored_once_at_the_end(tmp_path, synthetic_yaml):
    _, summary = _run(tmp_path, synthetic_yaml, "quiet", "federation.rounds=2", "federation.eval_every=0")
    assert all("image_auroc" not in c for r in summary["rounds"] for c in r["clients"].values())
    assert all(np.isnan(r["mean_image_auroc"]) and 0 <= r["mean_criterion"] <= 1 for r in summary["rounds"])
    final = summary["final"]["clients"]
    assert set(final) == {0, 1} and all(0 <= c["image_auroc"] <= 1 and "products" in c for c in final.values())
    # The same kept states scored every round give the same final metrics.
    _, every = _run(tmp_path, synthetic_yaml, "every", "federation.rounds=2")
    for cid, c in every["final"]["clients"].items():
        assert c["kept_round"] == final[cid]["kept_round"]
        assert c["image_auroc"] == pytest.approx(final[cid]["image_auroc"], abs=1e-6)


def test_clients_in_the_same_state_score_a_products_test_images_once(tmp_path, synthetic_yaml, monkeypatch):
    from feddymem.federation.evaluation import state_fingerprint
    from feddymem.lightning_model import FedDyMemModule

    scored: list[int] = []
    real = FedDyMemModule.test_step

    def counting(self, batch, batch_idx):
        scored.append(len(batch["path"]))
        return real(self, batch, batch_idx)

    monkeypatch.setattr(FedDyMemModule, "test_step", counting)
    orch, summary = _run(tmp_path, synthetic_yaml, "same", "federation.rounds=0")
    # Round 0: identity generators and one global memory, so every client is in the same state.
    states = {state_fingerprint(c.module.trainable_state()) for c in orch.clients}
    assert len(states) == 1
    distinct = {s.path for c in orch.clients for s in c.test_set.samples}
    assert sum(scored) == len(distinct) < sum(len(c.test_set) for c in orch.clients)
    finals = summary["final"]["clients"]
    assert all(
        finals[0]["products"][p] == finals[1]["products"][p]
        for p in set(finals[0]["products"]) & set(finals[1]["products"])
    )
