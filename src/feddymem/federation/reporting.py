"""What a run tells its user, outside the round loop: the round lines and the final table on the console,
per-round metrics to the experiment loggers (CSV, W&B), W&B image panels and final artifacts, and
``scores.csv``. The orchestrator hands it finished round records; it computes nothing of the method."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from feddymem.config import to_container
from feddymem.data.partition import ClientData
from feddymem.io import atomic_write_text, save_checkpoint
from feddymem.logging.console import Reporter, human_bytes
from feddymem.logging.experiment import WandbSettings, find_wandb, make_loggers


def kept_record(history: list[dict[str, Any]], final_tests: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The final result a user gets: every client's metrics at the round it keeps, and their mean.

    Kept rounds whose test set was not scored take the test metrics of the final evaluation."""
    last = history[-1]
    by_round = {r["round"]: r for r in history}
    clients = {}
    for cid in last["clients"]:
        # The round a client last reported its kept round in: a client lost in later rounds keeps that one.
        kept_round = next(
            (r["clients"][cid]["kept_round"] for r in reversed(history) if "kept_round" in r["clients"].get(cid, {})),
            last["round"],
        )
        clients[cid] = {
            **by_round.get(kept_round, last)["clients"][cid],
            **final_tests.get(cid, {}),
            "kept_round": kept_round,
        }
    return {
        "round": last["round"],
        "clients": clients,
        # Over the clients whose kept state was scored (as the logged final/mean_image_auroc); NaN when none was.
        "mean_image_auroc": float(np.mean(scored)) if (scored := _scored(clients)) else float("nan"),
    }


def _scored(clients: dict[Any, dict[str, Any]]) -> list[float]:
    """The image AUROCs of the clients that have one."""
    values = [c.get("image_auroc") for c in clients.values()]
    return [float(v) for v in values if isinstance(v, int | float) and v == v]


