"""Plan the data (products, partition, held-out split) and check it: decode every image and mask, count.

Returns tables and warnings; printing them is the command line's job (``feddymem data check``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig

from feddymem.data.datasets import verify_samples
from feddymem.data.partition import ClientData, hold_out, partition_clients
from feddymem.data.products import ProductSplit, load_product
from feddymem.errors import DataError, every_problem


@dataclass
class DataPlan:
    """Every product's images and their partition over clients, before any image is decoded."""

    products: list[ProductSplit]
    clients: list[ClientData]

    def metric_gaps(self) -> list[str]:
        """Test sets that cannot give an image AUROC (no normal or no anomalous image), per product and client."""
        gaps = []
        for owner, test in [(f"product '{p.name}'", p.test) for p in self.products] + [
            (f"client {c.client_id}", c.test) for c in self.clients
        ]:
            labels = {s.label for s in test}
            missing = [name for label, name in ((0, "normal"), (1, "anomalous")) if label not in labels]
            if missing:
                gaps.append(
                    f"{owner}: its test set has no {' and no '.join(missing)} image, so its image AUROC "
                    "cannot be computed (reported as null)"
                )
        return gaps


def plan_data(cfg: DictConfig) -> DataPlan:
    """Products and their partition over clients, from a validated config; raises DataError on bad data."""
    d = cfg.data
    products, problems = [], []
    for product in d.products:  # every product's problem at once: a user fixes them in one go
        try:
            products.append(load_product(product, d.test_fraction, d.seed, d.root))
        except DataError as err:
            problems.append(str(err) if f"'{product.name}'" in str(err) else f"product '{product.name}': {err}")
    if problems:
        raise every_problem(problems, f"the data set '{cfg.dataset}'")
    clients = partition_clients(
        products,
        d.num_clients,
        method=d.partition.value,
        alpha=d.dirichlet_alpha,
        table=[list(r) for r in d.table],
        seed=d.seed,
        min_train=d.min_train_per_client,
    )
    hold_out(clients, d.holdout_fraction, d.seed)
    return DataPlan(products, clients)


def check_memory_images(cfg: DictConfig, plan: DataPlan, reduce: str, pooled: bool = False) -> None:
    """Before training: every memory keeps enough training images for ``reduce``, the memory-reduce it is
    built with (``coreset_mean`` averages one patch of each of max(min_cluster_size, min_images_per_item)
    images per item); ``pooled``: one memory of every client's images."""
    if reduce != "coreset_mean":
        return
    group = max(cfg.memory.min_cluster_size, cfg.memory.min_images_per_item)
    if pooled:
        memories = {"the pooled memory": sum(len(c.train) for c in plan.clients)}
    else:
        memories = {f"client {c.client_id}": len(c.train) for c in plan.clients}
    for owner, images in memories.items():
        if images < group:
            raise DataError(
                f"{owner} keeps {images} training images after the hold-out, "
                f"but memory.reduce=coreset_mean averages {group} images per item "
                "(max of memory.min_cluster_size, memory.min_images_per_item); raise "
                "data.min_train_per_client, lower data.holdout_fraction or use memory.reduce=cluster_mean"
            )


@dataclass
class Table:
    """A table for the command line to print: a title, column names, rows of strings."""

    title: str
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Verified:
    """What decoding a plan's images found: how many, and what the user should be told."""

    images: int
    warnings: list[str]


def verify_plan(
    plan: DataPlan,
    client_ids: list[int] | None = None,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
) -> Verified:
    """Decode every image (and mask) the plan uses once, or only those of ``client_ids``; raises DataError.

    ``progress(description, total)`` may hand out a per-image callback (a progress bar). The warnings say
    which test sets give no metric (once per run: with client 0) and how wide (16-bit, float) images are read."""
    if client_ids is None:
        samples = {s.path: s for p in plan.products for s in (*p.train, *p.test, *p.valid)}
    else:
        samples = {
            s.path: s
            for k in client_ids
            for s in (*plan.clients[k].train, *plan.clients[k].holdout, *plan.clients[k].test)
        }
    advance = progress("decoding images", len(samples)) if progress else None
    wide = verify_samples(list(samples.values()), advance)
    warnings = []
    if wide:
        warnings.append(
            f"{len(wide)} image(s) are 16-bit or floating point (e.g. {wide[0]}); each is mapped onto 8 bits by "
            "its own minimum..maximum. Set the product's 'window: [low, high]' for a fixed window."
        )
    if client_ids is None or 0 in client_ids:
        warnings += plan.metric_gaps()
    return Verified(len(samples), warnings)


def plan_tables(plan: DataPlan) -> list[Table]:
    """Counts per product and split, and training images per client and product."""
    products = []
    for p in plan.products:
        normal = sum(s.label == 0 for s in p.test)
        has_masks = "yes" if p.has_masks else "no"
        products.append(
            [p.name, str(len(p.train)), str(normal), str(len(p.test) - normal), str(len(p.valid)), has_masks]
        )
    names = [p.name for p in plan.products]
    clients = []
    for c in plan.clients:
        counts = c.counts()
        clients.append(
            [
                str(c.client_id),
                *[str(counts.get(n, 0)) for n in names],
                str(len(c.train)),
                str(len(c.holdout)),
                str(len(c.test)),
            ]
        )
    return [
        Table("products", ["product", "train (normal)", "test normal", "test anomalous", "valid", "masks"], products),
        Table("clients (training images per product)", ["client", *names, "train", "held-out normal", "test"], clients),
    ]
