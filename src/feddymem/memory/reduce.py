"""Memory build and memory-reduce (SPEC §3): a client's patch bank → a small upload.

Every reduction is a weighted average of patch embeddings, so no item is a single image's patch:

* ``position_mean``: mean over images, position by position (n = H·W items);
* ``position_weighted``: the same with images weighted by how well they fit the global memory;
* ``cluster_mean``: local K-means over all patches, each item the mean of its members (weight = count);
* ``coreset_mean``: greedy k-center centres (PatchCore's selection: the bank's extent, rare normal
  patterns included), each item the mean of the centre's nearest patches from as many distinct images.

``position_*`` can add a second stage (local K-means of the n items to n/γ_c).

``coreset`` is the "no memory-reduce" ablation: a greedy k-center coreset of the raw patch bank
(PatchCore's selection), ``coreset_ratio`` of all patches, each a real patch of one image (weight 1).

Given each image's product (``image_groups``), ``coreset_mean`` and ``coreset`` run one k-center per product,
with items in proportion to its patches: a product's share of the upload no longer depends on how spread
its patches are next to another product's, and no item averages patches of two products (except a
product of fewer images than an item averages, which joins the client's largest).

With ``noise`` (``privacy.noise_multiplier`` > 0) ``cluster_mean`` and ``position_mean`` release noisy sums
instead (:mod:`feddymem.memory.noise`). ``coreset`` uploads raw patches and ``position_weighted``
weighs each image by statistics of all the others: neither has a bounded sensitivity.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from feddymem.data.partition import split_counts
from feddymem.memory.coreset import coreset_mean, greedy_coreset
from feddymem.memory.kmeans import kmeans
from feddymem.memory.noise import NoiseSettings, private_cluster_mean, private_position_mean
from feddymem.memory.search import squared_distances

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryReduceSettings:
    """How a client reduces its patch bank to an upload (config ``memory.*`` and ``privacy.*``'s noise);
    the defaults are ``feddymem train``'s."""

    method: str = "coreset_mean"  # memory.reduce: see the module docstring
    # method=cluster_mean / position_*: items (capped at patches / min_cluster_size); 0 = H·W
    size: int = 3136
    local_kmeans_ratio: int = 1  # γ_c: second-stage local K-means to size/γ_c items (position_* only)
    coreset_ratio: float = 0.02  # method=coreset_mean / coreset: items as a fraction of the client's patches
    # method=coreset_mean / coreset: one k-center per product of the client (within seed noise over 4 seeds:
    # benchmarks/quality/per_product)
    per_product: bool = False
    kmeans_iters: int = 10
    max_points_per_centroid: int = 16  # K-means subsamples above this; the final means use every patch
    min_cluster_size: int = 3  # privacy: no item averages fewer patches
    min_images_per_item: int = 1  # privacy: no item averages patches of fewer images
    noise: NoiseSettings = field(default_factory=NoiseSettings)  # privacy.*: off by default

    def __post_init__(self) -> None:
        if isinstance(self.method, enum.Enum):  # the schema's Reduce
            object.__setattr__(self, "method", self.method.value)
        if isinstance(self.noise, dict):  # from hparams or JSON
            object.__setattr__(self, "noise", NoiseSettings(**self.noise))

    def to_dict(self) -> dict[str, Any]:
        """Plain values for hparams and JSON (the noise nested)."""
        return asdict(self)


@dataclass
class MemoryBank:
    """What a client uploads: items (M, D) and how many patches each one averages (M,)."""

    items: torch.Tensor
    weights: torch.Tensor
    num_images: int
    releases: int = 0  # Gaussian mechanisms that made it (privacy.noise_multiplier > 0); 0 = no noise

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that cross the client boundary."""
        return {"items": self.items, "weights": self.weights}

    @property
    def nbytes(self) -> int:
        """Bytes of the upload: items and weights."""
        return sum(t.element_size() * t.nelement() for t in self.tensors().values())


def rows_side_by_side(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """(M, D₁ + D₂ + …): row i of every part side by side, M the longest part's rows; a shorter part
    repeats its rows cyclically (a repeated item changes no nearest distance)."""
    count = max(p.shape[0] for p in parts)
    return torch.cat([p[torch.arange(count) % p.shape[0]] for p in parts], dim=1).contiguous()


def side_by_side(banks: Sequence[MemoryBank]) -> MemoryBank:
    """One bank whose item i is every bank's item i side by side (:func:`rows_side_by_side`): a memory
    item's parts, reduced on their own. Weights are the first part's, the releases add up (each part is a
    release of its own).
    """
    items = rows_side_by_side([b.items for b in banks])
    first = banks[0]
    weights = first.weights[torch.arange(items.shape[0]) % first.weights.shape[0]]
    return MemoryBank(items, weights, first.num_images, sum(b.releases for b in banks))


def split_parts(bank: MemoryBank, parts: int) -> list[MemoryBank]:
    """The inverse view of :func:`side_by_side`: ``parts`` banks of equal width, sharing the weights."""
    return [
        MemoryBank(items.contiguous(), bank.weights, bank.num_images, bank.releases)
        for items in bank.items.chunk(parts, dim=1)
    ]


def distinct_items(bank: MemoryBank) -> MemoryBank:
    """``bank`` with each repeated item once, its weight the sum of its copies' (rows in sorted order).

    The repeats :func:`side_by_side` makes are no data: K-means over them would meet exact ties, which
    it breaks differently with different thread counts."""
    items, inverse = torch.unique(bank.items, dim=0, return_inverse=True)
    weights = torch.zeros(items.shape[0], dtype=bank.weights.dtype).index_add_(0, inverse, bank.weights)
    return MemoryBank(items, weights, bank.num_images, bank.releases)


def position_mean(embeddings: torch.Tensor, image_weights: torch.Tensor | None = None) -> torch.Tensor:
    """(N, D, H, W) → (H·W, D): weighted mean over images at every patch position."""
    n = embeddings.shape[0]
    w = (
        torch.full((n,), 1.0 / n, dtype=embeddings.dtype, device=embeddings.device)
        if image_weights is None
        else (image_weights / image_weights.sum()).to(embeddings)
    )
    mean = torch.einsum("n,ndhw->dhw", w, embeddings)
    return mean.flatten(1).T.contiguous()


def fit_weights(embeddings: torch.Tensor, global_memory: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Per-image weights exp(-(s_i - min s) / median s), s_i = mean nearest squared distance to the memory.

    Images that the global memory already explains weigh more; outliers weigh less.
    """
    scores = []
    for start in range(0, embeddings.shape[0], chunk):
        batch = embeddings[start : start + chunk]
        patches = batch.permute(0, 2, 3, 1).reshape(-1, batch.shape[1])
        nearest = squared_distances(patches, global_memory.to(patches)).min(dim=1).values
        scores.append(nearest.view(batch.shape[0], -1).mean(dim=1))
    s = torch.cat(scores)
    scale = s.median().clamp_min(1e-12)
    return torch.exp(-(s - s.min()) / scale)


def cluster_mean(
    patches: torch.Tensor,
    size: int,
    *,
    iters: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 64,
    min_cluster_size: int = 1,
    weights: torch.Tensor | None = None,
    gpu: bool = False,
    image_of: torch.Tensor | None = None,
    min_images: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K-means of ``patches`` (P, D) to ``size`` clusters; items are the exact (weighted) means of all members.

    Clusters with fewer than ``min_cluster_size`` members, or (given ``image_of``, each patch's image index)
    with members from fewer than ``min_images`` distinct images, are dropped. When none is that large the
    upload is one item, the mean of every patch (``ValueError`` when there are fewer patches than
    ``min_cluster_size``): no item ever averages fewer patches. Returns items (M, D) and their total
    member weight (M,).
    """
    p = patches.float().cpu()
    w = torch.ones(p.shape[0]) if weights is None else weights.float().cpu()
    result = kmeans(
        p, size, iters=iters, seed=seed, weights=w, gpu=gpu, max_points_per_centroid=max_points_per_centroid
    )
    k = result.centroids.shape[0]
    mass = torch.zeros(k).index_add_(0, result.assignments, w)
    members = torch.zeros(k).index_add_(0, result.assignments, torch.ones_like(w))
    sums = torch.zeros(k, p.shape[1]).index_add_(0, result.assignments, p * w[:, None])
    keep = (members >= min_cluster_size) & (mass > 0)
    distinct = 0
    if image_of is not None and min_images > 1:
        # Distinct images per cluster: count the distinct (cluster, image) pairs.
        stride = int(image_of.max()) + 1
        pairs = torch.unique(result.assignments.long() * stride + image_of.long())
        keep &= torch.bincount(pairs // stride, minlength=k) >= min_images
        distinct = len(torch.unique(image_of))
    if not keep.any():
        if p.shape[0] < min_cluster_size or float(w.sum()) <= 0 or (distinct and distinct < min_images):
            raise ValueError(
                f"{p.shape[0]} patches cannot make an item that averages {min_cluster_size} or more patches"
                + (f" of {min_images} or more images" if distinct else "")
            )
        return (p * w[:, None]).sum(0, keepdim=True) / w.sum(), w.sum().view(1)
    return sums[keep] / mass[keep, None], mass[keep]


def reduce_memory(
    embeddings: torch.Tensor,
    settings: MemoryReduceSettings | None = None,
    *,
    global_memory: torch.Tensor | None = None,
    seed: int = 0,
    gpu: bool = False,
    image_groups: Sequence[Hashable] | None = None,
) -> MemoryBank:
    """Reduce a client's embeddings (N, D, H, W) to an upload (see the module docstring); ``settings``:
    the defaults when ``None``.

    ``image_groups``: each image's product (any hashable label); ``coreset_mean`` and ``coreset`` then
    reduce each product on its own (see :func:`image_groups_of`); the other methods reduce the whole bank.
    """
    s = settings or MemoryReduceSettings()
    n, _, h, w = embeddings.shape
    if n == 0:
        raise ValueError("memory-reduce needs at least one image")
    size = s.size or h * w
    emb = embeddings.float()
    if s.noise.enabled:
        return _private_reduce(emb, s.method, size, s.noise, global_memory, s.local_kmeans_ratio, s.min_cluster_size)
    if s.method == "cluster_mean":
        return _cluster_upload(emb, s, size, seed, gpu)
    if s.method in ("coreset_mean", "coreset"):
        return _coreset_upload(emb, s, seed, image_groups)
    if s.method in ("position_mean", "position_weighted"):
        return _position_upload(emb, s, size, seed, gpu, global_memory)
    raise ValueError(f"unknown memory-reduce method '{s.method}'")


def _cluster_upload(emb: torch.Tensor, s: MemoryReduceSettings, size: int, seed: int, gpu: bool) -> MemoryBank:
    """``cluster_mean``: local K-means of every patch, each item the mean of its cluster."""
    n, d, h, w = emb.shape
    patches = emb.permute(0, 2, 3, 1).reshape(-1, d)
    # Privacy: a larger memory must never turn the upload into raw patches. At most one item per
    # min_cluster_size patches, so that each item can average that many.
    cap = max(1, patches.shape[0] // max(1, s.min_cluster_size))
    if size > cap:
        log.info(
            "memory.size %d capped to %d items: %d patches, memory.min_cluster_size %d",
            size,
            cap,
            patches.shape[0],
            s.min_cluster_size,
        )
        size = cap
    items, mass = cluster_mean(
        patches,
        size,
        iters=s.kmeans_iters,
        seed=seed,
        gpu=gpu,
        max_points_per_centroid=s.max_points_per_centroid,
        min_cluster_size=s.min_cluster_size,
        # Each image's patches are contiguous in ``patches``: image i holds rows i·H·W … (i+1)·H·W − 1.
        image_of=torch.arange(n).repeat_interleave(h * w),
        min_images=s.min_images_per_item,
    )
    return MemoryBank(items, mass, n)


def _coreset_upload(
    emb: torch.Tensor, s: MemoryReduceSettings, seed: int, image_groups: Sequence[Hashable] | None
) -> MemoryBank:
    """``coreset_mean`` / ``coreset``: k-center over the patches, one per product given ``image_groups``."""
    n, _, h, w = emb.shape
    group = max(s.min_cluster_size, s.min_images_per_item) if s.method == "coreset_mean" else 1
    parts = image_groups_of(image_groups, n, group)
    # The whole bank's item count, split over the groups in proportion to their images (= patches).
    counts = split_counts(max(1, round(s.coreset_ratio * n * h * w)), np.array([len(i) for i in parts], float))
    uploads = [
        _coreset_items(emb[i] if len(parts) > 1 else emb, s.method, int(c), group, seed)
        for i, c in zip(parts, counts, strict=True)
        if c
    ]
    return MemoryBank(torch.cat([u[0] for u in uploads]), torch.cat([u[1] for u in uploads]), n)


def _position_upload(
    emb: torch.Tensor,
    s: MemoryReduceSettings,
    size: int,
    seed: int,
    gpu: bool,
    global_memory: torch.Tensor | None,
) -> MemoryBank:
    """``position_mean`` / ``position_weighted``: the mean over images at each position, then optionally a
    second stage of local K-means (``local_kmeans_ratio``) or K-means down to ``size``."""
    n = emb.shape[0]
    weighted = s.method == "position_weighted" and global_memory is not None and global_memory.numel() > 0
    image_weights = fit_weights(emb, global_memory) if weighted and global_memory is not None else None
    items = position_mean(emb, image_weights).cpu()
    mass = torch.full((items.shape[0],), float(n))
    if s.local_kmeans_ratio > 1 or size < items.shape[0]:
        count = max(1, items.shape[0] // s.local_kmeans_ratio) if s.local_kmeans_ratio > 1 else size
        items, mass = cluster_mean(
            items,
            count,
            iters=s.kmeans_iters,
            seed=seed,
            weights=mass,
            max_points_per_centroid=s.max_points_per_centroid,
            gpu=gpu,
        )
    return MemoryBank(items.contiguous(), mass, n)


def image_groups_of(image_groups: Sequence[Hashable] | None, n: int, min_images: int) -> list[torch.Tensor]:
    """Indices of the images of each group (in first-seen order), from each image's label; one group of
    every image when ``image_groups`` is ``None``. A group of fewer than ``min_images`` images joins the
    largest group: an item must average that many images."""
    if image_groups is None:
        return [torch.arange(n)]
    if len(image_groups) != n:
        raise ValueError(f"image_groups has {len(image_groups)} labels for {n} images")
    members: dict[Hashable, list[int]] = {}
    for i, label in enumerate(image_groups):
        members.setdefault(label, []).append(i)
    largest = max(members, key=lambda label: len(members[label]))
    for label in [g for g, images in members.items() if len(images) < min_images and g != largest]:
        members[largest] += members.pop(label)
    return [torch.tensor(sorted(images)) for images in members.values()]


def _coreset_items(
    embeddings: torch.Tensor, method: str, count: int, group: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` items of ``coreset_mean`` (each the mean of ``group`` images' patches) or raw ``coreset``
    patches from embeddings (N, D, H, W); items and the patches each averages."""
    n, d, h, w = embeddings.shape
    patches = embeddings.permute(0, 2, 3, 1).reshape(-1, d)
    if method == "coreset":
        picks = greedy_coreset(patches, count, seed=seed)
        return patches[picks].cpu().contiguous(), torch.ones(len(picks))
    return coreset_mean(
        patches,
        torch.arange(n).repeat_interleave(h * w),  # image i holds rows i·H·W … (i+1)·H·W − 1
        min(count, max(1, patches.shape[0] // group)),  # as cluster_mean: at most one item per group patches
        group=group,
        seed=seed,
    )


def _private_reduce(
    emb: torch.Tensor,
    method: str,
    size: int,
    noise: NoiseSettings,
    global_memory: torch.Tensor | None,
    local_kmeans_ratio: int,
    min_cluster_size: int,
) -> MemoryBank:
    """The noisy counterpart of each memory-reduce; later steps (position_*'s second stage) only
    post-process what was released."""
    if method == "cluster_mean":
        released = private_cluster_mean(emb, size, noise, init=global_memory, min_cluster_size=min_cluster_size)
    elif method == "position_mean":
        released = private_position_mean(emb, noise)
        target = released.items.shape[0] // local_kmeans_ratio if local_kmeans_ratio > 1 else size
        if target < released.items.shape[0]:
            released.items, released.weights = cluster_mean(
                released.items, target, weights=released.weights, min_cluster_size=1
            )
    else:  # coreset: raw patches; position_weighted: each image's weight depends on the others'
        raise ValueError(f"privacy noise supports memory.reduce=cluster_mean or position_mean, not {method}")
    return MemoryBank(released.items, released.weights, emb.shape[0], released.releases)
