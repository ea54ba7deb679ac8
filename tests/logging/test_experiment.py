"""A short federated job logged to a real offline W&B run, read back from the run's own files."""

import struct

import pytest
import torch

from conftest import FAST
from feddymem.cli import main
from feddymem.logging.experiment import heatmap_panel, wandb_mode


def test_wandb_mode_offline_unless_logged_in(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_heatmap_panel_shape_and_content():
    image = torch.zeros(3, 8, 8)
    amap = torch.zeros(8, 8)
    amap[2, 2] = 1.0
    mask = torch.zeros(8, 8)
    mask[2, 2] = 1
    strip = heatmap_panel(image, amap, mask, (0.5,) * 3, (0.5,) * 3, vmax=1.0)
    assert strip.shape == (8, 8 * 3 + 8, 3) and strip.dtype.name == "uint8"
    assert (strip[2, 2 + 8 + 4 + 8 + 4] == 255).all()  # mask pixel is white
    assert strip[2, 2 + 12, 0] > strip[5, 5 + 12, 0]  # hot spot is redder than the cold background


def read_wandb_records(path):
    """Records of a .wandb transaction log (LevelDB log format: 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, partial = path.read_bytes(), 7, 32768, b""  # 7: ':W&B', magic, version
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full record, or last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(partial + chunk if kind == 4 else chunk)
            partial = b""
            yield record
        elif kind in (2, 3):  # first or middle chunk
            partial = chunk if kind == 2 else partial + chunk


@pytest.mark.e2e
def test_offline_wandb_run_holds_client_metrics_and_panels(tmp_path, synthetic_yaml, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    fast = [f for f in FAST if not f.startswith("logger=")]
    code = main(
        [
            "train",
            f"dataset={synthetic_yaml}",
            "data.num_clients=2",
            "federation.rounds=1",
            *fast,
            "logger=wandb",
            "panel_images=4",
            f"output_dir={tmp_path}",
            "name=wb",
        ]
    )
    assert code == 0
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = runs[0] / "files"
    records = list(read_wandb_records(next(runs[0].glob("run-*.wandb"))))
    logged = {
        item.key or "/".join(item.nested_key) for r in records if r.HasField("history") for item in r.history.item
    }
    for key in (
        "client/0/image_auroc",
        "client/1/image_auroc",
        "client/0/bytes_up",
        "server/kmeans_objective",
        "client/0/product0/pixel_auroc",
        "round/mean_image_auroc",
    ):
        assert key in logged, key
    assert "final/clients/_type" in logged  # the per-client, per-product table
    assert sum(r.HasField("artifact") for r in records) >= 1  # the model artifact
    panels = list((files / "media" / "images").rglob("*.png"))
    assert len(panels) >= 2 * 2 * 4  # 2 rounds × 2 clients × 4 images
    config = next(r.run.config for r in records if r.HasField("run"))
    assert any(item.key == "data" and "num_clients" in item.value_json for item in config.update)
    assert (tmp_path / "wb" / "logs" / "metrics.csv").is_file()  # the CSV log is kept too
