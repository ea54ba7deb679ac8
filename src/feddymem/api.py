"""The Python entry point of a whole experiment: what ``feddymem train`` does, for notebooks and scripts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from feddymem.errors import ConfigError


def train(
    overrides: list[str] | None = None, config_file: str | Path | None = None, run_dir: str | Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """Run (or, with ``resume=``, continue) the experiment of ``overrides`` (``key=value`` as on the command
    line; ``config_file``: a whole config such as a run's ``config.yaml``) as ``feddymem train`` does. Returns
    the run folder (``run_dir``; by default ``output_dir/name``, or the data set and a timestamp) and the
    run's summary (what ``metrics.json`` holds)."""
    from feddymem.config import load_config
    from feddymem.data.check import plan_data

    cfg = load_config(list(overrides or []), config_file=Path(config_file) if config_file else None)
    if run_dir is None:
        name = cfg.name or f"{Path(cfg.dataset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(cfg.resume) if cfg.resume else Path(cfg.output_dir) / name
    run_dir = Path(run_dir)
    plan_data(cfg)  # missing data fails here, in seconds, before Lightning and the models load
    if cfg.federation.engine.value == "flower":
        return run_dir, _train_on_flower(cfg, run_dir)
    from feddymem.federation.orchestrator import FederatedOrchestrator

    summary = FederatedOrchestrator(cfg, run_dir, resume=bool(cfg.resume)).run()
    return run_dir, summary or {}


def _train_on_flower(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """The run on a Flower federation on this machine: a SuperLink and one SuperNode per client, TLS and
    SuperNode authentication on loopback (``docs/deploy.md`` spreads the same over machines)."""
    try:
        from feddymem.flower.local import run_on_loopback
    except ImportError as err:
        raise ConfigError(f"federation.engine=flower needs Flower: pip install 'feddymem[flower]' ({err})") from None
    return run_on_loopback(cfg, run_dir)
