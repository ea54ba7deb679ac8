"""The FedDyMem model in plain PyTorch: no Lightning, no Fabric.

``FedDyMemModel`` = frozen feature extractor + trainable memory generator + metric loss + a memory
buffer (the global memory, or a local bank before one exists) + scoring. The LightningModule and the
federation wrap it; anything else (export, other projects) can use it directly.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from feddymem.memory.reduce import MemoryBank, MemoryReduceSettings, reduce_memory, side_by_side
from feddymem.memory.search import MemoryIndex, faiss_gpu_available, nearest_neighbour_spread, squared_distances
from feddymem.models.anomaly_map import AnomalyMapGenerator
from feddymem.models.backbone import FeatureExtractor
from feddymem.models.generator import MemoryGenerator
from feddymem.models.loss import HypersphereLoss
from feddymem.models.settings import ModelSettings


def softmin_scores(distances: torch.Tensor, method: str = "softmin") -> torch.Tensor:
    """(P, k) sorted Euclidean distances → (P,) patch scores: nearest distance × its softmin weight
    (``softmin``), or the nearest distance (``nearest``, ``patchcore``)."""
    if method != "softmin" or distances.shape[1] == 1:
        return distances[:, 0]
    return F.softmin(distances, dim=1)[:, 0] * distances[:, 0]


def memory_parts(context: int) -> int:
    """Descriptors side by side in a memory item: the patch part, and a context part with a context window."""
    return 2 if context else 1


class FedDyMemModel(nn.Module):
    """Feature extractor → generator → (loss against memory | anomaly map and score).

    With a context window (``context`` > 0) each memory item holds two parts side by side, (M, 2·D): a
    patch item and a context item, reduced, uploaded and aggregated part by part. The context part is
    the embeddings averaged over ``context``×``context`` patches (every ``context // 2`` patches); its
    map, scored against the context items, is added to the patch map, each divided by its memory's
    :func:`~feddymem.memory.search.nearest_neighbour_spread`. It outlines large, low-contrast defects
    that a patch's neighbourhood does not show (benchmarks/quality). The image score stays the patch
    map's maximum unless ``context_in_score`` (it helped some products and hurt others). The metric loss
    uses the patch part.
    """

    memory: torch.Tensor
    part_scales: torch.Tensor

    def __init__(
        self, settings: ModelSettings | None = None, feature_extractor: FeatureExtractor | None = None
    ) -> None:
        """``settings``: the defaults (``feddymem train``'s) when ``None``. ``feature_extractor``: share another
        model's frozen backbone (it must match ``backbone``, ``layers``, ``weights`` and ``pool_size``), so the
        clients of one process hold one copy."""
        super().__init__()
        s = self.settings = settings or ModelSettings()
        self.approximate_above, self.nprobe = s.approximate_above, s.nprobe
        self.feature_extractor = feature_extractor or FeatureExtractor(s.backbone, s.layers, s.weights, s.pool_size)
        self.generator = MemoryGenerator(
            self.feature_extractor.out_channels, s.generator_reduction, s.coord_channels, s.generator_init
        )
        self.loss = HypersphereLoss(s.k_nearest, s.j_negatives, s.margin, s.radius_init)
        self.anomaly_map = AnomalyMapGenerator(s.sigma)
        self.score_k, self.score_method = s.score_k, s.score_method
        self.context = int(s.context)
        self.parts = memory_parts(self.context)
        self.context_in_score = bool(s.context_in_score)
        self.register_buffer("memory", torch.empty(0, self.parts * self.generator.out_channels))
        # Derived from the memory whenever it changes (not stored: checkpoints without it load the same).
        self.register_buffer("part_scales", torch.ones(self.parts), persistent=False)
        self._index: MemoryIndex | None = None
        self._context_index: MemoryIndex | None = None

    # --- memory -------------------------------------------------------------------------------
    @property
    def has_memory(self) -> bool:
        """Whether a memory has been built or set."""
        return self.memory.numel() > 0

    @property
    def memory_dim(self) -> int:
        """Width of a memory item: D, or 2·D with the context part."""
        return self.parts * self.generator.out_channels

    def set_memory(self, items: torch.Tensor) -> None:
        """Use ``items`` (M, D), or (M, 2·D) with a context window, as the memory for the loss and for scoring."""
        if items.dim() != 2 or items.shape[1] != self.memory_dim:
            raise ValueError(f"memory must be (M, {self.memory_dim}), got {tuple(items.shape)}")
        self.memory = items.detach().to(self.memory.device, torch.float32).contiguous()
        self._memory_changed()

    def _memory_changed(self) -> None:
        self._index = self._context_index = None
        if self.parts > 1 and self.has_memory:  # from the memory alone: every client of a round gets the same
            scales = [nearest_neighbour_spread(part) for part in self.memory.chunk(self.parts, dim=1)]
            self.part_scales = torch.tensor(scales, device=self.memory.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The memory's size changes with the data: resize the buffer before loading into it.
        key = prefix + "memory"
        if key in state_dict:
            self.memory = torch.empty_like(state_dict[key], device=self.memory.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if key in state_dict:
            self._memory_changed()

    @property
    def patch_memory(self) -> torch.Tensor:
        """The patch part of the memory (M, D): what the metric loss and the patch map use."""
        return self.memory[:, : self.generator.out_channels]

    @property
    def context_memory(self) -> torch.Tensor:
        """The context part of the memory (M, D); empty without a context window."""
        return self.memory[:, self.generator.out_channels :]

    def _index_on_gpu(self) -> bool:
        """Where an index over the memory belongs: on the GPU when the memory is and FAISS has one."""
        return self.memory.is_cuda and faiss_gpu_available()

    def _make_index(self, items: torch.Tensor) -> MemoryIndex:
        return MemoryIndex(
            items.contiguous(), gpu=items.is_cuda, approximate_above=self.approximate_above, nprobe=self.nprobe
        )

    def memory_index(self) -> MemoryIndex:
        """The FAISS index over the patch memory (rebuilt when the memory changes or moves to or from the GPU)."""
        if self._index is None or self._index.on_gpu != self._index_on_gpu():
            self._index = self._make_index(self.patch_memory)
        return self._index

    def context_index(self) -> MemoryIndex:
        """The FAISS index over the context memory (rebuilt when the memory changes or moves to or from the GPU)."""
        if self._context_index is None or self._context_index.on_gpu != self._index_on_gpu():
            self._context_index = self._make_index(self.context_memory)
        return self._context_index

    # --- forward pieces -------------------------------------------------------------------------
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen backbone features (B, C, H, W), without gradients."""
        return self.feature_extractor(images)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Memory-space embeddings (B, D, H, W)."""
        return self.generator(features)

    def compute_loss(self, embeddings: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The metric loss of ``embeddings`` against the memory (or ``target``)."""
        memory = self.patch_memory if target is None else target
        if memory.numel() == 0:
            raise RuntimeError("the metric loss needs a memory: build one with build_memory() or set_memory()")
        neighbours = None
        if target is None and self.memory_index().approximate:
            # A large memory: find each patch's K + J nearest items with the (approximate) FAISS index.
            patches = embeddings.detach().permute(0, 2, 3, 1).reshape(-1, embeddings.shape[1])
            count = min(self.loss.k_nearest + self.loss.j_negatives, memory.shape[0])
            _, neighbours = self.memory_index().search(patches, count)
        return self.loss(embeddings, memory, neighbours)

    def context_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) → (B, D, H', W'): the mean over each ``context``×``context`` window (borders: over the
        patches inside the image), every ``context // 2`` patches."""
        k = self.context
        return F.avg_pool2d(embeddings, k, stride=k // 2, padding=k // 2, count_include_pad=False)

    def _nearest_scores(self, embeddings: torch.Tensor, memory: torch.Tensor, index, use_index: bool) -> torch.Tensor:
        """(B, D, H, W) → (B, H, W): each position's score against ``memory`` (FAISS, or torch for export)."""
        if not self.has_memory:
            raise RuntimeError("scoring needs a memory: build one with build_memory() or set_memory()")
        b, d, h, w = embeddings.shape
        patches = embeddings.permute(0, 2, 3, 1).reshape(-1, d)
        k = min(self.score_k, memory.shape[0])
        if use_index and not torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing():
            dist2, _ = index().search(patches, k)
        else:
            dist2 = torch.topk(squared_distances(patches, memory), k, dim=1, largest=False).values
        scores = softmin_scores(dist2.clamp_min(0).sqrt(), self.score_method)
        return scores.view(b, h, w)

    def patch_scores(self, embeddings: torch.Tensor, use_index: bool = True) -> torch.Tensor:
        """(B, D, H, W) → (B, H, W) patch scores against the patch memory (FAISS, or torch for export)."""
        return self._nearest_scores(embeddings, self.patch_memory, self.memory_index, use_index)

    def context_scores(self, embeddings: torch.Tensor, use_index: bool = True) -> torch.Tensor:
        """(B, D, H, W) → (B, H', W') context scores against the context memory."""
        context = self.context_embeddings(embeddings)
        return self._nearest_scores(context, self.context_memory, self.context_index, use_index)

    def score_embeddings(
        self,
        embeddings: torch.Tensor,
        image_size: tuple[int, int],
        use_index: bool = True,
        maps: bool = True,
        patch_scores: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings → (anomaly maps (B, H_img, W_img), image scores (B,)). Without a context window: the
        patch map and its maximum. With one: the patch map plus the context map, each divided by its part's
        scale; the image score is the patch map's maximum as without one, or the summed map's
        (``context_in_score``). ``maps=False``: only the image scores are wanted, and the context map is
        left out where it does not enter them (the maps returned are then the patch map's). ``patch_scores``:
        the embeddings' :meth:`patch_scores`, when the caller has them already."""
        if patch_scores is None:
            patch_scores = self.patch_scores(embeddings, use_index)
        patch_maps, image_scores = self.anomaly_map(patch_scores, image_size)
        if self.parts == 1 or not (maps or self.context_in_score):
            return patch_maps, image_scores
        context = self.context_scores(embeddings, use_index) / self.part_scales[1]
        context_maps, _ = self.anomaly_map(context, image_size)
        summed = patch_maps / self.part_scales[0] + context_maps
        if self.context_in_score:
            image_scores = summed.flatten(1).amax(dim=1)
        return summed, image_scores

    def score_features(
        self, features: torch.Tensor, image_size: tuple[int, int], use_index: bool = True, maps: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features → (anomaly maps (B, H_img, W_img), image scores (B,)); ``maps``: see
        :meth:`score_embeddings`."""
        with torch.no_grad():
            embeddings = self.embed(features)
            patch_scores = self.patch_scores(embeddings, use_index)  # searched once, for the map and the score
            anomaly_maps, image_scores = self.score_embeddings(embeddings, image_size, use_index, maps, patch_scores)
            if self.score_method == "patchcore":
                image_scores = self.reweighted_max(embeddings, patch_scores)
            return anomaly_maps, image_scores

    def reweighted_max(self, embeddings: torch.Tensor, patch_scores: torch.Tensor, neighbours: int = 9) -> torch.Tensor:
        """PatchCore's image score (Roth et al. 2022, eq. 7): the largest patch score times
        1 − softmax of that patch's distances to its nearest memory item m* and m*'s neighbours in the memory.

        A patch whose nearest item is itself a rare normal pattern (far from its neighbours) keeps its
        score; one near a dense part of the memory is discounted by up to 1 − 1/neighbours.
        """
        b, d, h, w = embeddings.shape
        flat = patch_scores.flatten(1)
        top = flat.argmax(dim=1)
        worst = embeddings.permute(0, 2, 3, 1).reshape(b, h * w, d)[torch.arange(b, device=top.device), top]  # (B, D)
        memory = self.patch_memory
        nearest = squared_distances(worst, memory).argmin(dim=1)
        k = min(neighbours, memory.shape[0])
        support = torch.topk(squared_distances(memory[nearest], memory), k, largest=False).indices
        distances = (worst[:, None, :] - memory[support]).norm(dim=-1)  # (B, k), m* first
        weight = 1.0 - torch.softmax(distances, dim=1)[:, 0]
        return weight * flat.max(dim=1).values

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W), normalised → (anomaly maps (B, H, W), image scores (B,))."""
        return self.score_features(self.extract(images), (images.shape[-2], images.shape[-1]))

    @torch.no_grad()
    def build_memory(
        self,
        embeddings: torch.Tensor,
        settings: MemoryReduceSettings | None = None,
        *,
        seed: int = 0,
        gpu: bool = False,
        image_groups: Sequence[Hashable] | None = None,
    ) -> MemoryBank:
        """Memory-reduce ``embeddings`` (N, D, H, W) with the current memory as the global one
        (:func:`~feddymem.memory.reduce.reduce_memory`); with a context window, the context embeddings are
        reduced on their own into as many items per image (``coreset_ratio`` scaled to their coarser grid) and
        set beside the patch items."""
        settings = settings or MemoryReduceSettings()
        memory = self.patch_memory if self.has_memory else None
        patch = reduce_memory(embeddings, settings, global_memory=memory, seed=seed, gpu=gpu, image_groups=image_groups)
        if self.parts == 1:
            return patch
        context = self.context_embeddings(embeddings)
        # Scaled to the coarser grid, or the context part would get a sixteenth of the items.
        ratio = settings.coreset_ratio * embeddings[0, 0].numel() / context[0, 0].numel()
        memory = self.context_memory if self.has_memory else None
        items = reduce_memory(
            context,
            replace(settings, coreset_ratio=ratio),
            global_memory=memory,
            seed=seed,
            gpu=gpu,
            image_groups=image_groups,
        )
        return side_by_side([patch, items])

    # --- state ----------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A copy of the generator, radius and memory: everything but the frozen backbone (the settings
        rebuild it)."""
        return {
            k: v.detach().cpu().clone() for k, v in self.state_dict().items() if not k.startswith("feature_extractor.")
        }

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state from :meth:`trainable_state`. A state that does not fit this model (other
        ``model.*`` settings than it was trained with) is a ``ValueError`` naming the key and both shapes,
        or the missing and unexpected keys."""
        own = self.state_dict()
        for key, value in state.items():
            fits = (
                value.shape[1:] == (self.memory_dim,) if key == "memory" else own.get(key, value).shape == value.shape
            )
            if not fits:
                expected = ("M", self.memory_dim) if key == "memory" else tuple(own[key].shape)
                raise ValueError(
                    f"the saved state does not fit the model: {key} has shape {tuple(value.shape)}, the model's "
                    f"{expected} (trained with other model settings?)"
                )
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("feature_extractor.")]
        if missing or unexpected:
            raise ValueError(f"the saved state does not fit the model: missing {missing}, unexpected {unexpected}")
