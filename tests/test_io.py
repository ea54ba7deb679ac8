import argparse
import errno

import pytest
import torch

from feddymem.errors import CheckpointError, OutputError
from feddymem.io import atomic_write_text, load_checkpoint, save_checkpoint


def test_checkpoint_round_trip_is_weights_only(tmp_path):
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, {"round": 2, "memory": torch.ones(3, 2), "config": {"a": [1, "b"]}})
    payload = load_checkpoint(path)
    assert payload["round"] == 2 and torch.equal(payload["memory"], torch.ones(3, 2))
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_truncated_and_pickled_checkpoints_are_refused(tmp_path):
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, {"memory": torch.randn(100, 10)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*c.ckpt: .*truncated or corrupted"):
        load_checkpoint(path)

    evil = tmp_path / "evil.ckpt"
    torch.save({"format": "feddymem-checkpoint", "version": 1, "obj": argparse.Namespace(cmd="rm -rf")}, evil)
    with pytest.raises(CheckpointError, match=r"evil.ckpt: it holds pickled objects \(argparse.Namespace\)") as err:
        load_checkpoint(evil)
    assert "weights_only" not in str(err.value)  # never repeat torch's advice to load it unsafely
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a FedDyMem checkpoint"):
        load_checkpoint(other)


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OutputError, match=r"cannot write .*metrics.json: No space left on device"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_json_is_strict_missing_metrics_are_null(tmp_path):
    import json

    from feddymem.io import atomic_write_json

    atomic_write_json(tmp_path / "m.json", {"auroc": float("nan"), "rounds": [{"x": float("inf"), "y": 0.5}]})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"auroc": None, "rounds": [{"x": None, "y": 0.5}]}


def test_run_folder_rules(tmp_path):
    from feddymem.io import run_dir_problem

    fresh = tmp_path / "fresh"
    assert run_dir_problem(fresh, resume=False) is None and not fresh.exists()  # nothing claimed yet
    stopped = tmp_path / "stopped"  # a run that failed before its first checkpoint
    (stopped / "logs").mkdir(parents=True)
    (stopped / "config.yaml").write_text("x: 1\n")
    assert run_dir_problem(stopped, resume=False) is None
    assert "cannot resume: no checkpoint" in run_dir_problem(stopped, resume=True)
    (stopped / "checkpoints").mkdir()
    (stopped / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert "already holds checkpoints; continue it with resume=" in run_dir_problem(stopped, resume=False)
    assert run_dir_problem(stopped, resume=True) is None
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    assert "is not a FedDyMem run folder" in run_dir_problem(other, resume=False)


def test_equal_tensors_are_saved_once_and_load_back_equal(tmp_path):
    memory = torch.randn(256, 128)  # 128 KiB: every client's memory is the global memory
    other = torch.randn(256, 128)
    payload = {"global_memory": memory, "clients": {k: {"memory": memory.clone()} for k in range(4)}, "x": other}
    save_checkpoint(tmp_path / "a.ckpt", payload)
    loaded = load_checkpoint(tmp_path / "a.ckpt")
    assert all(torch.equal(loaded["clients"][k]["memory"], memory) for k in range(4))
    assert torch.equal(loaded["x"], other) and not torch.equal(loaded["x"], memory)
    assert (tmp_path / "a.ckpt").stat().st_size < 2.2 * memory.numel() * 4  # two storages, not six
