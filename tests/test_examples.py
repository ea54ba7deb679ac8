"""The README's plain-Trainer example runs as shipped (examples/plain_trainer.py)."""

import runpy
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plain_trainer.py"


def test_plain_trainer_example(synthetic_root):
    main = runpy.run_path(str(EXAMPLE))["main"]
    metrics = main([str(synthetic_root / "product1"), "--epochs", "1", "--size", "96"])
    assert metrics["image_auroc"] > 0.9 and metrics["pixel_auroc"] > 0.9
