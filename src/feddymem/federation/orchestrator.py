"""The Lightning Fabric orchestrator: rounds of local training, memory-reduce, server K-means, broadcast.

Round 0 builds the first global memory from untrained generators. Each later round every client
trains its generator for ``local_epochs`` against the current global memory, rebuilds and reduces its
memory and uploads it; the server clusters the uploads into the new global memory and broadcasts it;
every client is evaluated. Only memory crosses the client boundary: generators and optimisers stay
with their client and are never averaged or gradient-synced. A checkpoint is written after each round.

The baselines of the benchmarks run through the same rounds (``method=``): ``local`` (each client
with its own memory, nothing shared), ``centralized`` (one model on all clients' data, evaluated on
every client's test set), ``patchcore`` (the in-project PatchCore reference: pooled data, no
training, a greedy coreset of every training patch, nearest-patch scoring), ``fedavg``/``fedprox``
(the server averages generator parameters; each client keeps a local memory, rebuilt with the
averaged generator).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset

from feddymem.config import to_container, to_yaml
from feddymem.data.check import plan_data, verify_plan
from feddymem.data.datasets import ImageDataset, SyntheticAnomalyDataset
from feddymem.data.feature_cache import CachedFeatureDataset, FeatureCache
from feddymem.data.partition import ClientData
from feddymem.errors import CheckpointError, FedDyMemError, PeerFailure
from feddymem.federation.baselines import proximal_term
from feddymem.federation.checkpointing import RunCheckpoints, provenance
from feddymem.federation.distributed import (
    barrier,
    broadcast_from_server,
    clients_of_rank,
    gather_to_server,
    make_fabric,
)
from feddymem.federation.reporting import RunReporter, kept_record
from feddymem.federation.strategies import ServerLimits, ServerReply, make_strategy
from feddymem.federation.upload import UploadRejected, payload_bytes
from feddymem.io import (
    atomic_write_json,
    atomic_write_text,
    claim_output_dir,
    run_dir_problem,
)
from feddymem.lightning_model import FedDyMemModule
from feddymem.logging.console import Reporter
from feddymem.logging.experiment import find_wandb, heatmap_panel, make_loggers
from feddymem.memory.kmeans import resolve_gpu
from feddymem.memory.reduce import MemoryBank
from feddymem.metrics.auroc import auroc_score
from feddymem.metrics.normalize import ScoreNormalizer
from feddymem.metrics.threshold import normal_threshold

log = logging.getLogger(__name__)


class ClientTimeout(Exception):
    """A client ran past ``federation.client_timeout_s`` in a round."""


class TooFewClients(FedDyMemError):
    """Fewer than ``federation.min_clients`` valid uploads arrived in a round."""


@dataclass
class KeptState:
    """The state a client keeps: the round that is best by its held-out, normal-only criterion."""

    round: int
    criterion: float  # image AUROC of held-out normal images against cut-paste anomalies made from them
    model: dict[str, torch.Tensor]  # generator, radius and memory (FedDyMemModule.trainable_state)


@dataclass
class Client:
    """Everything one client holds; nothing here is shared with other clients."""

    data: ClientData
    module: FedDyMemModule
    optimizer: torch.optim.Optimizer
    train_set: ImageDataset  # what the generator trains on (all clients' images under centralized)
    memory_set: ImageDataset  # what the memory is built from (likewise)
    test_set: ImageDataset
    # Held-out normal images (never in the memory or in training): thresholds, score normalisation and
    # the criterion; the client's own training images when data.holdout_fraction is 0.
    normal_set: ImageDataset
    own_train_set: ImageDataset  # the client's own training images (train_set is pooled under centralized)
    synthetic_set: SyntheticAnomalyDataset | None = None  # cut-paste anomalies of the held-out images
    anchor: dict[str, torch.Tensor] | None = None  # FedProx: the last global generator parameters
    kept: KeptState | None = None

    @property
    def id(self) -> int:
        return self.data.client_id


class FederatedOrchestrator:
    """Runs a whole federated experiment described by a validated config, on one or many processes.

    Rank 0 is the server; client k lives on rank ``k % world_size``. Every rank runs this same code.
    """

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: str | Path,
        reporter: Reporter | None = None,
        resume: bool = False,
        feature_cache: FeatureCache | None = None,
    ) -> None:
        """``feature_cache``: reuse another run's backbone features (same backbone and pre-processing),
        as the benchmark suite does across methods; by default every run extracts its own."""
        self.cfg = cfg
        self.method = cfg.method.value  # a label for records and tables: behaviour is the strategy's
        self.strategy = make_strategy(cfg, server_gpu=resolve_gpu(cfg.server.gpu))
        self.pooled = self.strategy.pooled  # one model over every client's pooled training images
        self.run_dir = Path(run_dir)
        self.resume = resume
        f = cfg.federation
        loggers = make_loggers(cfg.logger.value, self.run_dir, self.run_dir.name, to_container(cfg), cfg.wandb_project)
        self.fabric = make_fabric(f.accelerator, f.devices, f.num_nodes, f.collective_timeout_s, loggers)
        self.reporter = reporter or Reporter(quiet=cfg.quiet)
        self.clients: list[Client] = []
        self.all_clients: list[ClientData] = []
        self.global_memory: torch.Tensor | None = None
        self.global_generator: dict[str, torch.Tensor] | None = None  # fedavg / fedprox
        self.cache = feature_cache
        self.history: list[dict[str, Any]] = []
        self.final_tests: dict[int, dict[str, Any]] = {}  # test metrics of kept states scored at the end
        self._product_scores: dict[tuple, tuple] = {}  # (state, product, images) → scores, labels, paths, metrics
        self.start_round = 0

    @property
    def is_server(self) -> bool:
        return self.fabric.global_rank == 0

    # --- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Launch processes, plan and check the data, build this rank's clients, restore a checkpoint."""
        self.fabric.launch()
        if not self.is_server:
            self.reporter = Reporter(quiet=True)
        # Every rank writes into rank 0's run folder (names with a timestamp differ between processes).
        problem = run_dir_problem(self.run_dir, self.resume) if self.is_server else None
        claim = {"run_dir": str(self.run_dir), "error": problem}
        claim = broadcast_from_server(self.fabric, claim)
        if claim["error"]:
            raise FedDyMemError(claim["error"]) if self.is_server else PeerFailure(claim["error"])
        self.run_dir = Path(claim["run_dir"])
        self.checkpoints = RunCheckpoints(self.run_dir)
        self.run_report = RunReporter(self.cfg, self.run_dir, self.reporter, self.fabric.loggers, self.fabric.log_dict)
        self.fabric.seed_everything(self.cfg.seed)
        plan = plan_data(self.cfg)  # cheap listing on every rank; decoding only of this rank's clients
        self.all_clients = plan.clients
        mine = clients_of_rank(len(plan.clients), self.fabric.global_rank, self.fabric.world_size)
        with self.reporter.bars():
            verified = verify_plan(plan, mine, progress=self.reporter.task)
        for warning in verified.warnings:
            self.reporter.warn(warning)
        if self.is_server:
            claim_output_dir(self.run_dir, "run folder")
            if not self.resume:
                atomic_write_text(self.run_dir / "config.yaml", to_yaml(self.cfg))
        d = self.cfg.data
        centralized = self.pooled
        pooled = [s for part in plan.clients for s in part.train]
        for client_id in mine:
            part = plan.clients[client_id]
            if not (centralized and self.clients):  # centralized: one model shared by every client
                torch.manual_seed(self.cfg.seed + client_id)
                # One frozen backbone per process, shared by its clients (it never trains).
                shared = self.clients[0].module.model.feature_extractor if self.clients else None
                module = FedDyMemModule.from_config(self.cfg, client_id, feature_extractor=shared)
                optimizer = module.configure_optimizers()
                module, optimizer = self.fabric.setup(module, optimizer)
            mean, std = module.model.feature_extractor.mean, module.model.feature_extractor.std

            def dataset(samples, augment=False, mean=mean, std=std):
                return ImageDataset(samples, d.image_size, d.crop_size, mean, std, augment=augment)

            own = dataset(part.train)
            train = pooled if centralized else part.train
            per_image = self.cfg.selection.synthetic_per_image
            synthetic = (
                SyntheticAnomalyDataset(
                    part.holdout,
                    per_image,
                    self.cfg.seed + client_id,
                    image_size=d.image_size,
                    crop_size=d.crop_size,
                    mean=mean,
                    std=std,
                )
                if part.holdout and per_image > 0
                else None
            )
            self.clients.append(
                Client(
                    part,
                    module,
                    optimizer,
                    dataset(train, augment=d.augment),
                    dataset(pooled) if centralized else own,
                    dataset(part.test),
                    dataset(part.holdout) if part.holdout else own,
                    own,
                    synthetic,
                )
            )
        if self.cache is None:
            extractor = self.clients[0].module.model.extract if self.clients else None
            self.cache = FeatureCache(
                extractor,
                max_bytes=int(self.cfg.cache.max_gb * 2**30),
                fp16_above_bytes=int(self.cfg.cache.fp16_above_gb * 2**30),
                batch_size=self.cfg.optim.eval_batch_size,
                device=self.fabric.device,
                num_workers=self.cfg.optim.num_workers,
                progress=self.reporter.task,
            )
        if self.resume:
            self.restore(self.checkpoints.read())

    def _cached(self, dataset: ImageDataset, description: str) -> Dataset:
        return self.cache.wrap(dataset, description) if self.cfg.cache.enabled else dataset

    def _loader(self, dataset: Dataset, *, shuffle: bool, seed: int = 0, train: bool = False) -> DataLoader:
        o = self.cfg.optim
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        # Cached features need no worker processes: workers would only copy tensors around, and the cache's
        # hit counts would stay in the workers.
        workers = 0 if isinstance(dataset, CachedFeatureDataset) else o.num_workers
        return DataLoader(
            dataset,
            batch_size=o.batch_size if train else o.eval_batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=workers,
        )

    # --- client side ------------------------------------------------------------------------------
    def local_training(self, client: Client, round_idx: int, deadline: float) -> float:
        """``local_epochs`` epochs of the metric loss against the client's current memory; mean loss.

        FedProx adds ``prox_mu / 2 · ||w - w_global||²`` over the generator's parameters.
        """
        module, optimizer = client.module, client.optimizer
        train_set = self._cached(client.train_set, f"client {client.id} features")
        mu = self.strategy.prox_mu
        module.train()
        losses = []
        for epoch in range(self.cfg.federation.local_epochs):
            # Seeded by (round, epoch, client): the same batches on any number of processes and after resume.
            seed = self.cfg.seed + 1_000_003 * round_idx + 1009 * epoch + client.id
            loader = self._loader(train_set, shuffle=True, seed=seed, train=True)
            advance = self.reporter.task(f"client {client.id} epoch {epoch + 1}", len(loader))
            for batch_idx, batch in enumerate(loader):
                if time.monotonic() > deadline:
                    raise ClientTimeout(f"client {client.id} ran past {self.cfg.federation.client_timeout_s}s")
                optimizer.zero_grad(set_to_none=True)
                loss = module.training_step(batch, batch_idx)
                if mu > 0 and client.anchor is not None:
                    loss = loss + mu / 2 * proximal_term(module.model.generator.named_parameters(), client.anchor)
                self.fabric.backward(loss)
                optimizer.step()
                advance(1)
            losses.append(float(module.train_loss.compute()) if module.train_loss.update_count else float("nan"))
            # Logged per round with the round as step (log_round); the module's own per-epoch self.log
            # is for plain Trainer use and would give the experiment loggers a second step counter.
            module.train_loss.reset()
        module.eval()
        return sum(losses) / len(losses) if losses else float("nan")

    def build_memory(self, client: Client) -> MemoryBank:
        """Rebuild and reduce the client's memory with its current generator."""
        memory_set = self._cached(client.memory_set, f"client {client.id} features")
        return client.module.build_memory(self._loader(memory_set, shuffle=False))

    def client_side(self, client: Client) -> _ClientSide:
        """What a strategy may do with ``client`` (its generator, its memory)."""
        return _ClientSide(client, lambda: self.build_memory(client))

    def client_update(self, client: Client, round_idx: int) -> dict[str, Any]:
        """After local training: what the client sends (``upload``, ``None`` for nothing) and its memory size."""
        update = self.strategy.client_update(self.client_side(client), round_idx)
        built = update.memory_items is not None
        stats = {"memory_items": update.memory_items, "num_images": update.num_images} if built else {}
        return {"upload": update.payload, **stats}

    def training_clients(self) -> list[Client]:
        """The clients that train this round: all of this rank's, or under ``centralized`` the one pooled model."""
        return self.clients[:1] if self.pooled else self.clients

    def client_round(self, client: Client, round_idx: int) -> dict[str, Any]:
        """Train (after round 0) and prepare the upload; a failure or timeout is reported, not raised."""
        t0 = time.perf_counter()
        timeout = self.cfg.federation.client_timeout_s
        deadline = time.monotonic() + timeout if timeout > 0 else float("inf")
        try:
            train = round_idx > 0 and self.cfg.federation.local_epochs > 0 and self.strategy.trains
            loss = self.local_training(client, round_idx, deadline) if train else float("nan")
            update = self.client_update(client, round_idx)
            if time.monotonic() > deadline:
                raise ClientTimeout(f"client {client.id} ran past {timeout}s")
        except Exception as err:  # a failing site must not stop the federation
            log.warning("client %d left out of round %d: %s", client.id, round_idx, err)
            return {
                "id": client.id,
                "upload": None,
                "error": f"{type(err).__name__}: {err}",
                "time_s": time.perf_counter() - t0,
            }
        return {"id": client.id, **update, "train_loss": loss, "time_s": time.perf_counter() - t0}

    def apply_server_message(self, reply: ServerReply) -> dict[int, float]:
        """Take the server's answer on every client of this rank; seconds each client spent on it."""
        seconds = {}
        for client in self.clients:
            t0 = time.perf_counter()
            self.strategy.apply(self.client_side(client), reply)
            if reply.generator is not None:
                client.anchor = reply.generator  # FedProx's proximal term pulls towards it (prox_mu > 0)
            seconds[client.id] = time.perf_counter() - t0
        if reply.memory is not None:
            self.global_memory = reply.memory
        if reply.generator is not None:
            self.global_generator = reply.generator
        return seconds

    def evaluate_held_out(self, client: Client) -> tuple[dict[str, Any], ScoreNormalizer]:
        """Every round, normal images only: thresholds, the per-product normaliser and the criterion."""
        t0 = time.perf_counter()
        normal_scores, normal_products = self.image_scores(client, client.normal_set)
        normalizer = ScoreNormalizer()
        if self.cfg.model.scoring.normalize.value == "product":
            # Statistics of all the client's normal images: the held-out ones alone are too few to be stable.
            train_scores, train_products = self.image_scores(client, client.own_train_set)
            normalizer = ScoreNormalizer.fit(np.r_[normal_scores, train_scores], normal_products + train_products)
        q, k_sigma = self.cfg.threshold_percentile, (self.cfg.threshold_k_sigma or None)
        by_product = {p: normal_scores[np.asarray(normal_products) == p] for p in dict.fromkeys(normal_products)}
        result = {
            "criterion": self.criterion(client, normalizer, normal_scores, normal_products),
            "normal_scores": normal_scores,
            "product_thresholds": {p: normal_threshold(v, q, k_sigma) for p, v in by_product.items()},
            "normalizer": normalizer.to_dict(),
            "held_out_time_s": time.perf_counter() - t0,
        }
        return result, normalizer

    def evaluate(self, client: Client, normalizer: ScoreNormalizer) -> dict[str, Any]:
        """The test set: image AUROC over the client's whole test set, and per product image AUROC, pixel
        AUROC and AUPRO.

        With ``model.scoring.normalize=product`` test scores are z-normalised per product by the client's
        normal images' scores (``normalizer``) before the client-level AUROC; per-product metrics do not
        change under it. The client's pixel AUROC and AUPRO are the means over its products that have masks.
        """
        t0 = time.perf_counter()
        test_set = self._cached(client.test_set, f"client {client.id} test features")
        module = client.module
        fingerprint = state_fingerprint(module.trainable_state())
        scores, labels, paths, products, per_product = [], [], [], [], {}
        for product in client.data.products:
            # Clients in the same state (round 0, or frozen generators with one global memory) score a
            # product's test images identically: score them once per process.
            key = (fingerprint, product, tuple(s.path for s in client.test_set.samples if s.product == product))
            if key not in self._product_scores:
                indices = [i for i, s in enumerate(client.test_set.samples) if s.product == product]
                p_scores, p_labels, p_paths = [], [], []
                with torch.no_grad():
                    for batch_idx, batch in enumerate(self._loader(Subset(test_set, indices), shuffle=False)):
                        p_scores.append(module.test_step(batch, batch_idx)["pred_score"].cpu())
                        p_labels.append(torch.as_tensor(batch["label"]))
                        p_paths += list(batch["path"])
                self._product_scores = {  # keep only the latest state's entries
                    k: v for k, v in self._product_scores.items() if k[0] == fingerprint
                }
                self._product_scores[key] = (
                    torch.cat(p_scores),
                    torch.cat(p_labels),
                    p_paths,
                    module.compute_test_metrics(),
                )
            p_scores, p_labels, p_paths, per_product[product] = self._product_scores[key]
            scores.append(p_scores)
            labels.append(p_labels)
            paths += p_paths
            products += [product] * len(p_paths)
        raw, labels_all = torch.cat(scores).double().numpy(), torch.cat(labels).numpy()
        scores_all = normalizer(raw, products)
        result: dict[str, Any] = {"image_auroc": auroc_score(scores_all, labels_all)}
        if self.cfg.model.scoring.normalize.value == "product":
            result["image_auroc_raw"] = auroc_score(raw, labels_all)
        for key in ("pixel_auroc", "aupro"):
            values = [m[key] for m in per_product.values() if key in m]
            if values:
                result[key] = float(np.mean(values))
        result["products"] = per_product
        result["scores"] = [(p, int(y), float(v)) for p, y, v in zip(paths, labels_all, scores_all, strict=True)]
        result["eval_time_s"] = time.perf_counter() - t0
        return result

    def tested(self, round_idx: int) -> bool:
        """Whether the test set is scored after ``round_idx`` (``federation.eval_every``; 0 = never, the kept
        states are scored once at the end)."""
        every = self.cfg.federation.eval_every
        return every > 0 and (round_idx % every == 0 or round_idx == self.cfg.federation.rounds)

    def final_evaluation(self) -> dict[int, dict[str, Any]]:
        """Test metrics of every client's kept state whose round was not scored on the test set (on rank 0)."""
        local = {}
        for client in self.clients:
            if client.kept is None or self.tested(client.kept.round):
                continue
            current = client.module.trainable_state()
            client.module.load_trainable_state(client.kept.model)
            _, normalizer = self.evaluate_held_out(client)
            local[client.id] = self.evaluate(client, normalizer)
            client.module.load_trainable_state(current)
        gathered = gather_to_server(self.fabric, local)
        if gathered is None:
            return {}
        results = {k: v for part in gathered for k, v in part.items()}
        rows = [(cid, *row) for cid, r in results.items() for row in r.pop("scores")]
        if rows:  # the kept states' per-image scores, for ROC curves (feddymem report)
            self.run_report.write_scores(rows)
        return results

    def image_scores(self, client: Client, dataset: ImageDataset) -> tuple[np.ndarray, list[str]]:
        """Raw image scores of ``dataset`` under the client's current model, and each image's product."""
        cached = self._cached(dataset, f"client {client.id} features")
        with torch.no_grad():
            scores = [client.module.score_batch(b)[1].cpu() for b in self._loader(cached, shuffle=False)]
        return torch.cat(scores).double().numpy(), [s.product for s in dataset.samples]

    def criterion(
        self, client: Client, normalizer: ScoreNormalizer, normal_raw: np.ndarray, normal_products: list[str]
    ) -> float:
        """Normal-only model-selection criterion: image AUROC of the held-out normal images against cut-paste
        anomalies made from them (NaN without held-out images; 0.5 when every score is the same up to
        float rounding, as from a collapsed generator, whose order would otherwise be noise)."""
        if client.synthetic_set is None:
            return float("nan")
        raw, products = self.image_scores(client, client.synthetic_set)
        every = np.r_[normal_raw, raw]
        if np.ptp(every) <= 1e-5 * max(float(np.abs(every).max()), 1e-12):
            return 0.5
        normal, synthetic = normalizer(normal_raw, normal_products), normalizer(raw, products)
        labels = np.r_[np.zeros(len(normal)), np.ones(len(synthetic))]
        return auroc_score(np.r_[normal, synthetic], labels)

    def keep_best(self, client: Client, round_idx: int, criterion: float) -> int:
        """Snapshot the client's state when ``criterion`` beats the kept one (ties keep the earlier round);
        the round now kept."""
        judged = criterion == criterion  # NaN without held-out images: nothing to judge by, keep the last
        better = client.kept is None or not judged or criterion > client.kept.criterion
        if self.cfg.selection.keep.value == "last" or better:
            client.kept = KeptState(round_idx, criterion, client.module.trainable_state())
        return client.kept.round

    # --- server side ------------------------------------------------------------------------------
    def patch_positions(self) -> int:
        """H·W: patches per image at the memory's resolution."""
        extractor = self.clients[0].module.model.feature_extractor if self.clients else None
        reduction = min(extractor.body.feature_info.reduction()) if extractor else 8
        return (self.cfg.data.crop_size // reduction) ** 2

    def memory_dim(self) -> int:
        """D: the dimension of memory items."""
        return self.clients[0].module.model.generator.out_channels

    def server_limits(self) -> ServerLimits:
        """What the server accepts: memory items of dimension D, at most this many, this many bytes."""
        s = self.cfg.server
        return ServerLimits(
            memory_dim=self.memory_dim(),
            max_items=max(s.max_upload_items, self.cfg.memory.size, self.patch_positions()),
            max_bytes=int(s.max_upload_mb * 2**20),
            global_items=s.size or self.patch_positions(),
            generator=self.clients[0].module.model.generator.state_dict(),
        )

    def accept_uploads(
        self, results: list[dict[str, Any]], round_idx: int, limits: ServerLimits
    ) -> list[dict[str, Any]]:
        """Validate every upload; returns the accepted ones (in client order), records the rest."""
        accepted = []
        for res in sorted(results, key=lambda r: r["id"]):
            if res["upload"] is None:
                continue
            try:
                self.strategy.validate(res["id"], res["upload"], limits)
                accepted.append(res)
            except UploadRejected as err:
                log.warning("round %d: %s", round_idx, err)
                res["error"], res["upload"] = str(err), None
        if len(accepted) < self.cfg.federation.min_clients:
            errors = "; ".join(r["error"] for r in results if r.get("error"))
            raise TooFewClients(
                f"round {round_idx}: {len(accepted)} valid uploads, federation.min_clients is "
                f"{self.cfg.federation.min_clients} ({errors or 'no errors reported'})"
            )
        return accepted

    def server_step(self, results: list[dict[str, Any]], round_idx: int) -> ServerReply:
        """Rank 0: check the uploads and build what goes down (a global memory, or averaged parameters)."""
        if not self.strategy.uploads_in(round_idx):  # a failing client is recorded, not counted against min_clients
            return ServerReply()
        limits = self.server_limits()
        accepted = self.accept_uploads(results, round_idx, limits)
        return self.strategy.aggregate(
            {r["id"]: r["upload"] for r in accepted},
            {r["id"]: len(self.all_clients[r["id"]].train) for r in accepted},
            round_idx,
            self.global_memory,
            limits,
        )

    # --- one round ------------------------------------------------------------------------------
    def run_round(self, round_idx: int) -> dict[str, Any] | None:
        """One round on every rank; the round record on rank 0, ``None`` elsewhere."""
        start = time.perf_counter()
        local = [self.client_round(c, round_idx) for c in self.training_clients()]
        gathered = gather_to_server(self.fabric, local)
        reply = ServerReply()
        results: list[dict[str, Any]] = []
        if self.is_server:
            results = [r for rank_results in gathered for r in rank_results]
            try:
                reply = self.server_step(results, round_idx)
            except TooFewClients as err:
                reply = ServerReply(error=str(err))
        reply = broadcast_from_server(self.fabric, reply)
        if reply.error:
            raise TooFewClients(reply.error) if self.is_server else PeerFailure(reply.error)
        update_seconds = self.apply_server_message(reply)
        evaluations = []
        for client in self.clients:
            evaluation, normalizer = self.evaluate_held_out(client)
            evaluation["kept_round"] = self.keep_best(client, round_idx, evaluation["criterion"])
            if self.tested(round_idx):
                evaluation.update(self.evaluate(client, normalizer), panel=self.panel(client))
            evaluations.append({"id": client.id, **evaluation, "update_time_s": update_seconds[client.id]})
        gathered_eval = gather_to_server(self.fabric, evaluations)
        if not self.is_server:
            return None
        down = payload_bytes(reply.memory) + payload_bytes(reply.generator)
        record: dict[str, Any] = {
            "round": round_idx,
            "method": self.method,
            "participants": reply.participants,
            "server": reply.stats,
            "clients": {},
        }
        by_id = {r["id"]: r for r in results}
        for cid in range(len(self.all_clients)):
            res = by_id.get(cid, {})  # centralized: only the pooled model trains
            entry: dict[str, Any] = {
                "time_s": res.get("time_s", 0.0),
                "uploaded": res.get("upload") is not None,
                "bytes_up": payload_bytes(res.get("upload")),
                "bytes_down": down,
                "train_images": len(self.all_clients[cid].train),
            }
            if "error" in res:
                entry["error"] = res["error"]
            elif res:
                entry["train_loss"] = res["train_loss"]
            if "memory_items" in res:
                entry["memory_items"] = res["memory_items"]
                # The bank before memory-reduce: every patch of every training image.
                entry["memory_patches"] = res["num_images"] * self.patch_positions()
            record["clients"][cid] = entry
        panels, score_rows, normal = {}, [], []
        q, k_sigma = self.cfg.threshold_percentile, (self.cfg.threshold_k_sigma or None)
        for ev in (e for rank_evals in gathered_eval for e in rank_evals):
            panels[ev["id"]] = ev.pop("panel", None)
            normal.append(ev.pop("normal_scores"))
            ev["threshold"] = normal_threshold(normal[-1], q, k_sigma)
            score_rows += [(ev["id"], *row) for row in ev.pop("scores", [])]
            record["clients"][ev.pop("id")].update(ev)
        self.run_report.log_panels(round_idx, panels)
        record["threshold"] = normal_threshold(np.concatenate(normal), q, k_sigma)  # the global model's threshold
        if score_rows:  # per-image scores of the latest scored round, for ROC curves (feddymem report)
            self.run_report.write_scores(score_rows)
        record["clients"] = dict(sorted(record["clients"].items()))
        record["bytes_up"] = sum(c["bytes_up"] for c in record["clients"].values())
        record["bytes_down"] = down * len(record["clients"])
        # NaN in rounds whose test set is not scored (federation.eval_every).
        record["mean_image_auroc"] = float(np.mean([c.get("image_auroc", np.nan) for c in record["clients"].values()]))
        criteria = [c["criterion"] for c in record["clients"].values() if c.get("criterion") == c.get("criterion")]
        record["mean_criterion"] = float(np.mean(criteria)) if criteria else float("nan")
        record["time_s"] = time.perf_counter() - start
        record["cache"] = {
            "extraction_s": self.cache.stats.extraction_seconds,
            "saved_s": self.cache.stats.saved_seconds,
            "bytes": self.cache.nbytes,
        }
        return record

    # --- pictures and W&B --------------------------------------------------------------------------
    def panel(self, client: Client) -> list[tuple[str, np.ndarray]] | None:
        """(path, input | heatmap overlay | mask strip) for up to ``panel_images`` test images, for W&B."""
        if self.cfg.logger.value != "wandb" or self.cfg.panel_images <= 0:
            return None
        samples = client.test_set.samples
        picks = np.linspace(0, len(samples) - 1, min(self.cfg.panel_images, len(samples))).round().astype(int)
        items = [client.test_set[i] for i in dict.fromkeys(picks.tolist())]
        with torch.no_grad():
            maps, _ = client.module.model(torch.stack([it["image"] for it in items]).to(self.fabric.device))
        vmax = float(maps.max())
        mean, std = client.module.model.feature_extractor.mean, client.module.model.feature_extractor.std
        return [
            (it["path"], heatmap_panel(it["image"], m, it["mask"] if it["has_mask"] else None, mean, std, vmax))
            for it, m in zip(items, maps, strict=True)
        ]

    # --- bookkeeping ----------------------------------------------------------------------------
    def client_states(self) -> dict[int, dict[str, Any]]:
        """Every client's model and optimiser state, gathered on rank 0 (small: no backbone)."""
        local = {
            c.id: {
                "model": c.module.trainable_state(),
                "optimizer": c.optimizer.state_dict(),
                "kept": None if c.kept is None else vars(c.kept),
            }
            for c in self.clients
        }
        gathered = gather_to_server(self.fabric, local)
        return {k: v for part in gathered for k, v in part.items()} if gathered is not None else {}

    def save(self, round_idx: int) -> None:
        """Atomic checkpoint after a complete round: round, global memory, all clients, partition, RNG."""
        states = self.client_states()
        if not self.is_server:
            return
        kept = kept_record(self.history, self.final_tests)["clients"]
        payload = {
            "round": round_idx,
            "method": self.method,
            "global_memory": None if self.global_memory is None else self.global_memory.clone(),
            "global_generator": self.global_generator,
            # Per client: "model" is the state after this round (for resume), "kept" the state a user gets.
            "clients": {
                k: {
                    **states[k],
                    "train": [s.path for s in self.all_clients[k].train],
                    "products": list(self.all_clients[k].products),
                    "threshold": kept[k]["threshold"],
                    "product_thresholds": kept[k].get("product_thresholds", {}),
                    "normalizer": kept[k].get("normalizer", {}),
                }
                for k in sorted(states)
            },
            "threshold": self.history[-1]["threshold"],
            "config": to_container(self.cfg),
            "history": self.history,
            # Batches, K-means and initialisations are seeded by (seed, round, epoch, client); the global
            # torch RNG is kept too, for anything user code draws from it.
            "rng": {"torch": torch.get_rng_state()},
            "provenance": provenance(self.cfg),
        }
        self.checkpoints.write(round_idx, payload, self.summary())

    def restore(self, payload: dict[str, Any]) -> None:
        """Continue after the checkpoint's round: same partition, states, memory and history."""
        for client in self.clients:
            saved = payload["clients"].get(client.id)
            if saved is None or saved["train"] != [s.path for s in client.data.train]:
                raise CheckpointError(
                    f"checkpoint does not match client {client.id}'s data partition; "
                    "was the data or the data config changed?"
                )
            client.module.load_trainable_state(saved["model"])  # includes the client's memory
            client.optimizer.load_state_dict(saved["optimizer"])
            client.kept = KeptState(**saved["kept"]) if saved.get("kept") else None
            if payload["global_memory"] is not None:
                client.module.set_global_memory(payload["global_memory"])
            client.anchor = payload.get("global_generator")  # FedProx's anchor (unused when prox_mu = 0)
        self.global_memory = payload["global_memory"]
        self.global_generator = payload.get("global_generator")
        self.history = list(payload["history"]) if self.is_server else []
        self.start_round = int(payload["round"]) + 1
        torch.set_rng_state(payload["rng"]["torch"])

    def summary(self) -> dict[str, Any]:
        final = kept_record(self.history, self.final_tests) if self.history else {}
        return {
            "run_dir": str(self.run_dir),
            "method": self.method,
            "world_size": self.fabric.world_size,
            "rounds": self.history,
            "final": {"mean_image_auroc": final.get("mean_image_auroc"), "clients": final.get("clients", {})},
            "cache": {
                "extracted_images": self.cache.stats.extracted,
                "extraction_s": self.cache.stats.extraction_seconds,
                "hits": self.cache.stats.hits,
                "saved_s": self.cache.stats.saved_seconds,
                "bytes": self.cache.nbytes,
                "fp16": self.cache.fp16,
            },
        }

    def should_stop(self, round_idx: int) -> bool:
        """Early stop (``selection.patience`` > 0): no client has improved its criterion for that many rounds."""
        if self.strategy.single_round:
            return True  # nothing trains: the round-0 memory is the model
        patience = self.cfg.selection.patience
        if patience <= 0 or round_idx >= self.cfg.federation.rounds:
            return False
        stop = None
        if self.is_server:
            latest = max(c.get("kept_round", round_idx) for c in self.history[-1]["clients"].values())
            stop = round_idx - latest >= patience
            if stop:
                self.reporter.print(f"stopping after round {round_idx}: no client improved for {patience} round(s)")
        return bool(broadcast_from_server(self.fabric, stop))

    def run(self) -> dict[str, Any] | None:
        """Set up, run the remaining rounds, checkpoint after each; the summary on rank 0.

        On several processes a user error names the process it happened on; the other processes stop
        with a :class:`PeerFailure`, which the command line does not print."""
        try:
            return self._run()
        except PeerFailure:
            raise
        except FedDyMemError as err:
            if self.fabric.world_size > 1:
                err.args = (f"process {self.fabric.global_rank} of {self.fabric.world_size}: {err}",)
            raise

    def _run(self) -> dict[str, Any] | None:
        self.setup()
        self.reporter.print(
            f"FedDyMem ({self.method}): {len(self.all_clients)} clients on {self.fabric.world_size} process(es), "
            f"rounds {self.start_round}..{self.cfg.federation.rounds}, device {self.fabric.device}, "
            f"run folder {self.run_dir}"
        )
        with self.reporter.bars():
            for round_idx in range(self.start_round, self.cfg.federation.rounds + 1):
                record = self.run_round(round_idx)
                if record is not None:
                    self.history.append(record)
                    self.run_report.log_round(record, tested=self.tested(record["round"]))
                self.save(round_idx)
                if self.should_stop(round_idx):
                    break
            self.final_tests = self.final_evaluation()
        barrier(self.fabric)
        if not self.is_server:
            return None
        if self.final_tests:
            atomic_write_json(self.run_dir / "metrics.json", self.summary())
        self.run_report.log_final(self.history, self.global_memory)
        for logger in self.fabric.loggers:
            logger.finalize("success")
        if (wandb_logger := find_wandb(self.fabric.loggers)) is not None:
            wandb_logger.experiment.finish()
        if self.history:
            self.run_report.print_table(kept_record(self.history, self.final_tests), self.history, self.all_clients)
        return self.summary()


class _ClientSide:
    """A :class:`~feddymem.federation.strategies.ClientSide` over one orchestrator client."""

    def __init__(self, client: Client, build_memory: Callable[[], MemoryBank]) -> None:
        self.client, self.build_memory = client, build_memory

    def generator_state(self) -> dict[str, torch.Tensor]:
        return self.client.module.model.generator.state_dict()

    def load_generator(self, state: dict[str, torch.Tensor]) -> None:
        self.client.module.model.generator.load_state_dict(state)

    def set_memory(self, items: torch.Tensor) -> None:
        self.client.module.set_global_memory(items)


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A digest of a client's trainable state (generator, radius, memory): equal states, equal scores."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
