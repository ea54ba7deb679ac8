"""``python -m feddymem.flower``: the files a cross-site deployment needs (``docs/deploy.md``).

certificates --host H [--host H2] --out DIR   a CA and the SuperLink's TLS certificate for its names
node-key --name SITE --out DIR                a site's authentication key pair (send SITE.pub to the coordinator)
run-config --out FILE --run-dir DIR [overrides]  the run config of ``flwr run`` for a feddymem config
app-dir                                       the Flower App folder to pass to ``flwr run``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from feddymem.errors import FedDyMemError


def main(argv: list[str] | None = None) -> int:
    """Run one of the commands above; the exit code."""
    from feddymem.flower.local import APP_DIR, make_certificates, make_node_keys, run_config_file

    parser = argparse.ArgumentParser(prog="python -m feddymem.flower", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    certs = commands.add_parser("certificates", help="a CA and the SuperLink's certificate")
    certs.add_argument("--host", action="append", required=True, help="a DNS name or IP address the sites dial")
    certs.add_argument("--out", type=Path, required=True)
    key = commands.add_parser("node-key", help="a site's authentication key pair")
    key.add_argument("--name", required=True)
    key.add_argument("--out", type=Path, required=True)
    run = commands.add_parser("run-config", help="the --run-config TOML of flwr run")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--run-dir", type=Path, required=True, help="where the ServerApp writes the run folder")
    run.add_argument("overrides", nargs="*", help="feddymem config overrides, e.g. dataset=sites.yaml")
    commands.add_parser("app-dir", help="print the Flower App folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "certificates":
            for name, path in make_certificates(args.out, tuple(args.host)).items():
                print(f"{name}: {path}")
        elif args.command == "node-key":
            private, public = make_node_keys(args.out, args.name)
            print(f"private key (stays on the site): {private}\npublic key (to the coordinator): {public}")
        elif args.command == "run-config":
            from feddymem.config import load_config

            args.out.parent.mkdir(parents=True, exist_ok=True)
            path = run_config_file(load_config(args.overrides), args.run_dir.resolve(), args.out.parent)
            if path != args.out:
                path.replace(args.out)
            print(args.out)
        else:
            print(APP_DIR)
    except FedDyMemError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
