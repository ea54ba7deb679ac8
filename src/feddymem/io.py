"""Every file FedDyMem writes goes through here: output folders are claimed (created and proven writable)
before work starts, files are written atomically, and filesystem failures become one-line
:class:`~feddymem.errors.OutputError` messages that name the path. Checkpoints are loaded safely."""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from feddymem.errors import CheckpointError, OutputError

CHECKPOINT_FORMAT = "feddymem-checkpoint"
CHECKPOINT_VERSION = 1


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def _probe(folder: Path) -> None:
    fd, probe = tempfile.mkstemp(prefix=".feddymem-probe-", dir=folder)
    os.close(fd)
    os.unlink(probe)


def check_writable(path: str | Path, what: str) -> None:
    """Prove that ``path`` could be created and written, creating nothing: the nearest existing folder
    above it takes a probe file (removed at once). Otherwise an :class:`OutputError` naming the path."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder" if existing == path else f"{existing} is a file")
    try:
        _probe(existing)
    except OSError as err:
        raise OutputError(f"cannot write {what} {path}: {_reason(err)}") from None


def claim_output_dir(path: str | Path, what: str) -> Path:
    """Create ``path`` (and its parents) if needed and prove that files can be written in it; otherwise an
    :class:`OutputError` naming ``what`` and the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        _probe(path)
    except OSError as err:
        raise OutputError(f"cannot write {what} {path}: {_reason(err)}") from None
    return path


# What a run writes in its folder: a folder holding only these (and no checkpoint) is a run that stopped
# before its first checkpoint, and a rerun with the same name may reuse it.
RUN_FILES = {"config.yaml", "logs", "wandb", "tensorboard", "mlruns", "metrics.json", "checkpoints", "scores.csv"}


def run_dir_problem(run_dir: str | Path, resume: bool) -> str | None:
    """Why a run cannot start in ``run_dir`` (None when it can): a resume needs a checkpoint; a new run
    needs a new folder, or one left by a run that stopped before its first checkpoint (nothing in it can
    be resumed), and a writable parent. Nothing is created."""
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume:
        if not last.is_file():
            return (
                f"cannot resume: no checkpoint {last} (the run stopped before its first round ended); "
                f"start it again with name={run_dir.name}"
            )
        return None
    if run_dir.exists() and not run_dir.is_dir():
        return f"run folder {run_dir} is a file; choose another name=..."
    if run_dir.is_dir():
        entries = {p.name for p in run_dir.iterdir()}
        checkpoints = run_dir / "checkpoints"
        if checkpoints.is_dir() and any(checkpoints.iterdir()):
            return (
                f"run folder {run_dir} already holds checkpoints; continue it with resume={run_dir}, or choose "
                "another name=... (nothing was changed)"
            )
        if not entries <= RUN_FILES:
            return f"{run_dir} exists and is not a FedDyMem run folder; choose another name=... (nothing was changed)"
    try:
        check_writable(run_dir.parent, "output folder")
    except OutputError as err:
        return str(err)
    return None


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a reader sees the
    old file or the new one, never half of one. A failure (full disk, read-only folder) leaves the old
    file as it was and is an :class:`OutputError` naming ``path``. ``durable=False`` skips the fsync, for
    files that may be lost in a power cut (a cache whose reader rebuilds an entry it cannot read)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {_reason(err)}") from None
    finally:
        if tmp is not None:  # gone after a successful rename
            Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; an OutputError names the path."""
    atomic_write_bytes(path, text.encode())


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and ±inf as ``None``: strict JSON readers reject Python's ``NaN`` literals."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON (missing metrics are ``null``), written atomically."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str | Path, what: str = "") -> Any:
    """A JSON file FedDyMem wrote; missing, unreadable or truncated: a one-line error naming the file
    (``what``: what it should be, for the message)."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise OutputError(f"{label} not found") from None
    except OSError as err:
        raise OutputError(f"cannot read {label}: {_reason(err)}") from None
    except ValueError as err:  # JSONDecodeError, or bytes that are not text
        raise OutputError(f"{label} is not valid JSON ({err}): truncated or edited?") from None


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """A matplotlib figure as a PNG, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomically save ``payload`` (tensors, numbers, strings, lists and dicts only) with a format tag.
    Equal tensors of 64 KiB and more are written once (every client's memory is the global memory)."""
    buffer = io.BytesIO()
    shared = share_equal_tensors({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload})
    torch.save(shared, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def share_equal_tensors(tree: Any, min_bytes: int = 1 << 16) -> Any:
    """``tree`` with every tensor of at least ``min_bytes`` that equals one met before replaced by that one:
    ``torch.save`` writes a storage once however often it appears, and loading gives each place its tensor
    back (as views of one storage)."""
    seen: dict[tuple, list[torch.Tensor]] = {}

    def visit(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: visit(v) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return type(node)(visit(v) for v in node)
        if not isinstance(node, torch.Tensor) or node.numel() * node.element_size() < min_bytes:
            return node
        for earlier in seen.setdefault((tuple(node.shape), node.dtype, node.device), []):
            if torch.equal(earlier, node):
                return earlier
        seen[(tuple(node.shape), node.dtype, node.device)].append(node)
        return node

    return visit(tree)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a FedDyMem checkpoint with ``weights_only=True``; anything else is a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    # Inspect before loading: a checkpoint that needs any global beyond tensors and plain containers is
    # refused by name. (Matching torch's error text would depend on the torch version.)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a torch checkpoint, or truncated or corrupted"
        ) from None
    if unsafe:
        raise CheckpointError(
            f"refusing to load checkpoint {path}: it holds pickled objects ({', '.join(unsafe)}) that could run "
            "code; FedDyMem checkpoints hold tensors, numbers and strings only"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise CheckpointError(f"cannot load checkpoint {path}: {first}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a FedDyMem checkpoint")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {payload['version']}; this FedDyMem reads up to {CHECKPOINT_VERSION}"
        )
    return payload
