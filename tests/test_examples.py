"""The README's plain-Trainer example runs as shipped (examples/plain_trainer.py)."""

import runpy
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plain_trainer.py"


def test_plain_trainer_with_callbacks_fit_validate_test_predict_and_reload(synthetic_root, tmp_path):
    main = runpy.run_path(str(EXAMPLE))["main"]
    out = main([str(synthetic_root / "product1"), "--epochs", "2", "--size", "96", "--out", str(tmp_path)])
    assert out["metrics"]["image_auroc"] > 0.9 and out["metrics"]["pixel_auroc"] > 0.9
    assert 0.5 <= out["validated"]["val/criterion"] <= 1.0 and torch.isfinite(out["model"].threshold)
    assert Path(out["best_model_path"]).is_file()
    # Loaded back, the module predicts the same scores and labels (threshold, normaliser and memory saved).
    reloaded = out["reloaded"]
    assert reloaded.normalizer is not None and torch.equal(reloaded.threshold, out["model"].threshold)
    assert torch.allclose(out["reloaded_scores"], out["scores"], atol=1e-5)
    assert torch.equal(out["reloaded_labels"], out["labels"])
    assert out["labels"].dtype == torch.bool and out["labels"].any() and not out["labels"].all()
    best = torch.load(out["best_model_path"], weights_only=True)  # ModelCheckpoint's: loads safely too
    assert "val/criterion" in str(best["callbacks"]) and best["state_dict"]["model.memory"].numel() > 0
