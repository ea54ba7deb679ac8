"""Where a benchmark's numbers come from: the machine, and a block's peak memory."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from feddymem.federation.checkpointing import library_versions


class PeakMemory:
    """Peak resident memory (MB) of this process inside the ``with`` block (Linux: VmHWM reset by
    ``/proc/self/clear_refs``), and peak CUDA memory when a GPU is used."""

    def __enter__(self) -> PeakMemory:
        self.resettable = True
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.resettable = False  # the process-lifetime peak is all we can report
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        self.rss_mb = _vm_hwm_kb() / 1024
        self.cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _vm_hwm_kb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def machine_summary(described: dict[str, Any]) -> str:
    """One line for a :func:`machine` record: CPU, cores, memory, GPU (what decides a row's times)."""
    return (
        f"{described.get('cpu', '?')}, {described.get('cores', '?')} cores ({described.get('torch_threads', '?')} "
        f"torch threads), {described.get('memory_gb', '?')} GB RAM, GPU: {described.get('gpu') or 'none'}"
    )


def machine() -> dict[str, Any]:
    """Where the numbers come from: CPU, cores, memory, GPU, library versions, commit."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = float("nan")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "configs"], capture_output=True, text=True)
        commit += " (modified)" if dirty.stdout.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(mem_gb, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(),
        "commit": commit,
        "versions": library_versions(),
    }
