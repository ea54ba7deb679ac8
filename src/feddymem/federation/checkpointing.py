"""A run's round checkpoints: written atomically after every complete round, read safely for resume.

``checkpoints/round_NNN.ckpt`` and ``checkpoints/last.ckpt`` hold the same payload (tensors, numbers,
strings, lists and dicts only; loaded with ``weights_only=True``), then ``metrics.json`` is rewritten.
A failed write (full disk, read-only folder) leaves ``last.ckpt`` as it was, and the error says which
round a resume continues from.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from feddymem import __version__
from feddymem.config import to_container
from feddymem.errors import OutputError
from feddymem.io import atomic_write_json, load_checkpoint, save_checkpoint


class RunCheckpoints:
    """The checkpoints of one run folder, and the round of the last one on disk."""

    def __init__(self, run_dir: str | Path, keep: str = "kept") -> None:
        """``keep`` (``checkpoint.keep``): which ``round_NNN.ckpt`` files stay beside ``last.ckpt``."""
        self.run_dir, self.keep = Path(run_dir), keep
        self.folder = self.run_dir / "checkpoints"
        self.saved_round: int | None = None  # the round of last.ckpt, once written or read

    @property
    def last(self) -> Path:
        """``checkpoints/last.ckpt``."""
        return self.folder / "last.ckpt"

    def write(self, round_idx: int, payload: dict[str, Any], summary: dict[str, Any]) -> None:
        """``round_NNN.ckpt``, ``last.ckpt`` and ``metrics.json``, each atomically."""
        try:
            if self.keep != "last":
                save_checkpoint(self.folder / f"round_{round_idx:03d}.ckpt", payload)
            save_checkpoint(self.last, payload)
            atomic_write_json(self.run_dir / "metrics.json", summary)
        except OutputError as err:
            hint = (
                f"round {self.saved_round} is the last complete one: make room, then "
                f"feddymem train resume={self.run_dir}"
                if self.saved_round is not None
                else "no round was saved"
            )
            raise OutputError(f"{err}; {hint}") from None
        self.saved_round = round_idx
        self._prune(round_idx, payload)

    def _prune(self, round_idx: int, payload: dict[str, Any]) -> None:
        """Remove the round files ``keep`` does not want, once ``last.ckpt`` holds the newest round:
        ``kept`` keeps the latest round's and every client's kept round's, ``all`` every round's."""
        if self.keep == "all":
            return
        # Either engine records every client's kept round, whether or not it holds the client's state.
        wanted = {round_idx} | {int(c["kept_round"]) for c in payload.get("clients", {}).values()}
        for path in self.folder.glob("round_*.ckpt"):
            number = path.stem.removeprefix("round_")
            if number.isdigit() and (self.keep == "last" or int(number) not in wanted):
                path.unlink(missing_ok=True)

    def read(self) -> dict[str, Any]:
        """The last checkpoint's payload, loaded safely."""
        payload = load_checkpoint(self.last)
        self.saved_round = int(payload["round"])
        return payload


def round_payload(
    round_idx: int,
    cfg: DictConfig,
    server_state: dict[str, Any],
    clients: dict[int, dict[str, Any]],
    kept: dict[int, dict[str, Any]],
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """A complete round's checkpoint: the server's global state, what the engine keeps of every client
    (``clients``: the Fabric engine its state and data partition, Flower its products) with the thresholds
    of the round it keeps, the history, the config, the RNG and provenance."""
    return {
        "round": round_idx,
        "method": cfg.method.value,
        **server_state,
        # Per client: "model" is the state after this round (for resume), "kept" the state a user gets.
        "clients": {
            k: {
                **clients[k],
                "kept_round": int(kept[k]["kept_round"]),
                "threshold": kept[k].get("threshold"),  # None: a client lost before its first evaluation
                "product_thresholds": kept[k].get("product_thresholds", {}),
                "normalizer": kept[k].get("normalizer", {}),
            }
            for k in sorted(clients)
        },
        "threshold": history[-1]["threshold"],
        "config": to_container(cfg),
        "history": history,
        # Batches, K-means and initialisations are seeded by (seed, round, epoch, client); the global torch
        # RNG is kept too, for anything user code draws from it.
        "rng": {"torch": torch.get_rng_state()},
        "provenance": provenance(cfg),
    }


def library_versions() -> dict[str, str]:
    """Versions of feddymem, torch, timm, faiss, lightning and Python."""
    from importlib.metadata import version  # timm's and Lightning's without importing them (seconds each)

    import faiss

    # Plain str(): torch.__version__ is a TorchVersion object, which weights_only loading refuses.
    return {
        "feddymem": str(__version__),
        "torch": str(torch.__version__),
        "timm": version("timm"),
        "faiss": str(getattr(faiss, "__version__", "unknown")),
        "lightning": version("lightning"),
        "python": platform.python_version(),
    }


def provenance(cfg: DictConfig) -> dict[str, str]:
    """What a checkpoint was made with: library versions, backbone and its weights."""
    return {
        **library_versions(),
        "backbone": str(cfg.model.backbone.name),
        "weights": str(cfg.model.backbone.weights),
    }
