"""``feddymem privacy-report`` end to end on a finished synthetic run: files, rows, the attacks' verdicts."""

from __future__ import annotations

import json

import pytest

from conftest import FAST
from feddymem.cli import main
from feddymem.data.products import Sample
from feddymem.errors import FedDyMemError
from feddymem.privacy.report import UploadVariant, matched_samples


def test_variants_are_parsed_and_bad_ones_named():
    v = UploadVariant.parse("size=784,min_cluster_size=10,noise_multiplier=0.5")
    assert (v.size, v.min_cluster_size, v.noise_multiplier, v.reduce) == (784, 10, 0.5, None)
    assert UploadVariant.parse("reduce=position_mean").reduce == "position_mean"
    with pytest.raises(FedDyMemError, match="'sise=3' is not one of"):
        UploadVariant.parse("sise=3")
    with pytest.raises(FedDyMemError, match="'big' is not a number for size"):
        UploadVariant.parse("size=big")


def test_members_and_non_members_are_matched_product_by_product():
    def samples(product, n):
        return [Sample(f"{product}{i}.png", 0, product) for i in range(n)]

    members = samples("a", 30) + samples("b", 10)
    others = samples("a", 5) + samples("b", 50) + samples("c", 9)  # c: not the client's product
    chosen, unrelated = matched_samples(members, others, 100, seed=0)
    count = lambda items, p: sum(s.product == p for s in items)  # noqa: E731
    assert [count(chosen, p) for p in "abc"] == [count(unrelated, p) for p in "abc"] == [5, 10, 0]
    chosen, unrelated = matched_samples(members, others, 6, seed=0)
    assert len(chosen) == len(unrelated) <= 6 and {s.path for s in chosen} <= {s.path for s in members}


@pytest.mark.slow
def test_privacy_report_attacks_a_finished_run(tmp_path, synthetic_yaml, capsys):
    run = tmp_path / "run"
    overrides = [*FAST, "federation.rounds=0", "memory.min_cluster_size=3", "data.num_clients=2"]
    overrides.append("memory.reduce=cluster_mean")  # its variants (memory.size, noise) are cluster_mean's
    assert main(["train", f"dataset={synthetic_yaml}", "name=run", f"output_dir={tmp_path}", *overrides]) == 0
    args = ["privacy-report", str(run), "--attack-images", "8", "--public-images", "8", "--decoder-steps", "150"]
    assert main([*args, "--variant", "noise_multiplier=1,patches_per_image=4", "--variant", "size=16"]) == 0
    out = capsys.readouterr().out
    assert "| per-image embeddings (a) |" in out and "wrote" in out
    for name in ("privacy.json", "privacy.md", "inversion.png"):
        assert (run / "privacy" / name).stat().st_size > 0
    report = json.loads((run / "privacy" / "privacy.json").read_text())
    rows = {r["upload"]: r for r in report["rows"]}
    assert list(rows) == [
        "per-image embeddings (a)",
        "un-reduced bank: coreset of raw patches (b)",
        "the run's upload (c): cluster_mean",
        "noise_multiplier=1,patches_per_image=4",
        "size=16",
    ]
    # The attack is real: a whole image's embeddings decode to that image, not to another of its kind.
    per_image = rows["per-image embeddings (a)"]
    assert per_image["beats_floor"] and per_image["psnr"] > per_image["psnr_floor"]
    upload = rows["the run's upload (c): cluster_mean"]
    assert isinstance(upload["beats_floor"], bool) and 0.0 <= upload["identified"] <= 1.0
    assert 0.0 <= upload["membership_auc"] <= 1.0 and upload["epsilon"] is None
    assert upload["patches_per_item"] >= 3  # memory.min_cluster_size
    assert rows["un-reduced bank: coreset of raw patches (b)"]["patches_per_item"] == 1.0
    assert rows["noise_multiplier=1,patches_per_image=4"]["epsilon"] > 0
    assert rows["size=16"]["items"] <= 16


def test_privacy_report_needs_a_finished_run(tmp_path, capsys):
    assert main(["privacy-report", str(tmp_path)]) == 2
    assert f"no checkpoint at {tmp_path / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().err
