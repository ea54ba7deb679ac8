"""Write requirements.lock: every package of a freshly installed .venv, pinned (`make lock` calls this).

The lock holds the environment the test suite passed with, so that `make install` on a new machine builds
the same one. It is frozen from the CPU install (faiss-cpu); the GPU extra's packages (faiss-gpu and the
CUDA libraries it needs) are resolved against those pins without installing them, so one file serves both
kinds of machine. Usage: python scripts/write_lock.py VENV_PYTHON OUT_FILE
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


ROOT = Path(__file__).resolve().parents[1]


def _pip(python: str, *args: str) -> str:
    return subprocess.run([python, "-m", "pip", *args], check=True, capture_output=True, text=True).stdout


def _name(line: str) -> str:
    return line.split("==")[0].strip().lower().replace("_", "-")


def main(python: str, out: Path) -> None:
    frozen = [line for line in _pip(python, "freeze", "--all", "--exclude-editable").splitlines() if "==" in line]
    gpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    with tempfile.TemporaryDirectory() as tmp:
        constraints, report = Path(tmp) / "frozen.txt", Path(tmp) / "gpu.json"
        constraints.write_text("\n".join(frozen) + "\n")
        _pip(python, "install", "--dry-run", "--quiet", "--ignore-installed", "--report", str(report),
             "-c", str(constraints), *gpu_extra)  # fmt: skip
        resolved = json.loads(report.read_text())["install"]
    known = {_name(line) for line in frozen}
    gpu_only = sorted(
        f"{item['metadata']['name']}=={item['metadata']['version']}"
        for item in resolved
        if _name(item["metadata"]["name"]) not in known
    )
    header = [
        "# requirements.lock: the environment `make test` passed with; `make install` installs with these as",
        "# constraints. Refresh with `make lock` (a clean, unconstrained install, then `make test`).",
        f"# Written {date.today()} on Python {platform.python_version()}, {platform.machine()}.",
        "# The faiss-gpu block is resolved against the CPU pins (`make install` on a machine with an NVIDIA GPU).",
    ]
    body = sorted(frozen, key=_name)
    out.write_text("\n".join([*header, *body, "# --- GPU extra only", *gpu_only]) + "\n")
    print(f"{out}: {len(body)} packages, {len(gpu_only)} more for the GPU extra")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    main(sys.argv[1], Path(sys.argv[2]))
