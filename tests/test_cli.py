"""End-to-end: the real CLI, real images on disk, the offline ImageNet backbone, FAISS and Fabric."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST
from feddymem.cli import main
from feddymem.io import load_checkpoint


@pytest.mark.e2e
def test_train_two_rounds_three_clients(tmp_path, synthetic_yaml, capsys):
    code = main(
        [
            "train",
            f"dataset={synthetic_yaml}",
            "federation.rounds=2",
            "name=e2e",
            f"output_dir={tmp_path}",
            "data.num_clients=3",
            *FAST[:-2],
            "logger=csv",
            "model.scoring.context=9",  # the context part end to end: uploads, checkpoints, predict, ONNX export
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "mean image AUROC" in out and "up/round" in out
    run = tmp_path / "e2e"
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    final = metrics["final"]["clients"]
    assert len(final) == 3
    # Pasted defects on regular stripes are easy: every client must find them.
    assert all(c["image_auroc"] > 0.9 and c["pixel_auroc"] > 0.9 and 0 < c["aupro"] <= 1 for c in final.values())
    assert all(c["bytes_up"] > 0 and c["bytes_down"] > 0 for c in final.values())
    assert all(c["memory_patches"] == c["train_images"] * 144 > c["memory_items"] for c in final.values())
    for c in final.values():  # per product metrics, with masks
        assert c["products"] and all(p["pixel_auroc"] > 0.9 and p["image_auroc"] > 0.9 for p in c["products"].values())
    assert metrics["rounds"][1]["clients"]["0"]["train_loss"] > 0
    assert metrics["cache"]["hits"] > metrics["cache"]["extracted_images"] > 0
    assert (run / "config.yaml").read_text().count("num_clients: 3") == 1
    assert (run / "logs" / "metrics.csv").is_file()
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["round"] == 2 and set(ckpt["clients"]) == {0, 1, 2}
    assert torch.equal(ckpt["clients"][0]["model"]["memory"], ckpt["global_memory"])
    assert ckpt["provenance"]["backbone"] == "tf_efficientnet_lite0"
    # checkpoint.keep=kept: beside last.ckpt, the latest round's file and each client's kept round's.
    kept_rounds = {int(c["kept"]["round"]) for c in ckpt["clients"].values()}
    expected = ["last.ckpt", *(f"round_{r:03d}.ckpt" for r in sorted(kept_rounds | {2}))]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == expected
    # Every client's memory is the global memory: stored once (the checkpoint is not 4 memories large).
    memory_bytes = ckpt["global_memory"].numel() * 4
    assert (run / "checkpoints" / "last.ckpt").stat().st_size < memory_bytes * (1 + len(kept_rounds)) + 2**20
    # Only memory crossed the boundary: generators differ between clients after training.
    g0, g1 = (ckpt["clients"][k]["model"]["generator.conv.weight"] for k in (0, 1))
    assert not torch.equal(g0, g1)
    # The report draws every plot from the run folder, with data in it.
    assert main(["report", str(run), "--client", "1"]) == 0
    pngs = sorted((run / "report").glob("*.png"))
    assert [p.name for p in pngs] == [
        "anomaly_maps.png",
        "auroc_per_round.png",
        "bytes_per_round.png",
        "roc_curves.png",
    ]
    from PIL import Image

    for png in pngs:
        pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
        assert pixels.shape[0] > 200 and pixels.std() > 10, png  # not blank
    scores = (run / "scores.csv").read_text().splitlines()
    assert scores[0] == "client,label,score,path" and len(scores) > 3
    # Thresholds from normal training scores, per client and global, stored in the checkpoint.
    assert all(ckpt["clients"][k]["threshold"] > 0 for k in range(3)) and ckpt["threshold"] > 0
    # ONNX export: one artifact that matches the eager model's scores.
    onnx_path = tmp_path / "client1.onnx"
    assert main(["export", str(run / "checkpoints" / "last.ckpt"), "--client", "1", "--out", str(onnx_path)]) == 0
    import onnxruntime

    from feddymem.export import InferenceModel
    from feddymem.trained import load_trained

    trained = load_trained(run / "checkpoints" / "last.ckpt", 1)
    assert trained.threshold == ckpt["clients"][1]["threshold"]
    eager = InferenceModel(trained.model, 96, trained.threshold).eval()
    images = torch.rand(3, 3, 120, 100)
    with torch.no_grad():
        ref_maps, ref_scores, ref_labels = eager(images)
    maps, scores, labels = onnxruntime.InferenceSession(str(onnx_path)).run(None, {"images": images.numpy()})
    assert np.abs(scores - ref_scores.numpy()).max() <= 1e-4 * np.abs(ref_scores.numpy()).max()
    assert np.abs(maps - ref_maps.numpy()).max() <= 1e-4 * np.abs(ref_maps.numpy()).max()
    assert (labels == ref_labels.numpy()).all()
    # Predict on a folder of real images plus one unreadable file: CSV + overlays, the bad file skipped.
    from conftest import SHARED_DATA

    folder = SHARED_DATA / "medical" / "head_ct" / "test" / "Ungood"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "pred"
    inputs = [str(folder), str(bad)] if folder.is_dir() else [str(run.parent), str(bad)]
    assert main(["predict", str(run / "checkpoints" / "last.ckpt"), *inputs, "--out", str(out), "--quiet"]) == 0
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0] == "path,score,label,heatmap" and len(rows) > 10
    assert not any("broken.png" in r for r in rows)
    assert len(list((out / "heatmaps").glob("*.png"))) == len(rows) - 1
    capsys.readouterr()
    # Nothing decodable: an error, and the earlier predictions in the folder stay.
    global_args = ["predict", str(run / "checkpoints" / "last.ckpt"), "--global", "--out", str(out), "--overwrite"]
    assert main([*global_args[:2], str(bad), *global_args[2:]]) == 2
    assert "nothing was scored" in capsys.readouterr().err
    assert main([*global_args, *inputs]) == 0
    assert len(list((out / "heatmaps").glob("*.png"))) == len(rows) - 1  # replaced, not mixed with the old ones
    # Never overwrite a finished run.
    assert main(["train", f"dataset={synthetic_yaml}", "name=e2e", f"output_dir={tmp_path}", *FAST]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "feddymem.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.mark.slow
def test_user_errors_are_one_line_without_traceback(tmp_path, synthetic_root):
    from synthetic import dataset_yaml, make_product

    result = _cli("train", "federation.roundz=2", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: unknown config key 'federation.roundz' in command-line overrides; valid keys here: accelerator, "
        "client_timeout_s, collective_timeout_s, devices, engine, eval_every, local_epochs, min_clients, num_nodes, "
        "prox_mu, rounds"
    )
    broken = make_product(tmp_path / "data", "broken", n_train=4)
    (broken / "train/good/002.png").write_bytes(b"not a png")
    yaml = dataset_yaml(tmp_path / "data", [broken], num_clients=2)
    result = _cli("train", f"dataset={yaml}", f"output_dir={tmp_path / 'runs'}", "quiet=true", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot decode image" in result.stderr and "002.png" in result.stderr
    assert not (tmp_path / "runs").exists()  # stopped before training: nothing half-written


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["shared_industrial", "shared_medical"])
def test_data_check_passes_on_shared_mixtures(name, capsys):
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    assert main(["data", "check", name]) == 0
    out = capsys.readouterr().out
    assert "data check passed" in out and "clients (training images per product)" in out


@pytest.mark.slow
def test_data_check_without_data_names_path_and_download(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDDYMEM_DATA_ROOT", str(tmp_path / "nowhere"))
    result = _cli("data", "check", "medical", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "nowhere/Brain_AD" in result.stderr and "github.com/DorisBao/BMAD" in result.stderr


def test_config_file_reruns_a_saved_config_with_overrides_on_top(tmp_path, synthetic_yaml, capsys):
    """``--config FILE``: a run's saved config.yaml (here printed by ``feddymem config``, which writes the
    same) is a whole config; overrides, list items included, apply on top of it."""
    assert main(["config", f"dataset={synthetic_yaml}", "data.num_clients=2", "federation.rounds=3"]) == 0
    saved = tmp_path / "config.yaml"
    saved.write_text(capsys.readouterr().out)
    assert main(["config", "--config", str(saved)]) == 0
    assert capsys.readouterr().out == saved.read_text()
    assert main(["config", "--config", str(saved), "federation.rounds=1", "data.products[1].root=/elsewhere"]) == 0
    again = OmegaConf.create(capsys.readouterr().out)
    assert (again.federation.rounds, again.data.num_clients, again.data.products[1].root) == (1, 2, "/elsewhere")
    assert again.data.products[0].root == OmegaConf.load(saved).data.products[0].root
    args = ["train", "--config", str(saved), f"output_dir={tmp_path}", "name=rerun", *FAST, "federation.rounds=0"]
    assert main(args) == 0
    rerun = OmegaConf.load(tmp_path / "rerun" / "config.yaml")
    assert rerun.data.num_clients == 2 and rerun.federation.rounds == 0


def test_one_entry_point_for_every_command(capsys):
    """``feddymem bench ...`` and ``feddymem flower ...``; the ``python -m`` forms are the same commands."""
    assert main(["flower", "app-dir"]) == 0
    app_dir = capsys.readouterr().out.strip()
    assert (Path(app_dir) / "pyproject.toml").is_file()
    same = subprocess.run([sys.executable, "-m", "feddymem.flower", "app-dir"], capture_output=True, text=True)
    assert same.returncode == 0 and same.stdout.strip() == app_dir
    bench = subprocess.run([sys.executable, "-m", "feddymem.benchmarks", "--help"], capture_output=True, text=True)
    assert bench.returncode == 0 and all(c in bench.stdout for c in ("suite", "render", "kmeans", "frontier"))
