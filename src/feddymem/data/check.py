"""``feddymem data check``: load every product, partition it, decode every image and mask, print counts."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from feddymem.data.datasets import verify_samples
from feddymem.data.partition import ClientData, hold_out, partition_clients
from feddymem.data.products import ProductSplit, load_product
from feddymem.logging.console import Reporter


@dataclass
class DataPlan:
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
    products = [load_product(p, d.test_fraction, d.seed, d.root) for p in d.products]
    clients = partition_clients(
        products,
        d.num_clients,
        method=d.partition,
        alpha=d.dirichlet_alpha,
        table=[list(r) for r in d.table],
        seed=d.seed,
        min_train=d.min_train_per_client,
    )
    hold_out(clients, d.holdout_fraction, d.seed)
    return DataPlan(products, clients)


def verify_plan(plan: DataPlan, reporter: Reporter, client_ids: list[int] | None = None) -> int:
    """Decode every image (and mask) the plan uses once, or only those of ``client_ids``; returns the count.
    Says which test sets give no metric and how wide (16-bit, float) images are read."""
    if client_ids is None:
        samples = {s.path: s for p in plan.products for s in (*p.train, *p.test, *p.valid)}
    else:
        samples = {
            s.path: s
            for k in client_ids
            for s in (*plan.clients[k].train, *plan.clients[k].holdout, *plan.clients[k].test)
        }
    with reporter.bars():
        wide = verify_samples(list(samples.values()), reporter.task("decoding images", len(samples)))
    if wide:
        reporter.warn(
            f"{len(wide)} image(s) are 16-bit or floating point (e.g. {wide[0]}); each is mapped onto 8 bits by "
            "its own minimum..maximum. Set the product's 'window: [low, high]' for a fixed window."
        )
    if client_ids is None or 0 in client_ids:  # once per run, by the server's process
        for gap in plan.metric_gaps():
            reporter.warn(gap)
    return len(samples)


def report_plan(plan: DataPlan, reporter: Reporter) -> None:
    rows = []
    for p in plan.products:
        normal = sum(s.label == 0 for s in p.test)
        rows.append(
            [
                p.name,
                str(len(p.train)),
                str(normal),
                str(len(p.test) - normal),
                str(len(p.valid)),
                "yes" if p.has_masks else "no",
            ]
        )
    reporter.table("products", ["product", "train (normal)", "test normal", "test anomalous", "valid", "masks"], rows)
    names = [p.name for p in plan.products]
    rows = []
    for c in plan.clients:
        counts = c.counts()
        rows.append(
            [
                str(c.client_id),
                *[str(counts.get(n, 0)) for n in names],
                str(len(c.train)),
                str(len(c.holdout)),
                str(len(c.test)),
            ]
        )
    reporter.table(
        "clients (training images per product)", ["client", *names, "train", "held-out normal", "test"], rows
    )


def check_data(cfg: DictConfig, reporter: Reporter) -> DataPlan:
    plan = plan_data(cfg)
    report_plan(plan, reporter)
    checked = verify_plan(plan, reporter)
    reporter.print(f"data check passed: {checked} images decoded, {len(plan.clients)} clients")
    return plan
