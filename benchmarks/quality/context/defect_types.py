"""Magnetic tile, per defect type: pixel AUROC / AUPRO of the patch map alone and of ways to add the context map.

One pass over magnetic tile's 583 test images with one trained model of a run made with
``model.scoring.context=9`` (its memory holds both parts, so both maps come from the same model):

    python benchmarks/quality/context/defect_types.py runs/bench/shared_industrial-context/checkpoints/last.ckpt global

(``global``: the global memory with the identity generator; or a client id for its kept state). Each defect
type is scored against the good test images. The variants marked "probe" read statistics of the *test*
good images (what held-out normals would estimate): they are for the exploration, not a method.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from feddymem.data.datasets import ImageDataset
from feddymem.data.products import load_mvtec
from feddymem.metrics import aupro_score, auroc_score
from feddymem.trained import load_trained

checkpoint, who = sys.argv[1], sys.argv[2]
root = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("../shared/data/industrial/magnetic_tile")
trained = load_trained(checkpoint, None if who == "global" else int(who))
model, cfg = trained.model, trained.config
if model.parts < 2:
    sys.exit(f"{checkpoint} was trained without a context map (model.scoring.context=0)")
split = load_mvtec("magnetic_tile", root)
extractor = model.feature_extractor
dataset = ImageDataset(split.test, cfg.data.image_size, cfg.data.crop_size, extractor.mean, extractor.std)
patch_grids, context_grids, masks = [], [], []
with torch.no_grad():
    for start in range(0, len(dataset), 32):
        items = [dataset[i] for i in range(start, min(start + 32, len(dataset)))]
        embeddings = model.embed(model.extract(torch.stack([item["image"] for item in items])))
        patch_grids.append(model.patch_scores(embeddings))
        context_grids.append(model.context_scores(embeddings))
        masks.append(torch.stack([item["mask"] for item in items]).numpy() > 0.5)
patch, context, mask = torch.cat(patch_grids), torch.cat(context_grids), np.concatenate(masks)
types = np.array([s.defect for s in split.test])
good = torch.from_numpy(types == "good")
size = tuple(mask.shape[-2:])


def to_map(grid: torch.Tensor) -> np.ndarray:
    """A patch-score grid → the anomaly map at the mask size (upsampled, blurred)."""
    return model.anomaly_map(grid, size)[0].numpy()


s_patch, s_context = model.part_scales.tolist()
good_context = context[good].flatten()
q99 = float(torch.quantile(good_context[torch.randperm(good_context.numel())[:200_000]], 0.99))
patch_map, context_map = to_map(patch / s_patch), to_map(context / s_context)
variants = {
    "patch map alone (context=0)": patch_map,
    "patch + context (context=9, as implemented)": patch_map + context_map,
    "patch + context / 2": patch_map + 0.5 * context_map,
    "each map z-scored on good pixels (probe)": to_map(patch / float(patch[good].std()))
    + to_map(context / float(context[good].std())),
    "context only above the good pixels' 99th percentile (probe)": patch_map
    + to_map(torch.relu(context - q99) / s_context),
}
selections = [("all", np.ones(len(types), bool))] + [
    (d, (types == d) | (types == "good")) for d in sorted(set(types) - {"good"})
]
print(
    "| map | "
    + " | ".join(f"{name} ({(types == name).sum() if name != 'all' else len(types)} img)" for name, _ in selections)
    + " |"
)
print("|---" * (len(selections) + 1) + "|")
for name, maps in variants.items():
    cells = [
        f"{auroc_score(maps[sel].ravel(), mask[sel].ravel().astype(int)):.3f} / {aupro_score(maps[sel], mask[sel]):.3f}"
        for _, sel in selections
    ]
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
