"""A site's side of the Flower engine, around the ClientApp's handlers (:mod:`feddymem.flower.apps`): what
config, data and device a message runs with, its own checkpoint, and the egress policy every reply obeys."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from feddymem.config import (
    ACCELERATORS,
    config_from_yaml,
    dataset_config_path,
    load_yaml,
    merge_checked,
    to_container,
)
from feddymem.data.check import DataPlan, plan_data, verify_plan
from feddymem.data.feature_cache import CacheStats
from feddymem.errors import CheckpointError, ConfigError, FedDyMemError
from feddymem.federation.checkpointing import provenance
from feddymem.federation.client import Client, Loaders, build_clients, make_feature_cache
from feddymem.federation.client_runner import ClientRunner
from feddymem.federation.egress import EgressPolicy
from feddymem.federation.evaluation import Evaluator, TestScores
from feddymem.federation.messages import ClientEvaluation
from feddymem.federation.strategies import make_strategy
from feddymem.federation.wire import MalformedMessage
from feddymem.flower.records import describe, from_records, load_client_state, save_client_state
from feddymem.io import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def enforce_egress(message: Message, context: Context, call_next: Any) -> Message:
    """Around every handler of a site: its reply checked against the site's :class:`EgressPolicy` (a reply
    that breaks it is not sent: the server gets an error instead), and with ``out`` in the node config every
    message in and out described in ``out/messages.jsonl`` (:func:`describe`), the site's own audit log."""
    node_config = dict(context.node_config)
    reply = call_next(message, context)
    if out := node_config.get("out"):
        folder = Path(str(out))
        folder.mkdir(parents=True, exist_ok=True)
        kind = message.metadata.message_type
        with (folder / "messages.jsonl").open("a") as log_file:
            log_file.write(json.dumps({"direction": "in", "type": kind, "records": describe(message.content)}) + "\n")
            if reply.has_content():
                log_file.write(
                    json.dumps({"direction": "out", "type": kind, "records": describe(reply.content)}) + "\n"
                )
    if reply.has_content():
        sent = from_records(reply.content)
        if problems := EgressPolicy.from_node_config(node_config).problems(sent.arrays, sent.config):
            raise FedDyMemError(f"this site's egress policy refuses its reply: {'; '.join(problems)}")
    return reply


def run_config(content: RecordDict, state: RecordDict) -> Any:
    """The run's config: sent whole once (``query.identify``) and kept in the site's ``state``; every later
    message names it by its digest (``config-sha``) only."""
    setup = content.get("setup")
    if not isinstance(setup, ConfigRecord) or not isinstance(sha := setup.get("config-sha"), str):
        raise MalformedMessage("the server's message has no 'config-sha'")
    if isinstance(yaml := setup.get("config-yaml"), str):
        if hashlib.sha256(yaml.encode()).hexdigest() != sha:
            raise MalformedMessage("the server's config does not match its 'config-sha'")
        state["config"] = ConfigRecord({"yaml": yaml, "sha": sha})
    kept = state.get("config")
    if not isinstance(kept, ConfigRecord) or kept.get("sha") != sha:
        raise MalformedMessage(f"this site has not been sent the run's config {sha[:12]} (query.identify comes first)")
    return config_from_yaml(str(kept["yaml"]), "the server's config")


def site_setup(content: RecordDict, node_config: dict[str, Any], state: RecordDict) -> tuple[Any, int, DataPlan, int]:
    """The server's config, this site's client id, its data plan and the index of its share in the plan.

    With ``dataset=/path/site.yaml`` in the node config the site's own images (all of them) are its share;
    without, the server's ``data`` node is partitioned as in the Fabric engine and the site takes share K
    (one machine, or sites that all see the same files)."""
    set_site_threads(node_config)
    if "client-id" not in node_config:
        raise ConfigError("this SuperNode has no client id: start it with --node-config 'client-id=K'")
    client_id = int(node_config["client-id"])
    cfg = run_config(content, state)
    share = client_id
    if dataset := node_config.get("dataset"):
        path = dataset_config_path(str(dataset))
        cfg.data = merge_checked(cfg, {"data": load_yaml(path)}, str(path)).data
        cfg.data.num_clients, share = 1, 0
    plan = plan_data(cfg)
    if share >= len(plan.clients):
        raise ConfigError(f"client-id {client_id}: the data plan has {len(plan.clients)} clients")
    plan.clients[share].client_id = client_id
    return cfg, client_id, plan, share


def set_site_threads(node_config: dict[str, Any]) -> None:
    """``threads=N`` in the node config: the CPU threads this site's torch uses (``0``, the default: torch's
    own choice, every core). Sites that share one machine (a trial, the loopback engine) each take their
    share, so that their processes do not fight over the same cores."""
    value = str(node_config.get("threads", "0"))
    if not value.isdigit():
        raise ConfigError(f"node config 'threads' must be a whole number of CPU threads (0: all); got '{value}'")
    if int(value) > 0:
        torch.set_num_threads(int(value))


