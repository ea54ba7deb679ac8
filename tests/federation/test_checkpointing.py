"""Which round files a run keeps beside last.ckpt (``checkpoint.keep``)."""

import pytest
import torch

from feddymem.federation.checkpointing import RunCheckpoints


@pytest.mark.parametrize(
    ("keep", "files"),
    [
        ("kept", ["last.ckpt", "round_001.ckpt", "round_003.ckpt"]),
        ("last", ["last.ckpt"]),
        ("all", ["last.ckpt", "round_000.ckpt", "round_001.ckpt", "round_002.ckpt", "round_003.ckpt"]),
    ],
)
def test_round_files_kept_beside_last(keep, files, tmp_path):
    checkpoints = RunCheckpoints(tmp_path, keep)
    for round_idx in range(4):
        kept = 1 if round_idx >= 1 else 0  # client 0 keeps round 1 from then on; client 1 the latest
        clients = {0: {"kept_round": kept}, 1: {"kept_round": round_idx}}
        checkpoints.write(round_idx, {"round": round_idx, "clients": clients, "w": torch.zeros(2)}, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == files
    assert checkpoints.read()["round"] == 3
