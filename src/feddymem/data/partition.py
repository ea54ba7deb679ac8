"""Split each product's normal training images over clients (seeded Dirichlet or an explicit table)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from feddymem.data.products import ProductSplit, Sample
from feddymem.errors import DataError


@dataclass
class ClientData:
    """One client's share: its normal training images, its held-out normal images (never in the memory
    or in training: thresholds, score normalisation, model selection) and the test images of its products."""

    client_id: int
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    products: list[str] = field(default_factory=list)
    holdout: list[Sample] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Training images per product of this client."""
        return {p: sum(s.product == p for s in self.train) for p in self.products}


def split_counts(n: int, fractions: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``n`` closest to ``n * fractions`` (largest remainder)."""
    raw = n * fractions / fractions.sum()
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts))[: n - counts.sum()]:
        counts[i] += 1
    return counts


def partition_clients(
    products: list[ProductSplit],
    num_clients: int,
    *,
    method: str = "dirichlet",
    alpha: float = 0.5,
    table: list[list[float]] | None = None,
    seed: int = 0,
    min_train: int = 1,
    max_tries: int = 200,
) -> list[ClientData]:
    """Share every product's training images among ``num_clients`` clients.

    ``dirichlet``: each product's shares are drawn from Dir(alpha); draws are repeated (seeded) until
    every client has at least ``min_train`` images. ``table``: row k, column p is client k's fraction
    of product p. A client holds a product when it gets at least one of its training images.
    """
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(len(p.train)) for p in products]
    for _ in range(max_tries if method == "dirichlet" else 1):
        if method == "dirichlet":
            shares = np.stack([rng.dirichlet(np.full(num_clients, alpha)) for _ in products], axis=1)
        elif method == "table":
            shares = np.asarray(table, dtype=float)
            if shares.shape != (num_clients, len(products)) or (shares < 0).any():
                raise DataError(f"partition table must be {num_clients}×{len(products)} non-negative fractions")
        else:
            raise DataError(f"unknown partition method '{method}'")
        counts = np.stack(
            [
                split_counts(len(p.train), shares[:, j]) if shares[:, j].sum() > 0 else np.zeros(num_clients, int)
                for j, p in enumerate(products)
            ],
            axis=1,
        )
        if (counts.sum(axis=1) >= min_train).all():
            break
    else:
        if method == "dirichlet":
            raise DataError(
                f"cannot give each of {num_clients} clients at least {min_train} training images with "
                f"dirichlet_alpha={alpha} after {max_tries} draws; raise the alpha or lower min_train_per_client"
            )
    clients = [ClientData(k) for k in range(num_clients)]
    for j, product in enumerate(products):
        start = 0
        for k in range(num_clients):
            take = orders[j][start : start + counts[k, j]]
            start += counts[k, j]
            if len(take):
                clients[k].train += [product.train[i] for i in sorted(take)]
                clients[k].products.append(product.name)
                clients[k].test += product.test
    for client in clients:
        if len(client.train) < min_train:
            raise DataError(
                f"client {client.client_id} receives {len(client.train)} training images from the partition "
                f"(at least {min_train} needed); check 'data.table' or 'data.num_clients'"
            )
    return clients


def per_product_sample(samples: list[Sample], limit: int, seed: int = 0) -> list[int]:
    """Indices of at most ``limit`` samples of each product (all of a product with fewer; every sample when
    ``limit`` is 0), drawn without replacement with ``seed``, in their original order."""
    if limit <= 0:
        return list(range(len(samples)))
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for product in dict.fromkeys(s.product for s in samples):
        positions = [i for i, s in enumerate(samples) if s.product == product]
        chosen += positions if len(positions) <= limit else rng.choice(positions, size=limit, replace=False).tolist()
    return sorted(chosen)


def hold_out(clients: list[ClientData], fraction: float, seed: int = 0) -> None:
    """Move ``fraction`` of each client's normal training images of each product to ``holdout`` (in place).

    Per product: round(fraction · n) images, at least one when the client has two or more of that
    product and ``fraction`` > 0, and never all of them. Seeded by (seed, client).
    """
    if fraction <= 0:
        return
    for client in clients:
        rng = np.random.default_rng([seed, client.client_id])
        held: set[int] = set()
        for product in client.products:
            positions = [i for i, s in enumerate(client.train) if s.product == product]
            n = len(positions)
            count = min(n - 1, max(1 if n >= 2 else 0, round(fraction * n)))
            if count:
                held.update(positions[j] for j in rng.choice(n, size=count, replace=False).tolist())
        client.holdout = [s for i, s in enumerate(client.train) if i in held]
        client.train = [s for i, s in enumerate(client.train) if i not in held]
