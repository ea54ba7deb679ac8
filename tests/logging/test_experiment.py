"""A short federated job logged to a real offline W&B run, read back from the run's own files."""

import collections
import csv
import json
import struct

import pytest
import torch

from conftest import FAST
from feddymem.cli import main
from feddymem.logging.experiment import RoundCSVLogger, heatmap_panel, wandb_mode


def test_wandb_is_online_only_when_asked(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # logged in: still offline unless asked
    assert wandb_mode() == "offline"
    assert wandb_mode("online") == "online"  # wandb_mode=online
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("online") == "disabled"


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
def test_offline_wandb_run_at_the_defaults_holds_final_metrics_panels_and_artifact(
    tmp_path, synthetic_yaml, monkeypatch
):
    """The default config (the test set scored once, at the end, for the kept states): the final AUROCs as
    ``final/...`` keys and in the summary, the final panels and table, the artifact with its aliases; the
    same final metrics in metrics.csv; a resumed run continues the same W&B run."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    fast = [f for f in FAST if not f.startswith(("logger=", "federation.eval_every="))]
    args = ["train", f"dataset={synthetic_yaml}", "data.num_clients=2", *fast, "logger=wandb", "panel_images=4"]
    assert main([*args, "federation.rounds=1", f"output_dir={tmp_path}", "name=wb"]) == 0
    # run.finish() only tells W&B's service process that the run is done: the service closes (flushes) the
    # run's .wandb file after it returns. Under load the file was read before that, empty (CI of a fresh
    # clone beside two benchmark jobs). teardown() waits for the service to finish every run's files.
    import wandb

    wandb.teardown()
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log_file = next(runs[0].glob("run-*.wandb"))
    records = list(read_wandb_records(log_file))
    found = (log_file.stat().st_size, collections.Counter(r.WhichOneof("record_type") for r in records))
    logged = {
        item.key or "/".join(item.nested_key) for r in records if r.HasField("history") for item in r.history.item
    }
    for key in (
        "round/index",  # every key's x-axis
        "client/0/bytes_up",
        "server/kmeans_objective",
        "final/mean_image_auroc",
        "final/mean_pixel_auroc",
        "final/mean_aupro",
        "final/client/0/image_auroc",
        "final/client/1/kept_round",
        "final/product/product0/image_auroc",
        "final/clients/_type",  # the per-client, per-product table
    ):
        assert key in logged, (key, found)  # the file's size and what it holds, if a key is missing
    assert "client/0/image_auroc" not in logged  # the defaults score no round's test set: only the kept states
    summary = {item.key: item.value_json for r in records if r.HasField("summary") for item in r.summary.update}
    assert 0.5 < float(summary["final/mean_image_auroc"]) <= 1.0
    run = next(r.run for r in records if r.HasField("run"))
    assert (run.run_group, run.job_type) == ("wb", "server")
    artifacts = [r.artifact for r in records if r.HasField("artifact") and r.artifact.type == "model"]
    assert [(a.name, sorted(a.aliases)) for a in artifacts] == [("feddymem-synthetic-feddymem", ["best", "latest"])]
    panels = list((runs[0] / "files" / "media" / "images").rglob("*.png"))
    assert len(panels) >= 2 * 4  # the final evaluation: 2 clients × 4 images
    table = next((runs[0] / "files" / "media" / "table" / "final").glob("clients_*.table.json"))
    assert len(json.loads(table.read_text())["data"]) == 2 * 2  # 2 clients × 2 products
    with (tmp_path / "wb" / "logs" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "1"] and float(rows[-1]["final/mean_image_auroc"]) > 0.5
    # Resumed with one more round: the same W&B run (its id kept in the run folder), a new segment of it.
    assert main(["train", f"resume={tmp_path / 'wb'}", "federation.rounds=2"]) == 0
    again = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(again) == 2 and len({p.name.rsplit("-", 1)[1] for p in again}) == 1


def test_csv_log_merges_a_rounds_final_metrics_into_its_row(tmp_path):
    logger = RoundCSVLogger(tmp_path)
    logger.log_metrics({"round/time_s": 1.0}, step=0)
    logger.log_metrics({"round/time_s": 2.0}, step=1)
    logger.log_metrics({"final/mean_image_auroc": 0.9}, step=1)
    with (tmp_path / "logs" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["round/time_s"], r["final/mean_image_auroc"]) for r in rows] == [
        ("0", "1.0", ""),
        ("1", "2.0", "0.9"),
    ]


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["tensorboard", "mlflow"])
def test_dashboards_without_wandb_hold_the_same_keys(kind, tmp_path, synthetic_yaml):
    """logger=tensorboard / mlflow: Lightning's own loggers, read back from their files."""
    fast = [f for f in FAST if not f.startswith(("logger=", "federation.eval_every="))]
    args = [f"dataset={synthetic_yaml}", "data.num_clients=2", *fast, f"logger={kind}", "federation.rounds=1"]
    assert main(["train", *args, f"output_dir={tmp_path}", "name=dash"]) == 0
    run = tmp_path / "dash"
    if kind == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tensorboard")).Reload()
        keys = set(events.Tags()["scalars"])
        final = events.Scalars("final/mean_image_auroc")[-1].value
    else:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
        experiment = client.get_experiment_by_name("feddymem")
        (found,) = client.search_runs([experiment.experiment_id])
        keys = set(found.data.metrics)
        final = found.data.metrics["final/mean_image_auroc"]
    for key in ("final/mean_image_auroc", "final/client/0/image_auroc", "client/0/bytes_up", "round/time_s"):
        assert key in keys, key
    assert 0.5 < final <= 1.0
    assert (run / "logs" / "metrics.csv").is_file()
