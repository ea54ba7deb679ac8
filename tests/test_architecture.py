"""The import rules of the package: each part on one floor, importing only the floors below it.

A floor's parts are independent of each other: ``lightning_model`` and ``predict`` do not import one
another, so inference needs no Lightning. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "feddymem"

# From the top floor down. A part is a subpackage or a top-level module of feddymem.
FLOORS: list[set[str]] = [
    {"cli"},
    {"benchmarks"},  # the benchmark suite: whole experiments, side by side
    {"api"},  # feddymem.train: a whole experiment, for the command line, notebooks and scripts
    {"flower"},  # Flower as the second engine
    {"federation"},  # strategies, server, client runner, Fabric orchestrator
    # the Lightning wrappers (module, datamodule); what uses a trained model
    {"lightning_model", "datamodule", "privacy", "predict", "export", "report"},
    {"trained"},  # a trained pure-torch model from a checkpoint
    {"config"},  # schema, loading, and the core's typed settings from a config
    {"models"},  # the pure-torch core: backbone, generator, loss, anomaly map, FedDyMemModel
    {"memory"},  # search, K-means, memory-reduce with its privacy noise, aggregation
    {"logging"},
    {"data"},
    {"io"},  # atomic writes, JSON, checkpoints
    {"metrics", "errors"},
]
FLOOR_OF = {part: i for i, floor in enumerate(FLOORS) for part in floor}


def part_of(path: Path) -> str:
    """The part a source file belongs to: its subpackage, or its own name for a top-level module."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_parts(path: Path) -> set[str]:
    """The feddymem parts ``path`` imports, anywhere in the file."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "feddymem" else [f"feddymem.{a.name}" for a in node.names]
        parts |= {name.split(".")[1] for name in names if name.startswith("feddymem.")}
    return parts


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_part_has_a_floor():
    parts = {part_of(p) for p in SOURCES if p.name != "__main__.py"}
    assert parts - set(FLOOR_OF) == set(), "add the new part to FLOORS, on the floor it belongs to"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_run_down(source):
    # ``python -m feddymem.benchmarks`` and the like: faces of the command line, on its floor.
    own = "cli" if source.name == "__main__.py" else part_of(source)
    upward = {
        part
        for part in imported_parts(source) - {own}
        if part in FLOOR_OF and FLOOR_OF[part] <= FLOOR_OF[own]  # a floor above, or a sibling on the same floor
    }
    assert not upward, f"{source.relative_to(PACKAGE)} ({own}) imports {sorted(upward)} from its floor or above"


def test_the_rules_catch_an_upward_import(tmp_path):
    """The check itself: a core file that imports Lightning's module is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def load():\n    from feddymem.lightning_model import FedDyMemModule\n")
    assert imported_parts(bad) == {"lightning_model"}
    assert FLOOR_OF["lightning_model"] < FLOOR_OF["models"]
