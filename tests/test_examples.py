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
    # The best epoch's checkpoint predicts as the module that wrote it; with the last epoch's state the
    # same (both epochs' states are then equal on these images) or, if an earlier epoch was best, its own.
    reloaded = out["reloaded"]
    assert reloaded.normalizer is not None and float(reloaded.threshold) == float(reloaded.threshold)
    best = torch.load(out["best_model_path"], weights_only=True)
    assert torch.equal(best["state_dict"]["threshold"], reloaded.threshold)
    if best["epoch"] == out["model"].current_epoch:
        assert torch.allclose(out["reloaded_scores"], out["scores"], atol=1e-5)
        assert torch.equal(out["reloaded_labels"], out["labels"])
    assert out["labels"].dtype == torch.bool and out["labels"].any() and not out["labels"].all()
