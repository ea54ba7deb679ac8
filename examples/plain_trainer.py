"""FedDyMemModule under a plain lightning.Trainer: centralised fit, test and predict on any MVTec-style folder.

python examples/plain_trainer.py /path/to/mvtec_anomaly_detection/bottle [--epochs 3]
"""

from __future__ import annotations

import argparse

import lightning as L
from torch.utils.data import DataLoader

from feddymem import FedDyMemModule
from feddymem.data import ImageDataset, load_product


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", help="a product folder in the MVTec AD layout")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)

    model = FedDyMemModule()  # offline ImageNet EfficientNet-Lite0; builds its memory from the data on fit
    mean, std = model.model.feature_extractor.mean, model.model.feature_extractor.std
    split = load_product({"name": "product", "layout": "mvtec", "root": args.folder})
    train = DataLoader(ImageDataset(split.train, args.size, args.size, mean, std), batch_size=4, shuffle=True)
    test = DataLoader(ImageDataset(split.test, args.size, args.size, mean, std), batch_size=16)

    trainer = L.Trainer(max_epochs=args.epochs, accelerator="auto", logger=False, enable_checkpointing=False)
    trainer.fit(model, train)
    metrics = trainer.test(model, test)[0]
    predictions = trainer.predict(model, test)
    print(f"scored {sum(len(p['pred_score']) for p in predictions)} test images; metrics {metrics}")
    return metrics


if __name__ == "__main__":
    main()
