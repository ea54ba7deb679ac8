import argparse

import pytest
import torch

from feddymem.errors import CheckpointError
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
    with pytest.raises(CheckpointError, match="cannot load checkpoint .*c.ckpt safely"):
        load_checkpoint(path)

    evil = tmp_path / "evil.ckpt"
    torch.save({"format": "feddymem-checkpoint", "version": 1, "obj": argparse.Namespace(cmd="rm -rf")}, evil)
    with pytest.raises(CheckpointError, match="safely"):
        load_checkpoint(evil)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a FedDyMem checkpoint"):
        load_checkpoint(other)


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and len(list(tmp_path.iterdir())) == 1
