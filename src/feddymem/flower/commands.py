"""``feddymem flower ...`` (also ``python -m feddymem.flower``): the files a cross-site deployment needs
(``docs/deploy.md``).

certificates --host H [--host H2] --out DIR   a CA and the SuperLink's TLS certificate for its names
node-key --name SITE --out DIR                a site's authentication key pair (send SITE.pub to the coordinator)
run-config --out FILE --run-dir DIR [overrides]  the run config of ``flwr run`` for a feddymem config
app-dir                                       the Flower App folder to pass to ``flwr run``
worker --supernode HOST:PORT [--runtime-ca F] a site's warm worker: runs its SuperNode's ClientApp tasks
supernode [flower-supernode arguments]        Flower's SuperNode, its message poll paced (0.1 s after a message)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_flower_parser(commands: Any) -> None:
    """Add ``flower`` and its sub-commands to ``commands`` (the sub-parsers of ``feddymem``)."""
    flower = commands.add_parser("flower", help="files of a cross-site Flower deployment (docs/deploy.md)")
    sub = flower.add_subparsers(dest="flower_command", required=True)
    certs = sub.add_parser("certificates", help="a CA and the SuperLink's certificate")
    certs.add_argument("--host", action="append", required=True, help="a DNS name or IP address the sites dial")
    certs.add_argument("--out", type=Path, required=True)
    certs.set_defaults(func=cmd_certificates)
    key = sub.add_parser("node-key", help="a site's authentication key pair")
    key.add_argument("--name", required=True)
    key.add_argument("--out", type=Path, required=True)
    key.set_defaults(func=cmd_node_key)
    run = sub.add_parser("run-config", help="the --run-config TOML of flwr run")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--run-dir", type=Path, required=True, help="where the ServerApp writes the run folder")
    run.add_argument("overrides", nargs="*", help="feddymem config overrides, e.g. dataset=sites.yaml")
    run.set_defaults(func=cmd_run_config)
    sub.add_parser("app-dir", help="print the Flower App folder").set_defaults(func=cmd_app_dir)
    worker = sub.add_parser(
        "worker", help="a site's warm worker: runs the ClientApp tasks of SuperNodes started with --isolation process"
    )
    worker.add_argument(
        "--supernode", action="append", required=True, metavar="HOST:PORT",
        help="a SuperNode's Runtime API (its --port; repeat for SuperNodes that share this worker)",
    )  # fmt: skip
    worker.add_argument(
        "--runtime-ca", type=Path, default=None,
        help="CA certificate of Runtime APIs served over TLS (flower-supernode --ssl-certfile)",
    )  # fmt: skip
    worker.set_defaults(func=cmd_worker)
    # Every argument is flower-supernode's (prefix "+": none is this parser's own, --help included).
    node = sub.add_parser(
        "supernode", prefix_chars="+", help="Flower's SuperNode (flower-supernode's arguments), its polls paced"
    )
    node.add_argument("arguments", nargs=argparse.REMAINDER, help="flower-supernode's arguments")
    node.set_defaults(func=cmd_supernode)


def cmd_certificates(args: argparse.Namespace) -> int:
    """``feddymem flower certificates``: a CA and the SuperLink's TLS certificate."""
    from feddymem.flower.local import make_certificates

    for name, path in make_certificates(args.out, tuple(args.host)).items():
        print(f"{name}: {path}")
    return 0


def cmd_node_key(args: argparse.Namespace) -> int:
    """``feddymem flower node-key``: a site's authentication key pair."""
    from feddymem.flower.local import make_node_keys

    private, public = make_node_keys(args.out, args.name)
    print(f"private key (stays on the site): {private}\npublic key (to the coordinator): {public}")
    return 0


def cmd_run_config(args: argparse.Namespace) -> int:
    """``feddymem flower run-config``: the run config of ``flwr run`` for a feddymem config."""
    from feddymem.config import load_config
    from feddymem.flower.local import run_config_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = run_config_file(load_config(args.overrides), args.run_dir.resolve(), args.out.parent)
    if path != args.out:
        path.replace(args.out)
    print(args.out)
    return 0


def cmd_app_dir(args: argparse.Namespace) -> int:
    """``feddymem flower app-dir``: the Flower App folder to pass to ``flwr run``."""
    from feddymem.flower.local import APP_DIR

    print(APP_DIR)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """``feddymem flower worker``: a site's warm worker, until stopped."""
    import contextlib
    import logging
    import os

    from feddymem.flower.worker import serve

    # A line per message with its time, on this process's own handler (feddymem's shows warnings only).
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s"))
    worker_log = logging.getLogger("feddymem.flower.worker")
    worker_log.setLevel(logging.INFO)
    worker_log.addHandler(handler)
    worker_log.propagate = False
    with contextlib.suppress(SystemExit):  # SIGTERM: stopped
        serve(list(args.supernode), args.runtime_ca)
    # Nothing is left to save (the node's state is Flower's; feature writes are flushed by then): skip the
    # interpreter's teardown of torch and every model it held, seconds that a federation's stop waits for.
    logging.shutdown()
    os._exit(0)


def cmd_supernode(args: argparse.Namespace) -> int:
    """``feddymem flower supernode``: ``flower-supernode`` with the paced poll of
    :mod:`feddymem.flower.supernode`, until stopped."""
    from feddymem.flower.supernode import main

    main(list(args.arguments))
    return 0