def site_fabric(node_config: dict[str, Any], cfg: Any) -> L.Fabric:
    """The site's own device, one process: ``accelerator`` of its node config (``auto``: its GPU where it has
    one), else the coordinator's ``federation.accelerator``."""
    accelerator = str(node_config.get("accelerator", cfg.federation.accelerator))
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"node config 'accelerator' must be one of {', '.join(ACCELERATORS)}; got '{accelerator}'")
    return L.Fabric(accelerator=accelerator, devices=1)


def site_cache_dir(node_config: dict[str, Any], cfg: Any) -> str:
    """Where this site keeps backbone features between messages and runs (each message runs in a fresh
    process): its node config's ``cache-dir`` ("" turns it off), else the config's ``cache.dir``, else
    ``$XDG_CACHE_HOME/feddymem/features`` (``~/.cache/...``). The features never leave the site."""
    if "cache-dir" in node_config:
        return str(node_config["cache-dir"])
    if cfg.cache.dir:
        return str(cfg.cache.dir)
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "feddymem" / "features")


class WarmRunners:
    """A site worker's runners of the current run, one per node it serves, kept between messages
    (:mod:`feddymem.flower.worker`): the backbone, the data plan and the features in memory are built once per
    run instead of once per message. The node's ``context.state`` stays the truth: a kept runner takes the
    state of every message's context."""

    def __init__(self) -> None:
        self.kept: dict[tuple[int, int], tuple[tuple, ClientRunner]] = {}  # (run, node) → (key, runner)
        self.scores = TestScores()  # shared by the runners' evaluators: sites in one state score it once

    @staticmethod
    def key_of(message: Message, context: Context) -> tuple | None:
        """Which runner a message needs: its run, node, node config and the run config's digest."""
        setup = message.content.get("setup")
        sha = setup.get("config-sha") if isinstance(setup, ConfigRecord) else None
        if not isinstance(sha, str):
            return None
        return context.run_id, context.node_id, sha, tuple(sorted((k, str(v)) for k, v in context.node_config.items()))

    def get(self, message: Message, context: Context) -> ClientRunner | None:
        """The kept runner for this message, with the message's state and fresh cache counts; else ``None``."""
        key = self.key_of(message, context)
        kept = self.kept.get((context.run_id, context.node_id))
        if key is None or kept is None or kept[0] != key:
            return None
        runner = kept[1]
        set_site_threads(dict(context.node_config))
        runner.loaders.cache.stats = CacheStats()  # each message's log counts its own work
        load_client_state(runner.clients[0], context.state)
        return runner

    def keep(self, message: Message, context: Context, runner: ClientRunner) -> None:
        """Keep ``runner`` for its node (one run at a time: the runners of an earlier run are let go)."""
        if (key := self.key_of(message, context)) is None:
            return
        if any(node[0] != context.run_id for node in self.kept):
            self.scores = TestScores()
        self.kept = {node: kept for node, kept in self.kept.items() if node[0] == context.run_id}
        self.kept[(context.run_id, context.node_id)] = (key, runner)

    def forget(self) -> None:
        """Let go of every kept runner (after a message failed: its state may be half-changed)."""
        self.kept = {}
        self.scores = TestScores()


# Set by a site worker (it runs every message of its sites); a ClientApp process that lives for one message
# builds its runner every time.
warm_runners: WarmRunners | None = None


def site_runner(message: Message, context: Context) -> ClientRunner:
    """This site's client runner for one message: the server's config, the site's data, device and state."""
    if warm_runners is not None and (kept := warm_runners.get(message, context)) is not None:
        return kept
    runner = _build_site_runner(message, context)
    if warm_runners is not None:
        warm_runners.keep(message, context, runner)
    return runner


def _build_site_runner(message: Message, context: Context) -> ClientRunner:
    node_config = dict(context.node_config)
    cfg, client_id, plan, share = site_setup(message.content, node_config, context.state)
    strategy = make_strategy(cfg)
    if "verified" not in context.state:  # decode every image once per site and run
        verify_plan(plan, [share])
        context.state["verified"] = MetricRecord({"at": time.time()})
    fabric = site_fabric(node_config, cfg)
    clients = build_clients(cfg, {client_id: plan.clients[share]}, [client_id], strategy, fabric.setup)
    cache = make_feature_cache(cfg, clients, fabric.device, folder=site_cache_dir(node_config, cfg))
    loaders = Loaders(cfg, cache)
    scores = warm_runners.scores if warm_runners is not None else None
    evaluator = Evaluator(cfg, loaders, fabric.device, scores)
    runner = ClientRunner(cfg, strategy, clients, loaders, evaluator, fabric.backward)
    if "model" in context.state:  # this run's state, from the site's previous message
        load_client_state(clients[0], context.state)
    elif isinstance(resume := message.content.get("resume"), MetricRecord):
        if not isinstance(resumed := resume.get("round"), int):
            raise MalformedMessage("the server's 'resume' record has no round")
        restore_site(runner, node_config, resumed, context.state)
    return runner


