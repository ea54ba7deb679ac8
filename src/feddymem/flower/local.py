"""A whole Flower federation on this machine: one SuperLink and one SuperNode per client on loopback, with
TLS (a generated CA and server certificate) and SuperNode authentication (a key pair per site, registered
with the SuperLink) unless told otherwise; the run is submitted with ``flwr run`` and the processes are
stopped afterwards. ``feddymem train federation.engine=flower`` and the tests use it; ``docs/deploy.md``
does the same by hand across machines. With ``netns`` (root, ``ip netns``) the SuperLink and every
SuperNode run in network namespaces of their own, joined by veth pairs instead of loopback."""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from feddymem.config import to_yaml
from feddymem.errors import FedDyMemError

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).parent / "app"
FEDDYMEM_FLOWER = [str(Path(sys.executable).parent / "feddymem"), "flower"]  # this environment's feddymem flower


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(pem, pkcs8, serialization.NoEncryption())


def make_certificates(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> dict[str, Path]:
    """A CA and a server certificate for ``hosts`` signed by it (PEM files in ``folder``)."""
    import ipaddress

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedDyMem loopback CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(_private_key_pem(key))
    return paths


def make_node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair in OpenSSH format (private, public), as Flower reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    pem, openssh_private = serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH
    private.write_bytes(key.private_bytes(pem, openssh_private, serialization.NoEncryption()))
    openssh = serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    public.write_bytes(key.public_key().public_bytes(*openssh))
    return private, public


@dataclass
class Namespaces:
    """Network namespaces for a federation on one machine: the SuperLink in ``<name>-link``, site K in
    ``<name>-sK``, joined to the SuperLink's namespace by a veth pair (10.77.K.1 there, 10.77.K.2 at the site)."""

    name: str
    sites: int

    @property
    def link(self) -> str:
        """The SuperLink's namespace."""
        return f"{self.name}-link"

    def site(self, k: int) -> str:
        """Site ``k``'s namespace."""
        return f"{self.name}-s{k}"

    @staticmethod
    def link_address(k: int) -> str:
        """The SuperLink's address as site ``k`` sees it."""
        return f"10.77.{k}.1"

    @staticmethod
    def run_in(namespace: str) -> list[str]:
        """The prefix that runs a command in ``namespace``."""
        return ["ip", "netns", "exec", namespace]

    def create(self) -> None:
        """Every namespace with its loopback up, and one veth pair per site."""
        _ip("netns", "add", self.link)
        _ip("-n", self.link, "link", "set", "lo", "up")
        for k in range(self.sites):
            site, outer, inner = self.site(k), f"{self.name}L{k}", f"{self.name}S{k}"
            _ip("netns", "add", site)
            _ip("-n", site, "link", "set", "lo", "up")
            _ip("link", "add", outer, "netns", self.link, "type", "veth", "peer", "name", inner, "netns", site)
            _ip("-n", self.link, "addr", "add", f"{self.link_address(k)}/30", "dev", outer)
            _ip("-n", site, "addr", "add", f"10.77.{k}.2/30", "dev", inner)
            _ip("-n", self.link, "link", "set", outer, "up")
            _ip("-n", site, "link", "set", inner, "up")

    def delete(self) -> None:
        """Remove the namespaces (and with them the veth pairs)."""
        for namespace in [self.link, *(self.site(k) for k in range(self.sites))]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise FedDyMemError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def netns_unavailable() -> str | None:
    """Why this machine cannot put a federation in network namespaces (``None`` when it can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no 'ip' command (iproute2)"
    probe = Namespaces(f"fdmp{os.getpid() % 10000}", 1)
    try:
        probe.create()
    except FedDyMemError as err:
        return f"cannot create network namespaces here: {err}"
    finally:
        probe.delete()
    return None


@dataclass
class LoopbackFederation:
    """The processes and files of one loopback federation."""

    home: Path
    port: int
    tls: bool
    certificates: dict[str, Path] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    coordinator: list[str] = field(default_factory=list)  # the prefix of the SuperLink's commands (a namespace)
    supernodes: list[subprocess.Popen] = field(default_factory=list)  # site K's SuperNode
    workers: list[subprocess.Popen] = field(default_factory=list)  # site K runs in workers[K % len(workers)]

    @property
    def env(self) -> dict[str, str]:
        """The environment of every Flower process: this Python's scripts first, FLWR_HOME in ``home``."""
        bin_dir = str(Path(sys.executable).parent)
        path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "PATH": path, "FLWR_HOME": str(self.home)}

    def tls_args(self, role: str) -> list[str]:
        """Command-line options for TLS (or ``--insecure``) of a SuperLink or SuperNode."""
        if not self.tls:
            return ["--insecure"]
        c = self.certificates
        if role == "superlink":
            return ["--ssl-ca-certfile", str(c["ca"]), "--ssl-certfile", str(c["cert"]), "--ssl-keyfile", str(c["key"])]
        return ["--root-certificates", str(c["ca"])]

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        """Start ``command`` (with its namespace prefix) with its output in ``home/<name>.log``."""
        path = self.home / f"{name}.log"
        with path.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        self.processes.append(process)
        self.logs.append(path)
        return process

    @property
    def flwr_command(self) -> list[str]:
        """The ``flwr`` command line, run against this federation's SuperLink (from its namespace)."""
        return [*self.coordinator, str(Path(sys.executable).parent / "flwr")]

    def stop(self) -> None:
        """Stop every process (SuperNodes first)."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()

    def tail(self, lines: int = 15) -> str:
        """The last lines of every log, for error messages."""
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) for p in self.logs
        )


def _wait_for_port(port: int, timeout: float, prefix: list[str] | None = None) -> None:
    """Until something listens on 127.0.0.1:``port`` (in the namespace of ``prefix``)."""
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if prefix:
            if subprocess.run([*prefix, sys.executable, "-c", probe], capture_output=True, check=False).returncode == 0:
                return
        else:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
        time.sleep(0.2)
    raise FedDyMemError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")


@contextmanager
def loopback_federation(
    num_sites: int,
    node_config: list[str],
    *,
    tls: bool = True,
    authenticate: bool = True,
    workdir: Path | None = None,
    startup_timeout: float = 60.0,
    netns: bool = False,
    workers: int | None = None,
    on_superlink: Callable[[LoopbackFederation], Any] | None = None,
) -> Iterator[LoopbackFederation]:
    """A SuperLink and ``num_sites`` SuperNodes (``node_config[k]`` each) on loopback; stopped on exit.

    With ``authenticate`` the SuperLink accepts only the SuperNodes whose public keys were registered with
    ``flwr supernode register`` (requires ``tls``). With ``netns`` every process runs in a network namespace
    of its own (:class:`Namespaces`) and the sites reach the SuperLink over veth addresses. The sites' messages
    run in ``workers`` long-lived site workers (:mod:`feddymem.flower.worker`; site K in worker K mod
    ``workers``; ``None``: :func:`loopback_workers`, one per site with ``netns``, where a worker reaches the
    SuperNodes of its own namespace only); with ``0``, each message runs in the fresh process Flower starts
    for it. ``on_superlink(fed)`` is called once the SuperLink is up, before the sites start (to submit a run
    early). Its files (logs, certificates, the SuperLink's database) go in a new folder under ``workdir``,
    which is kept; without ``workdir``, in the system's temporary folder, removed when the federation stops
    cleanly and kept (its path logged) when it stops on an error."""
    if authenticate and not tls:
        raise FedDyMemError("SuperNode authentication needs TLS")
    if netns and workers not in (None, 0, num_sites):
        raise FedDyMemError(f"with netns a site's worker shares its namespace: workers=0 or {num_sites}, not {workers}")
    home = Path(tempfile.mkdtemp(prefix="feddymem-flower-", dir=workdir))
    fed = LoopbackFederation(home=home, port=free_port(), tls=tls)
    stopped_cleanly = False
    namespaces = Namespaces(f"fdm{os.getpid() % 10000}", num_sites) if netns else None
    hosts = ("127.0.0.1", "localhost", *(Namespaces.link_address(k) for k in range(num_sites if netns else 0)))
    if tls:
        fed.certificates = make_certificates(home / "certificates", hosts)
    connection: dict[str, Any] = {"address": f"127.0.0.1:{fed.port}"}
    if tls:
        connection["root-certificates"] = str(fed.certificates["ca"])
    else:
        connection["insecure"] = True
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "local", "local": connection}}))
    try:
        superlink = ["flower-superlink", *fed.tls_args("superlink"), "--port", str(fed.port)]
        superlink += ["--database", str(home / "superlink.db")]
        superlink += ["--enable-supernode-auth"] if authenticate else []
        if namespaces:
            namespaces.create()
            fed.coordinator = Namespaces.run_in(namespaces.link)
            superlink += ["--host", "0.0.0.0"]  # reachable from every site's veth
        if workers is None:
            workers = num_sites if netns else loopback_workers(num_sites)
        pool = min(workers, num_sites)
        runtime_ports = [free_port() for _ in range(num_sites)]  # each SuperNode's Runtime API, on 127.0.0.1
        # First: their imports overlap the SuperLink's start and the keys' registration. A worker asks its
        # SuperNodes for tasks until they answer.
        for w in range(pool):
            prefix = Namespaces.run_in(namespaces.site(w)) if namespaces else []
            worker = [*FEDDYMEM_FLOWER, "worker"]
            for k in range(w, num_sites, pool):
                worker += ["--supernode", f"127.0.0.1:{runtime_ports[k]}"]
            fed.workers.append(fed.start(f"worker{w}", [*prefix, *worker]))
        fed.start("superlink", [*fed.coordinator, *superlink])
        _wait_for_port(fed.port, startup_timeout, fed.coordinator)
        if on_superlink is not None:
            on_superlink(fed)
        keys = [make_node_keys(home / "keys", f"site{k}") for k in range(num_sites)] if authenticate else []
        _register_keys(fed, [public for _, public in keys], startup_timeout)
        for k in range(num_sites):
            address = f"{Namespaces.link_address(k) if namespaces else '127.0.0.1'}:{fed.port}"
            prefix = Namespaces.run_in(namespaces.site(k)) if namespaces else []
            # flower-supernode with its message poll paced (feddymem.flower.supernode): 0.1 s after a message
            node = [*prefix, *FEDDYMEM_FLOWER, "supernode", *fed.tls_args("supernode"), "--superlink", address]
            node += ["--port", str(runtime_ports[k]), "--node-config", node_config[k]]
            node += ["--isolation", "process"] if pool else []  # its worker runs its ClientApp tasks
            if authenticate:
                node += ["--auth-supernode-private-key", str(keys[k][0])]
            fed.supernodes.append(fed.start(f"supernode{k}", node))
        yield fed
        stopped_cleanly = True
    finally:
        fed.stop()
        if namespaces:
            namespaces.delete()
        if workdir is None and stopped_cleanly:
            shutil.rmtree(home, ignore_errors=True)
        elif workdir is None:
            log.warning("the loopback federation's logs are kept in %s", home)


def keep_logs(fed: LoopbackFederation, folder: Path) -> None:
    """Copy the logs of every process of ``fed`` (SuperLink, SuperNodes, site workers, ``flwr run``) into
    ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for log_path in [*fed.logs, fed.home / "flwr_run.log"]:
        if log_path.is_file():
            shutil.copyfile(log_path, folder / log_path.name)


def loopback_workers(num_sites: int) -> int:
    """How many site workers a loopback federation on this machine runs: one per site where each can have two
    cores, fewer where the machine has fewer (its sites then share them and take turns, each message with
    every core of its worker, as the Fabric engine's one process does), one at least."""
    return max(1, min(num_sites, (os.cpu_count() or 1) // 2))


def _register_keys(fed: LoopbackFederation, public_keys: list[Path], timeout: float) -> None:
    """Register every site's public key with the SuperLink (``flwr supernode register``), all at once."""
    flwr = [*fed.flwr_command, "supernode", "register"]
    pipe = subprocess.PIPE
    running = [
        subprocess.Popen([*flwr, str(key), "local"], env=fed.env, stdout=pipe, stderr=subprocess.STDOUT, text=True)
        for key in public_keys
    ]
    for key, process in zip(public_keys, running, strict=True):
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            output = f"no answer within {timeout:g}s"
        if process.returncode != 0:
            raise FedDyMemError(f"cannot register {key.stem}'s key: {output}")


def run_config_file(cfg: Any, run_dir: Path, folder: Path) -> Path:
    """The ``--run-config`` TOML of a run: its whole config and its run folder."""
    path = folder / "run_config.toml"
    path.write_text(tomli_w.dumps({"config-yaml": to_yaml(cfg), "run-dir": str(run_dir)}))
    return path


def submit(fed: LoopbackFederation, cfg: Any, run_dir: Path, timeout: float) -> str:
    """Submit the FedDyMem app with ``flwr run`` and follow it to its end; its log (:func:`start_run`,
    :func:`follow_run`)."""
    return follow_run(fed, start_run(fed, cfg, run_dir), timeout)


def start_run(fed: LoopbackFederation, cfg: Any, run_dir: Path) -> subprocess.Popen:
    """Submit the FedDyMem app with ``flwr run`` (its log in ``fed.home/flwr_run.log``); the SuperLink must be
    up, the sites need not be: the ServerApp waits for them (``federation.collective_timeout_s``)."""
    command = [*fed.flwr_command, "run", str(APP_DIR), "local"]
    command += ["--run-config", str(run_config_file(cfg, run_dir, fed.home)), "--stream"]
    with (fed.home / "flwr_run.log").open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=fed.env)


def follow_run(fed: LoopbackFederation, run: subprocess.Popen, timeout: float) -> str:
    """Follow a submitted run to its end; its log. A SuperLink or SuperNode that stops on the way ends the run
    at once with its own words."""
    log_path = fed.home / "flwr_run.log"
    deadline = time.monotonic() + timeout
    try:
        while run.poll() is None:
            stopped = [(p, log) for p, log in zip(fed.processes, fed.logs, strict=True) if p.poll() is not None]
            if stopped:
                process, log = stopped[0]
                lines = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
                raise FedDyMemError(f"{log.stem} stopped (exit code {process.returncode}):\n{lines}")
            if time.monotonic() > deadline:
                raise FedDyMemError(f"the Flower run did not finish within {timeout:g}s")
            time.sleep(0.5)
    finally:
        if run.poll() is None:
            run.terminate()
            run.wait(timeout=15)
    return log_path.read_text(errors="replace")


def run_on_loopback(cfg: Any, run_dir: Path, *, tls: bool = True, authenticate: bool = True) -> dict[str, Any]:
    """``feddymem train federation.engine=flower``: the run on a loopback federation, one site per client;
    the summary the ServerApp wrote to ``metrics.json``."""
    import json

    # Each site writes its own model under the run folder (sites/site_K/client_K.ckpt), as a real site would
    # on its own disk.
    sites = cfg.data.num_clients
    threads = max(1, (os.cpu_count() or 1) // loopback_workers(sites))  # the cores shared out between workers
    nodes = [f'client-id={k} threads={threads} out="{run_dir.resolve() / "sites" / f"site_{k}"}"' for k in range(sites)]
    timeout = max(600.0, float(cfg.federation.collective_timeout_s))
    runs: list[subprocess.Popen] = []

    def submit_early(fed: LoopbackFederation) -> None:
        # As soon as the SuperLink is up: the ServerApp starts (imports, strategy) while the sites do.
        runs.append(start_run(fed, cfg, run_dir))

    try:
        with loopback_federation(sites, nodes, tls=tls, authenticate=authenticate, on_superlink=submit_early) as fed:
            try:
                output = follow_run(fed, runs[0], timeout=timeout * (cfg.federation.rounds + 2))
            finally:  # the federation's own logs stay with the run (its folder is removed when it stops)
                keep_logs(fed, run_dir / "logs" / "loopback")
            metrics = run_dir / "metrics.json"
            if not metrics.is_file():
                raise FedDyMemError(f"the Flower run did not finish:\n{output[-3000:]}\n{fed.tail()}")
    finally:  # a federation that failed to start leaves no run behind
        for run in runs:
            if run.poll() is None:
                run.terminate()
                run.wait(timeout=15)
    return json.loads(metrics.read_text())