def final_summary(history: list[dict[str, Any]], final_tests: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """``metrics.json``'s ``final``: the kept results' mean and clients, and the privacy spent over the run."""
    final = kept_record(history, final_tests) if history else {}
    out = {"mean_image_auroc": final.get("mean_image_auroc"), "clients": final.get("clients", {})}
    unscored = [str(cid) for cid, c in out["clients"].items() if not _scored({cid: c})]
    if unscored and len(unscored) < len(out["clients"]):  # e.g. a site lost before the final scoring
        out["unscored_clients"] = unscored
    if history and history[-1].get("privacy"):
        out["privacy"] = history[-1]["privacy"]  # every upload so far counts, not only the kept round's
    return out


def run_loggers(cfg: DictConfig, run_dir: Path, job_type: str = "server") -> list:
    """The experiment loggers of a run (``logger=``): the run folder's name is the W&B run's name and its
    group, so a resumed run (same stored id) and every role of one experiment share it."""
    wandb = WandbSettings(cfg.wandb_project, cfg.wandb_mode.value, run_dir.name, job_type)
    return make_loggers(cfg.logger.value, run_dir, run_dir.name, to_container(cfg), wandb)


def final_metrics(final: dict[str, Any]) -> dict[str, float]:
    """The kept states' metrics as flat ``final/...`` keys: the means over clients, each client's, and each
    product's (the mean over the clients that hold it)."""
    out: dict[str, float] = {}
    clients = final.get("clients", {})
    by_product: dict[str, dict[str, list[float]]] = {}
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        values = [c[key] for c in clients.values() if c.get(key) is not None and c[key] == c[key]]
        if values:
            out[f"final/mean_{key}"] = float(np.mean(values))
    for cid, stats in clients.items():
        for key in ("image_auroc", "pixel_auroc", "aupro", "kept_round"):
            if stats.get(key) is not None and stats[key] == stats[key]:
                out[f"final/client/{cid}/{key}"] = float(stats[key])
        for product, values in stats.get("products", {}).items():
            for key, value in values.items():
                if isinstance(value, int | float) and value == value:
                    by_product.setdefault(product, {}).setdefault(key, []).append(float(value))
    for product, keys in by_product.items():
        for key, values in keys.items():
            out[f"final/product/{product}/{key}"] = float(np.mean(values))
    return out


class RunReporter:
    """The console, the experiment loggers and the run folder's report files of one run (rank 0 writes)."""

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        console: Reporter,
        loggers: list,
        log_dict: Callable[..., None],
    ) -> None:
        self.cfg, self.run_dir, self.console, self.loggers, self.log_dict = cfg, run_dir, console, loggers, log_dict

    def log_round(self, record: dict[str, Any], tested: bool) -> None:
        """A round's metrics to the loggers (step = round) and its line on the console."""
        r = record["round"]
        self._round_axis()
        metrics: dict[str, float] = {
            "round/index": r,
            **{f"server/{k}": float(v) for k, v in record["server"].items() if isinstance(v, int | float) and v == v},
            "server/participants": len(record["participants"]),
            "round/bytes_up": record["bytes_up"],
            "round/bytes_down": record["bytes_down"],
            "round/time_s": record["time_s"],
            **({"round/mean_image_auroc": record["mean_image_auroc"]} if tested else {}),
            # The feature cache's counters: the Fabric engine's processes report them, remote sites do not.
            **{f"cache/{k}": float(v) for k, v in record.get("cache", {}).items() if k in ("extraction_s", "saved_s")},
        }
        for cid, stats in record["clients"].items():
            for key, value in stats.items():
                if isinstance(value, int | float) and value == value:  # skip NaN
                    metrics[f"client/{cid}/{key}"] = float(value)
            for product, values in stats.get("products", {}).items():
                for key, value in values.items():
                    if value == value:
                        metrics[f"client/{cid}/{product}/{key}"] = float(value)
        self.log_dict(metrics, step=r)
        left_out = [f"{cid} ({c['error']})" for cid, c in record["clients"].items() if "error" in c]
        cache = record.get("cache", {})
        self.console.print(
            f"round {r:>2}: mean image AUROC "
            + (f"{record['mean_image_auroc']:.4f}  " if tested else "(test set not scored)  ")
            + f"held-out criterion {record['mean_criterion']:.4f}  "
            f"up {human_bytes(record['bytes_up'])}  down {human_bytes(record['bytes_down'])}  "
            f"time {record['time_s']:.1f}s"
            + (f"  (cache saved {cache['saved_s']:.1f}s so far)" if "saved_s" in cache else "")
            + (f"  left out: {', '.join(left_out)}" if left_out else "")
        )

    def _round_axis(self) -> None:
        """On W&B, every key's x-axis is the round (once per run)."""
        wandb_logger = find_wandb(self.loggers)
        if wandb_logger is None or getattr(self, "_axis_defined", False):
            return
        wandb_logger.experiment.define_metric("round/index")
        wandb_logger.experiment.define_metric("*", step_metric="round/index")
        self._axis_defined = True

    def log_panels(self, round_idx: int, panels: dict[int, list[tuple[str, np.ndarray]] | None]) -> None:
        """Each client's anomaly-map strips as a W&B image panel (nothing without W&B)."""
        wandb_logger = find_wandb(self.loggers)
        if wandb_logger is None:
            return
        for cid, strips in sorted(panels.items()):
            if strips:
                wandb_logger.log_image(
                    key=f"client/{cid}/anomaly_maps",
                    images=[s for _, s in strips],
                    caption=[p for p, _ in strips],
                    step=round_idx,
                )

    def log_final(
        self,
        history: list[dict[str, Any]],
        final_tests: dict[int, dict[str, Any]],
        global_memory: torch.Tensor | None,
    ) -> None:
        """The kept states' final metrics to every logger (``final/...``, at the last round) and to the W&B
        run's summary; on W&B also the per-client, per-product table and the model artifact."""
        if not history:
            return
        final = kept_record(history, final_tests)
        metrics = final_metrics(final)
        self.log_dict(metrics, step=final["round"])
        wandb_logger = find_wandb(self.loggers)
        if wandb_logger is None:
            return
        wandb_logger.experiment.summary.update(metrics)
        columns = ["client", "product", "image_auroc", "pixel_auroc", "aupro", "kept_round", "bytes_up", "bytes_down"]
        rows = [
            [cid, product, *(m.get(k) for k in columns[2:5]), *(stats.get(k) for k in columns[5:])]
            for cid, stats in final["clients"].items()
            for product, m in stats.get("products", {}).items()
        ]
        wandb_logger.log_table(key="final/clients", columns=columns, data=rows)
        self._log_model(wandb_logger, final, global_memory)

    def _log_model(self, wandb_logger: Any, final: dict[str, Any], global_memory: torch.Tensor | None) -> None:
        """The checkpoint (and the global memory) as a version of one model artifact per experiment
        (``feddymem-<dataset>-<method>``): ``latest`` is this run's; ``best`` marks a checkpoint whose
        clients keep their best round by the held-out criterion (``selection.keep=best``)."""
        import wandb

        experiment = f"feddymem-{Path(str(self.cfg.dataset)).stem}-{self.cfg.method.value}"
        name = "".join(c if c.isalnum() or c in "-_." else "-" for c in experiment)
        metadata = {"round": final["round"], "run": self.run_dir.name, **final_metrics(final)}
        artifact = wandb.Artifact(name, type="model", metadata=metadata)
        artifact.add_file(str(self.run_dir / "checkpoints" / "last.ckpt"))
        if global_memory is not None:  # local, centralized and FedAvg runs have none
            memory_path = self.run_dir / "global_memory.pt"
            save_checkpoint(memory_path, {"global_memory": global_memory})
            artifact.add_file(str(memory_path))
        aliases = ["latest", "best"] if self.cfg.selection.keep.value == "best" else ["latest"]
        wandb_logger.experiment.log_artifact(artifact, aliases=aliases)

    def finish(self) -> None:
        """Close every logger (the W&B run included: a run never finished shows as crashed)."""
        for logger in self.loggers:
            logger.finalize("success")
        if (wandb_logger := find_wandb(self.loggers)) is not None:
            wandb_logger.experiment.finish()

    def print_table(self, final: dict[str, Any], history: list[dict[str, Any]], clients: list[ClientData]) -> None:
        """The final table: each client's kept round and its metrics, bytes and time."""
        has_pixel = any("pixel_auroc" in s for s in final["clients"].values())
        cols = ["client", "products", "train imgs", "kept round", "image AUROC"]
        cols += ["pixel AUROC", "AUPRO"] if has_pixel else []
        cols += ["up/round", "down/round", "time"]
        rows = []
        for cid, s in final["clients"].items():
            t = sum(r["clients"][cid]["time_s"] + r["clients"][cid].get("eval_time_s", 0.0) for r in history)
            row = [
                str(cid),
                ",".join(clients[cid].products),
                str(s["train_images"]),
                str(s["kept_round"]),
                f"{s.get('image_auroc', float('nan')):.4f}",
            ]
            if has_pixel:
                row += [f"{s.get('pixel_auroc', float('nan')):.4f}", f"{s.get('aupro', float('nan')):.4f}"]
            row += [human_bytes(s["bytes_up"]), human_bytes(s["bytes_down"]), f"{t:.1f}s"]
            rows.append(row)
        self.console.table(
            f"{self.cfg.method.value} on {self.cfg.dataset}: after round {final['round']}, each client's kept round "
            f"(selection.keep={self.cfg.selection.keep.value}), mean image AUROC {final['mean_image_auroc']:.4f}",
            cols,
            rows,
        )

    def write_scores(self, rows: list[tuple[int, str, int, float]]) -> None:
        """``scores.csv``: (client, label, score, path) of every scored test image."""
        table = io.StringIO()
        csv.writer(table).writerows(
            [("client", "label", "score", "path")] + [(c, y, f"{v:.7g}", p) for c, p, y, v in sorted(rows)]
        )
        atomic_write_text(self.run_dir / "scores.csv", table.getvalue())
