"""``feddymem`` command line: one entry point, every sub-command behind the same error handling.

``feddymem train [--config FILE] [key=value ...]``, ``config``, ``data check``, ``predict``, ``export``,
``report``, ``privacy-report``, ``bench ...`` and ``flower ...``: a user's mistake is one line on stderr
and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from feddymem.benchmarks.commands import add_bench_parser
from feddymem.errors import FedDyMemError, PeerFailure
from feddymem.flower.commands import add_flower_parser


def cmd_train(args: argparse.Namespace) -> int:
    """``feddymem train``: run (or resume) a federated experiment (:func:`feddymem.api.train`)."""
    from feddymem.api import train

    train(list(args.overrides) + (["quiet=true"] if args.quiet else []), config_file=args.config)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """``feddymem config``: print the merged config, or every numeric key's range."""
    from feddymem.config import load_config, schema_ranges, to_yaml

    if args.ranges:
        for key, allowed in schema_ranges():
            print(f"{key:<40} {allowed.describe()}")
        return 0
    print(to_yaml(load_config(list(args.overrides), config_file=args.config)), end="")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    """``feddymem data check``: list and decode a data set's images before training."""
    from feddymem.config import load_config
    from feddymem.data.check import plan_data, plan_tables, verify_plan
    from feddymem.logging.console import Reporter

    overrides = list(args.overrides)
    if overrides and "=" not in overrides[0]:
        overrides[0] = f"dataset={overrides[0]}"
    reporter = Reporter(quiet=args.quiet)
    plan = plan_data(load_config(overrides, config_file=args.config))
    for table in plan_tables(plan):
        reporter.table(table.title, table.columns, table.rows)
    with reporter.bars():
        verified = verify_plan(plan, progress=reporter.task)
    for warning in verified.warnings:
        reporter.warn(warning)
    reporter.print(f"data check passed: {verified.images} images decoded, {len(plan.clients)} clients")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``feddymem report``: plots and anomaly maps of a finished run."""
    from feddymem.report import write_report

    for path in write_report(args.run_dir, args.client):
        print(path)
    return 0


def cmd_privacy_report(args: argparse.Namespace) -> int:
    """``feddymem privacy-report``: inversion and membership attacks on a finished run's uploads."""
    from feddymem.privacy.report import UploadVariant, privacy_report, render_table

    variants = [UploadVariant.parse(v) for v in args.variant]
    report = privacy_report(
        args.run_dir,
        args.client,
        variants,
        attack_images=args.attack_images,
        public_images=args.public_images,
        seed=args.seed,
        decoder_steps=args.decoder_steps,
    )
    print(render_table(report), end="")
    print(f"wrote {Path(args.run_dir) / 'privacy'}/privacy.md, privacy.json, inversion.png ({report['time_s']:.0f} s)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``feddymem export``: a trained client as ONNX, TorchScript or a Lightning checkpoint."""
    from feddymem.errors import OutputError
    from feddymem.export import InferenceModel, export_onnx, export_torchscript
    from feddymem.io import claim_output_dir
    from feddymem.trained import load_trained

    suffix = {"onnx": ".onnx", "torchscript": ".pt", "lightning": f".client{args.client}.lightning.ckpt"}[args.format]
    out = Path(args.out or Path(args.checkpoint).with_suffix(suffix))
    if out.is_dir():
        raise OutputError(f"export --out {out} is a folder; give a file name")
    claim_output_dir(out.parent, "export --out folder")  # before the (slow) export, not after
    if args.format == "lightning":  # FedDyMemModule.load_from_checkpoint(out) reads it
        from feddymem.lightning_model import FedDyMemModule

        module = FedDyMemModule.from_trained(args.checkpoint, args.client)
        print(f"{module.save_lightning_checkpoint(out)}  (client {args.client}, FedDyMemModule.load_from_checkpoint)")
        return 0
    trained = load_trained(args.checkpoint, args.client)
    crop = trained.config.data.crop_size
    model = InferenceModel(trained.model, crop, trained.threshold).eval()
    path = export_onnx(model, out) if args.format == "onnx" else export_torchscript(model, out)
    print(f"{path}  (client {args.client}, input {crop} px, threshold {trained.threshold:.4g})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``feddymem predict``: score new images with a trained client."""
    from feddymem.logging.console import Reporter
    from feddymem.predict import predict

    client = None if args.global_model else args.client
    window = tuple(args.window) if args.window else None
    reporter = Reporter(quiet=args.quiet)
    predict(args.checkpoint, args.inputs, args.out, client, args.batch_size, reporter, args.overwrite, window)
    return 0


def _int_at_least(minimum: int, too_small: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{too_small}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1, "must be at least 1")
client_id = _int_at_least(0, "client numbers start at 0")


def build_parser() -> argparse.ArgumentParser:
    """The ``feddymem`` command line and its sub-commands."""
    parser = argparse.ArgumentParser(prog="feddymem", description="Federated unsupervised image anomaly detection.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="run a federated experiment",
        description="Run a federated experiment. Overrides: dataset=elpv federation.rounds=3 ...",
    )
    train.add_argument("overrides", nargs="*", help="config overrides key=value")
    _config_file_option(train)
    train.add_argument("--quiet", action="store_true", help="no progress bars or round lines")
    train.set_defaults(func=cmd_train)
    config = sub.add_parser("config", help="print the resolved config")
    config.add_argument("overrides", nargs="*", help="config overrides key=value")
    _config_file_option(config)
    config.add_argument("--ranges", action="store_true", help="list every numeric key and the values it accepts")
    config.set_defaults(func=cmd_config)
    _add_report_commands(sub)
    _add_model_commands(sub)
    _add_data_commands(sub)
    add_bench_parser(sub)
    add_flower_parser(sub)
    return parser


def _add_report_commands(sub: Any) -> None:
    """``report`` and ``privacy-report``: what a finished run shows, and what its uploads leak."""
    report = sub.add_parser("report", help="draw PNG plots of a run")
    report.add_argument("run_dir", help="runs/<name>")
    report.add_argument("--client", type=client_id, default=0, help="client whose anomaly maps to draw")
    report.set_defaults(func=cmd_report)
    privacy = sub.add_parser(
        "privacy-report",
        help="attack a run's uploads: feature inversion and membership inference",
        description="Inversion (PSNR/SSIM against an unrelated-image floor) and membership-inference (AUC) attacks "
        "on one client's upload, next to its per-image embeddings and the un-reduced coreset bank.",
    )
    privacy.add_argument("run_dir", help="runs/<name> (a finished run with checkpoints/last.ckpt)")
    privacy.add_argument("--client", type=client_id, default=0, help="the client whose uploads are attacked")
    privacy.add_argument(
        "--variant",
        action="append",
        default=[],
        help="another upload to attack, e.g. 'size=784,min_cluster_size=10' or 'noise_multiplier=1,"
        "patches_per_image=16' (keys: reduce, size, min_cluster_size, min_images_per_item, noise_multiplier, "
        "patches_per_image, coreset_ratio); repeatable",
    )
    privacy.add_argument("--attack-images", type=positive_int, default=128, help="members (and non-members) attacked")
    privacy.add_argument("--public-images", type=positive_int, default=96, help="the server's decoder training images")
    privacy.add_argument(
        "--decoder-steps", type=int, default=0, help="inversion decoder's training steps (0: 8 epochs, at least 400)"
    )
    privacy.add_argument("--seed", type=int, default=0)
    privacy.set_defaults(func=cmd_privacy_report)


def _add_model_commands(sub: Any) -> None:
    """``export`` and ``predict``: a trained model, outside the training code."""
    export = sub.add_parser("export", help="write a self-contained inference model (ONNX or TorchScript)")
    export.add_argument("checkpoint", help="runs/<name>/checkpoints/last.ckpt")
    export.add_argument("--client", type=client_id, default=0)
    export.add_argument(
        "--format",
        choices=["onnx", "torchscript", "lightning"],
        default="onnx",
        help="lightning: a checkpoint FedDyMemModule.load_from_checkpoint reads",
    )
    export.add_argument("--out", default="", help="output file (default: next to the checkpoint)")
    export.set_defaults(func=cmd_export)
    pred = sub.add_parser("predict", help="score images with a trained model: CSV + heatmap PNGs")
    pred.add_argument("checkpoint", help="runs/<name>/checkpoints/last.ckpt")
    pred.add_argument("inputs", nargs="+", help="image files and/or folders")
    pred.add_argument("--client", type=client_id, default=0, help="client model to use (default 0)")
    pred.add_argument(
        "--global",
        dest="global_model",
        action="store_true",
        help="use the global memory with the untrained generator and the global threshold",
    )
    pred.add_argument("--out", default="predictions", help="output folder (must be new or empty)")
    pred.add_argument(
        "--overwrite", action="store_true", help="replace predictions.csv and heatmaps/ of an existing --out folder"
    )
    pred.add_argument("--batch-size", type=positive_int, default=16)
    pred.add_argument(
        "--window",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="16-bit / float images: values mapped onto 0..255 (default: the training products' window, or each "
        "image's own range)",
    )
    pred.add_argument("--quiet", action="store_true")
    pred.set_defaults(func=cmd_predict)


def _add_data_commands(sub: Any) -> None:
    """``data check``: a data set's every problem, before training."""
    data = sub.add_parser("data", help="data set tools").add_subparsers(dest="data_command", required=True)
    check = data.add_parser(
        "check",
        help="count and decode every image of a data set",
        description="feddymem data check DATASET [key=value ...]",
    )
    check.add_argument("overrides", nargs="*", help="DATASET (name or .yaml), then config overrides")
    _config_file_option(check)
    check.add_argument("--quiet", action="store_true")
    check.set_defaults(func=cmd_data_check)


def _config_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="a whole config (a run's config.yaml) instead of configs/train.yaml and the data set file; "
        "overrides apply on top",
    )


def main(argv: list[str] | None = None) -> int:
    """The ``feddymem`` entry point: user errors are one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    for handler in logging.getLogger().handlers:  # Lightning's INFO lines have their own handler already
        handler.setLevel(logging.WARNING)
    if os.environ.get("CI"):
        os.environ.setdefault("WANDB_MODE", "offline")
    try:
        return args.func(args)
    except PeerFailure:
        return 2  # another process of the run failed and printed why: its line stays the last one
    except FedDyMemError as err:
        for line in str(err).splitlines():  # several problems found at once: one line each
            print(f"error: {line}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # an optional part that is not installed
        extra = {"flwr": "flower", "onnx": "export", "onnxruntime": "export"}.get(str(err.name).split(".")[0])
        hint = f": pip install 'feddymem[{extra}]'" if extra else ""
        print(f"error: {err.name} is not installed{hint}", file=sys.stderr)
        return 2
    except OSError as err:  # the filesystem or the network refused, outside the places that name the path
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