def restore_site(runner: ClientRunner, node_config: dict[str, Any], round_idx: int, state: RecordDict) -> None:
    """A resumed run: the site's state after ``round_idx`` from its own checkpoint (``out/client_K.ckpt``,
    written after every round), into this run's ``state``. The coordinator's checkpoint holds no site's model.
    A site lost before ``round_idx`` rejoins with the state it saved last (its kept state and thresholds
    included): its first round trains against the global memory it saved, the next server reply brings it up
    to date. The site keeps the checkpoint of the round before too: a coordinator that stopped after its sites
    saved a round but before it recorded it resumes that round, and its sites with it."""
    client = runner.clients[0]
    if not (out := node_config.get("out")):
        raise CheckpointError(
            f"site {client.id} cannot resume: its SuperNode has no out= folder, where its state was saved"
        )
    path = Path(str(out)) / f"client_{client.id}.ckpt"
    checkpoints = [load_checkpoint(p) for p in (path, previous_checkpoint(path)) if p.is_file()]
    if not checkpoints:
        raise CheckpointError(f"site {client.id} cannot resume: no checkpoint {path}")
    usable = [payload for payload in checkpoints if int(payload["round"]) <= round_idx]
    if not usable:
        raise CheckpointError(
            f"site {client.id} cannot resume round {round_idx + 1}: its checkpoint {path} is from round "
            f"{checkpoints[0]['round']}, later than the coordinator's"
        )
    payload = max(usable, key=lambda p: int(p["round"]))
    if (saved_round := int(payload["round"])) < round_idx:  # lost on the way: it rejoins with its last state
        log.warning("site %d rejoins at round %d from its round %d state", client.id, round_idx + 1, saved_round)
    runner.restore(payload)
    saved = payload["clients"][client.id]
    kept = {k: saved[k] for k in ("threshold", "product_thresholds", "normalizer")}
    state["kept_thresholds"] = ConfigRecord({"json": json.dumps(kept)})
    save_client_state(client, state)


def log_feature_cache(node_config: dict[str, Any], kind: str, runner: ClientRunner) -> None:
    """With ``out`` in the node config, a line per message in ``out/features.jsonl``: how many images this
    message extracted, how many it read back from the site's disk cache and how many items it found in
    memory (a site worker's; the site's own log, it never leaves the site)."""
    if not (out := node_config.get("out")):
        return
    stats = runner.loaders.cache.stats
    line = {"type": kind, "extracted": stats.extracted, "extraction_s": stats.extraction_seconds, "hits": stats.hits}
    line |= {"from_disk": stats.from_disk, "disk_s": stats.disk_seconds}
    runner.loaders.cache.stats = CacheStats()  # the next line counts its own work
    folder = Path(str(out))
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "features.jsonl").open("a") as log_file:
        log_file.write(json.dumps(line) + "\n")


def write_site_checkpoint(
    folder: Path, cfg: Any, client: Client, evaluation: ClientEvaluation, round_idx: int, state: RecordDict
) -> Path:
    """``folder/client_K.ckpt``: the site's model as ``feddymem predict/export`` load it (its kept state, the
    thresholds of its kept round, the config), written atomically on the site after every round; it never
    leaves the site."""
    if evaluation.kept_round == round_idx:  # the kept state was just replaced: so are its thresholds
        kept = {
            "threshold": evaluation.normal.threshold,
            "product_thresholds": evaluation.product_thresholds,
            "normalizer": evaluation.normalizer,
        }
        state["kept_thresholds"] = ConfigRecord({"json": json.dumps(kept)})
    kept = json.loads(str(state["kept_thresholds"]["json"]))
    saved = {
        "module": dict(client.module.hparams),
        "model": client.module.trainable_state(),
        "optimizer": client.optimizer.state_dict(),  # with the rest, what a resumed run continues from
        "kept": None if client.kept is None else vars(client.kept),
        "train": [s.path for s in client.data.train],
        "products": list(client.data.products),
        **kept,
    }
    payload = {
        "round": round_idx,
        "method": cfg.method.value,
        "engine": "flower",
        "global_memory": None,  # the site's memory is in its model
        "global_generator": client.anchor,  # FedProx's anchor
        "clients": {client.id: saved},
        "threshold": kept["threshold"],
        "config": to_container(cfg),
        "provenance": provenance(cfg),
    }
    path = folder / f"client_{client.id}.ckpt"
    if path.is_file():  # kept: the coordinator records a round after its sites, and may stop in between
        os.replace(path, previous_checkpoint(path))
    save_checkpoint(path, payload)
    return path


def previous_checkpoint(path: Path) -> Path:
    """Where a site keeps the checkpoint of the round before ``path``'s."""
    return path.with_name(f"{path.stem}.previous{path.suffix}")
