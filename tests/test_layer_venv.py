"""scripts/layer_venv.py: the environment make anomalib-env builds shares .venv's packages, its own first."""

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "layer_venv.py"


def _python(env: Path) -> str:
    return str(env / "bin" / "python")


def _run(python: str, code: str) -> str:
    return subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_upper_sees_the_base_packages_after_its_own(tmp_path):
    base, upper = tmp_path / "base", tmp_path / "upper"
    for env in (base, upper):
        venv.create(env, with_pip=False)
    base_site, upper_site = (
        Path(_run(_python(e), "import sysconfig; print(sysconfig.get_paths()['purelib'])")) for e in (base, upper)
    )
    (base_site / "only_in_base.py").write_text("WHERE = 'base'\n")
    (base_site / "in_both.py").write_text("WHERE = 'base'\n")
    (upper_site / "in_both.py").write_text("WHERE = 'upper'\n")
    # A path added by a .pth file of the base (as an editable install adds its source folder).
    src = tmp_path / "src"
    src.mkdir()
    (src / "editable_pkg.py").write_text("WHERE = 'src'\n")
    (base_site / "editable.pth").write_text(f"{src}\n")

    subprocess.run([sys.executable, str(SCRIPT), str(upper), str(base)], check=True, capture_output=True)

    code = "import only_in_base, in_both, editable_pkg; print(only_in_base.WHERE, in_both.WHERE, editable_pkg.WHERE)"
    assert _run(_python(upper), code) == "base upper src"
    assert _run(_python(base), "import in_both; print(in_both.WHERE)") == "base"  # the base is left as it was


def test_refuses_a_folder_that_is_not_an_environment(tmp_path):
    venv.create(tmp_path / "base", with_pip=False)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "nothing"), str(tmp_path / "base")], capture_output=True, text=True
    )
    assert result.returncode != 0 and "nothing: no bin/python" in result.stderr
