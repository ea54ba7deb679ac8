"""``feddymem`` command line: ``feddymem train [key=value ...]``, ``feddymem config [key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from feddymem.errors import FedDyMemError


def _run_dir(cfg) -> Path:
    name = cfg.name or f"{Path(cfg.dataset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.output_dir) / name


def cmd_train(args: argparse.Namespace) -> int:
    from feddymem.config import load_config

    overrides = list(args.overrides) + (["quiet=true"] if args.quiet else [])
    cfg = load_config(overrides)
    run_dir = Path(cfg.resume) if cfg.resume else _run_dir(cfg)
    from feddymem.data.check import plan_data

    plan_data(cfg)  # missing data fails here, in seconds, before Lightning and the models load
    from feddymem.federation.orchestrator import FederatedOrchestrator

    FederatedOrchestrator(cfg, run_dir, resume=bool(cfg.resume)).run()
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from feddymem.config import load_config, to_yaml

    print(to_yaml(load_config(list(args.overrides))), end="")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from feddymem.config import load_config
    from feddymem.data.check import check_data
    from feddymem.logging.console import Reporter

    overrides = list(args.overrides)
    if overrides and "=" not in overrides[0]:
        overrides[0] = f"dataset={overrides[0]}"
    cfg = load_config(overrides)
    check_data(cfg, Reporter(quiet=args.quiet))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from feddymem.report import write_report

    for path in write_report(args.run_dir, args.client):
        print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from feddymem.errors import CheckpointError
    from feddymem.export import InferenceModel, export_onnx, export_torchscript
    from feddymem.federation.orchestrator import load_client_module
    from feddymem.io import load_checkpoint

    module, cfg = load_client_module(args.checkpoint, args.client)
    payload = load_checkpoint(args.checkpoint)
    threshold = payload["clients"][args.client].get("threshold")
    if threshold is None:
        raise CheckpointError(f"{args.checkpoint} holds no threshold (written by an older FedDyMem?)")
    model = InferenceModel(module, cfg.data.crop_size, threshold).eval()
    out = Path(args.out or Path(args.checkpoint).with_suffix(".onnx" if args.format == "onnx" else ".pt"))
    path = export_onnx(model, out) if args.format == "onnx" else export_torchscript(model, out)
    print(f"{path}  (client {args.client}, input {cfg.data.crop_size} px, threshold {threshold:.4g})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from feddymem.logging.console import Reporter
    from feddymem.predict import predict

    client = None if args.global_model else args.client
    predict(args.checkpoint, args.inputs, args.out, client, args.batch_size, Reporter(quiet=args.quiet))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feddymem", description="Federated unsupervised image anomaly detection.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="run a federated experiment",
        description="Run a federated experiment. Overrides: dataset=elpv federation.rounds=3 ...",
    )
    train.add_argument("overrides", nargs="*", help="config overrides key=value")
    train.add_argument("--quiet", action="store_true", help="no progress bars or round lines")
    train.set_defaults(func=cmd_train)
    config = sub.add_parser("config", help="print the resolved config")
    config.add_argument("overrides", nargs="*", help="config overrides key=value")
    config.set_defaults(func=cmd_config)
    report = sub.add_parser("report", help="draw PNG plots of a run")
    report.add_argument("run_dir", help="runs/<name>")
    report.add_argument("--client", type=int, default=0, help="client whose anomaly maps to draw")
    report.set_defaults(func=cmd_report)
    export = sub.add_parser("export", help="write a self-contained inference model (ONNX or TorchScript)")
    export.add_argument("checkpoint", help="runs/<name>/checkpoints/last.ckpt")
    export.add_argument("--client", type=int, default=0)
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    export.add_argument("--out", default="", help="output file (default: next to the checkpoint)")
    export.set_defaults(func=cmd_export)
    pred = sub.add_parser("predict", help="score images with a trained model: CSV + heatmap PNGs")
    pred.add_argument("checkpoint", help="runs/<name>/checkpoints/last.ckpt")
    pred.add_argument("inputs", nargs="+", help="image files and/or folders")
    pred.add_argument("--client", type=int, default=0, help="client model to use (default 0)")
    pred.add_argument(
        "--global",
        dest="global_model",
        action="store_true",
        help="use the global memory with the untrained generator and the global threshold",
    )
    pred.add_argument("--out", default="predictions", help="output folder")
    pred.add_argument("--batch-size", type=int, default=16)
    pred.add_argument("--quiet", action="store_true")
    pred.set_defaults(func=cmd_predict)
    data = sub.add_parser("data", help="data set tools").add_subparsers(dest="data_command", required=True)
    check = data.add_parser(
        "check",
        help="count and decode every image of a data set",
        description="feddymem data check DATASET [key=value ...]",
    )
    check.add_argument("overrides", nargs="*", help="DATASET (name or .yaml), then config overrides")
    check.add_argument("--quiet", action="store_true")
    check.set_defaults(func=cmd_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if os.environ.get("CI"):
        os.environ.setdefault("WANDB_MODE", "offline")
    try:
        return args.func(args)
    except FedDyMemError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
