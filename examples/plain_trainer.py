"""FedDyMemModule and FedDyMemDataModule in a plain lightning.Trainer, with Lightning's own callbacks:
fit (the memory rebuilt every epoch, the best epoch kept by the held-out criterion, early stopping),
validate, test, predict, and the best checkpoint loaded back.

python examples/plain_trainer.py /path/to/mvtec_anomaly_detection/bottle [--epochs 3] [--out checkpoints]
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from feddymem import FedDyMemModule
from feddymem.datamodule import FedDyMemDataModule


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", help="a product folder in the MVTec AD layout")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", default="checkpoints", help="where the best checkpoint goes")
    args = parser.parse_args(argv)

    model = FedDyMemModule()  # offline ImageNet EfficientNet-Lite0; feddymem train's settings
    extractor = model.model.feature_extractor
    data = FedDyMemDataModule(
        [{"name": "product", "layout": "mvtec", "root": args.folder}],
        image_size=args.size,
        crop_size=args.size,
        mean=extractor.mean,
        std=extractor.std,
    )
    # val/criterion: image AUROC of held-out normal images against cut-paste anomalies made from them.
    best = ModelCheckpoint(dirpath=args.out, monitor="val/criterion", mode="max", save_top_k=1)
    stop = EarlyStopping(monitor="val/criterion", mode="max", patience=2)
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="auto", logger=False, callbacks=[best, stop], enable_progress_bar=False
    )
    trainer.fit(model, data)
    validated = trainer.validate(model, data, verbose=False)[0]
    metrics = trainer.test(model, data, verbose=False)[0]
    predictions = trainer.predict(model, data)
    print(f"threshold {float(model.threshold):.3f}; test metrics {metrics}")

    # Saved now and loaded back, the module predicts the same scores and labels; the best epoch's
    # checkpoint (ModelCheckpoint's) loads the same way.
    trainer.save_checkpoint(f"{args.out}/final.ckpt")
    reloaded = FedDyMemModule.load_from_checkpoint(f"{args.out}/final.ckpt")
    again = trainer.predict(reloaded, data)
    FedDyMemModule.load_from_checkpoint(best.best_model_path)
    return {
        "validated": validated,
        "metrics": metrics,
        "best_model_path": best.best_model_path,
        "scores": torch.cat([p["pred_score"] for p in predictions]),
        "labels": torch.cat([p["pred_label"] for p in predictions]),
        "reloaded_scores": torch.cat([p["pred_score"] for p in again]),
        "reloaded_labels": torch.cat([p["pred_label"] for p in again]),
        "model": model,
        "reloaded": reloaded,
    }


if __name__ == "__main__":
    main()
