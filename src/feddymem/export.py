"""Self-contained inference artifacts: ONNX (and TorchScript) of backbone + generator + memory + threshold.

The exported graph takes images scaled to [0, 1] at any size, resizes them to the training crop size,
normalises them, and returns the anomaly map, the image score and whether the score passes the
threshold. Nearest-memory distances are plain matrix products (no FAISS), so the graph is portable.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from feddymem.io import atomic_write_bytes
from feddymem.models.torch_model import FedDyMemModel


class InferenceModel(nn.Module):
    """images (B, 3, H, W) in [0, 1] → (anomaly_map (B, S, S), score (B,), is_anomalous (B,))."""

    mean: torch.Tensor
    std: torch.Tensor
    threshold: torch.Tensor

    def __init__(self, model: FedDyMemModel, image_size: int, threshold: float = float("inf")) -> None:
        super().__init__()
        self.model = model.eval()
        self.image_size = int(image_size)
        extractor = self.model.feature_extractor
        self.register_buffer("mean", torch.tensor(extractor.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(extractor.std).view(1, 3, 1, 1))
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        with torch.no_grad():  # the map operators of this input size, made now: constants in the graph
            grid = self.model.extract(torch.zeros(1, 3, self.image_size, self.image_size)).shape[-1]
            grids = [grid]
            if self.model.parts > 1:
                grids.append(self.model.context_embeddings(torch.zeros(1, 1, grid, grid)).shape[-1])
        for g in grids:
            self.model.anomaly_map.operator(g, self.image_size)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images → (anomaly maps, image scores, anomaly decisions against the threshold)."""
        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        features = self.model.extract((x - self.mean) / self.std)
        size = (self.image_size, self.image_size)
        maps, scores = self.model.score_embeddings(self.model.embed(features), size, use_index=False)
        return maps, scores, scores > self.threshold


def export_onnx(model: InferenceModel, path: str | Path, opset: int = 17) -> Path:
    """Write ``model`` as ONNX with a dynamic batch and image size."""
    path = Path(path)
    example = torch.rand(1, 3, model.image_size, model.image_size)
    buffer = io.BytesIO()  # written atomically below: a failed export leaves no half file
    torch.onnx.export(
        model,
        (example,),
        buffer,  # type: ignore[arg-type]  # torch.onnx.export writes to file objects; its hint says paths only
        dynamo=False,
        opset_version=opset,
        input_names=["images"],
        output_names=["anomaly_map", "score", "is_anomalous"],
        dynamic_axes={
            "images": {0: "batch", 2: "height", 3: "width"},
            "anomaly_map": {0: "batch"},
            "score": {0: "batch"},
            "is_anomalous": {0: "batch"},
        },
    )
    atomic_write_bytes(path, buffer.getvalue())
    return path


def export_torchscript(model: InferenceModel, path: str | Path) -> Path:
    """``model`` traced to TorchScript at ``path`` (written atomically)."""
    path = Path(path)
    traced = torch.jit.trace(model, torch.rand(1, 3, model.image_size, model.image_size), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path
