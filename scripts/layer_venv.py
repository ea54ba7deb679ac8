"""Layer one virtual environment on another: ``python scripts/layer_venv.py UPPER BASE``.

Writes a ``.pth`` file into UPPER's site-packages that adds BASE's site-packages (and the ``.pth``
files there, such as an editable install's) *after* UPPER's own. Packages installed into UPPER shadow
BASE's; everything else (torch, timm, feddymem) is shared instead of installed twice. Run by
``make anomalib-env``; both environments must use the same Python version.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PTH_NAME = "_layered_on_base.pth"


def site_packages(venv: Path) -> Path:
    """The purelib folder of the environment whose interpreter is ``venv/bin/python``."""
    python = venv / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{venv}: no bin/python, not a virtual environment")
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit("usage: layer_venv.py UPPER_VENV BASE_VENV")
    upper, base = (Path(a).resolve() for a in argv)
    upper_site, base_site = site_packages(upper), site_packages(base)
    if upper_site.name != base_site.name or upper_site.parent.name != base_site.parent.name:
        raise SystemExit(f"{upper} ({upper_site}) and {base} ({base_site}) use different Python versions")
    # A plain path line would not read BASE's own .pth files (the editable install); addsitedir does.
    (upper_site / PTH_NAME).write_text(f"import site; site.addsitedir({str(base_site)!r})\n")
    print(f"{upper}: layered on {base_site}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
