"""The choices of the config: one enum per key that takes one of a few names (``memory.reduce``, ``method``, …).

Each member's value is what a user writes; the enums are ``str`` subclasses, so a member equals its name.
"""

from __future__ import annotations

import enum


class Reduce(str, enum.Enum):
    """How a client compresses its patch bank before upload (memory-reduce)."""

    position_mean = "position_mean"  # mean over images, position by position (n = H·W items)
    position_weighted = "position_weighted"  # as above, images weighted by closeness to the global memory
    cluster_mean = "cluster_mean"  # local K-means of all patches; each item is the mean of its members
    # greedy k-center centres (keeps rare normal patterns); each item the mean of the centre's nearest
    # patches from max(min_cluster_size, min_images_per_item) distinct images
    coreset_mean = "coreset_mean"
    coreset = "coreset"  # ablation "no memory-reduce": a greedy coreset of the full bank (raw patches)


class PrivacyProfile(str, enum.Enum):
    """A named upload setting on the privacy–accuracy frontier (``benchmarks/privacy/frontier``)."""

    standard = "standard"  # the defaults: the accurate end within the privacy rule
    strict = "strict"  # the knee: membership inference near chance, for a measured AUROC cost (README "Privacy")


class Method(str, enum.Enum):
    """What crosses the client boundary: the method and the baselines of the benchmarks."""

    feddymem = "feddymem"  # reduced memories up, K-means global memory down (the method)
    local = "local"  # every client alone with its own memory: nothing is shared
    centralized = "centralized"  # all clients' training data pooled in one model: the reference
    # PatchCore (Roth et al. 2022) in-project: pooled data, greedy coreset (memory.coreset_ratio) of every
    # training patch, nearest-patch score, no training; the accuracy reference for the benchmarks.
    patchcore = "patchcore"
    fedavg = "fedavg"  # generator parameters averaged by client size; every client keeps a local memory
    fedprox = "fedprox"  # FedAvg + proximal term mu/2 ||w - w_global||^2 in local training


class Aggregation(str, enum.Enum):
    """How the server turns the uploaded items into the global memory."""

    kmeans = "kmeans"  # FAISS K-means of all uploaded items (the method)
    mean = "mean"  # ablation: item-by-item weighted mean of position-aligned uploads
    coreset = "coreset"  # greedy k-center selection of the uploaded items: keeps rare normal patterns


class Rebuild(str, enum.Enum):
    """When clients rebuild and upload their memory."""

    every_round = "every_round"  # dynamic memory: re-encode and upload after every round (the method)
    once = "once"  # ablation: memory built in round 0 only; later rounds train against it


class Scoring(str, enum.Enum):
    """How a patch's distances to its nearest memory items become its score."""

    softmin = "softmin"  # nearest distance times its softmin weight over the k nearest (CFA)
    nearest = "nearest"  # plain nearest distance
    patchcore = "patchcore"  # nearest distance; image score = PatchCore's reweighted maximum


class GeneratorInit(str, enum.Enum):
    """The memory generator's initial weights."""

    identity = "identity"  # distance-preserving start: round 0 scores the backbone features as they are
    random = "random"  # PyTorch's default 1×1 conv initialisation, as CFA


class Normalize(str, enum.Enum):
    """Whether image scores are normalised per product before the client-level AUROC."""

    product = "product"  # scores z-normalised per product by the client's normal images' scores
    none = "none"  # raw distances


class Keep(str, enum.Enum):
    """Which round's state each client keeps."""

    best = "best"  # each client keeps the round that is best by its held-out normal-only criterion
    last = "last"  # the state after the last round


class Logger(str, enum.Enum):
    """Where per-round metrics go (besides ``metrics.json``)."""

    csv = "csv"
    wandb = "wandb"  # W&B (offline unless wandb_mode=online or WANDB_MODE=online) + the CSV log
    tensorboard = "tensorboard"  # TensorBoard event files in tensorboard/ + the CSV log (feddymem[dashboards])
    mlflow = "mlflow"  # an MLflow file store in mlruns/ + the CSV log (feddymem[dashboards])
    none = "none"


class WandbMode(str, enum.Enum):
    """Whether a W&B run uploads: only when asked for."""

    offline = "offline"  # files under the run folder; upload later with wandb sync
    online = "online"
    disabled = "disabled"


class Engine(str, enum.Enum):
    """What runs the rounds."""

    fabric = "fabric"  # Lightning Fabric: one process or many in one trusted cluster
    flower = "flower"  # Flower over TLS with SuperNode authentication (pip install feddymem[flower]); loopback here


class Partition(str, enum.Enum):
    """How products' training images are split over clients."""

    dirichlet = "dirichlet"
    table = "table"


class CheckpointKeep(str, enum.Enum):
    """Which ``round_NNN.ckpt`` files a run keeps beside ``last.ckpt`` (which holds every client's kept state)."""

    kept = "kept"  # the latest round's and each client's kept round's
    last = "last"  # none: last.ckpt alone
    all = "all"  # every round's
