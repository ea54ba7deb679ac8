"""The client LightningModule under a plain lightning.Trainer, with no orchestrator or config files."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from feddymem import FedDyMemModule
from feddymem.data import ImageDataset, load_product
from feddymem.memory.reduce import MemoryReduceSettings
from feddymem.models.settings import ModelSettings


def _loaders(root):
    split = load_product({"name": "p0", "layout": "mvtec", "root": str(root / "product0")})
    mean, std = (0.5,) * 3, (0.5,) * 3
    train = DataLoader(ImageDataset(split.train, 96, 96, mean, std), batch_size=4, shuffle=True)
    test = DataLoader(ImageDataset(split.test, 96, 96, mean, std), batch_size=4)
    return train, test


def test_plain_trainer_fit_test_predict(synthetic_root):
    train, test = _loaders(synthetic_root)
    module = FedDyMemModule(memory=MemoryReduceSettings("cluster_mean", size=64, kmeans_iters=5, min_cluster_size=1))
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = module.model.generator.conv.weight.detach().clone()
    trainer.fit(module, train)
    assert module.model.has_memory and module.model.memory.shape[0] <= 64  # built its own memory
    assert not torch.equal(before, module.model.generator.conv.weight)
    assert "train_loss" in trainer.callback_metrics
    results = trainer.test(module, test, verbose=False)[0]
    assert results["image_auroc"] > 0.9 and results["pixel_auroc"] > 0.9 and results["aupro"] > 0.5
    preds = trainer.predict(module, test)
    assert preds[0]["anomaly_map"].shape == (4, 96, 96) and preds[0]["pred_score"].shape == (4,)


def test_given_global_memory_is_used_and_state_round_trips(synthetic_root):
    module = FedDyMemModule(ModelSettings(context=9))
    memory = torch.randn(10, module.model.memory_dim)  # patch and context items side by side
    module.set_global_memory(memory)
    state = module.trainable_state()
    assert not any(k.startswith("feature_extractor.") for k in state)
    other = FedDyMemModule(ModelSettings(context=9))
    other.load_trainable_state(state)
    assert torch.equal(other.model.memory, memory)
    assert torch.equal(other.model.part_scales, module.model.part_scales)  # derived again from the memory


def test_pixel_metrics_skip_anomalous_images_without_masks():
    module = FedDyMemModule()
    d = module.model.generator.out_channels
    module.set_global_memory(torch.zeros(4, module.model.memory_dim))
    features = torch.zeros(3, d, 6, 6)
    features[1, :, 2, 2] = 5.0  # anomalous with a mask over the spot
    features[2, :, 4, 4] = 5.0  # anomalous, mask unknown: must not count as normal pixels
    masks = torch.zeros(3, 48, 48)
    masks[1, 12:28, 12:28] = 1
    batch = {
        "features": features,
        "label": torch.tensor([0, 1, 1]),
        "mask": masks,
        "has_mask": torch.tensor([False, True, False]),
    }
    out = module.test_step(batch, 0)
    assert out["pred_score"].shape == (3,)
    assert module.test_metrics.pixel_auroc.scores[0].numel() == 2 * 48 * 48  # the unmasked anomaly is left out
    metrics = module.compute_test_metrics()
    assert metrics["image_auroc"] == 1.0 and metrics["pixel_auroc"] > 0.9


def test_default_module_is_the_trained_default_model():
    """FedDyMemModule() (README) must be the model `feddymem train` trains with its defaults."""
    from feddymem.config import load_config
    from feddymem.federation.strategies import make_strategy

    default = FedDyMemModule(ModelSettings(weights="none"))
    from_config = FedDyMemModule.from_config(load_config(["model.backbone.weights=none"]))
    assert dict(default.hparams) == dict(from_config.hparams)
    assert default.hparams.model["score_method"] == "nearest" and default.hparams.optim["lr"] == pytest.approx(1e-4)
    assert default.hparams.memory["noise"]["noise_multiplier"] == 0.0  # nested: the settings classes' fields
    cfg = load_config(["method=patchcore", "model.backbone.weights=none"])
    strategy = make_strategy(cfg)
    patchcore = FedDyMemModule.from_config(cfg, 2, model=strategy.model_settings(), memory=strategy.memory_settings())
    assert (patchcore.model_settings.score_method, patchcore.model_settings.approximate_above) == ("patchcore", 0)
    assert patchcore.hparams.memory["method"] == "coreset" and patchcore.hparams.seed == 2
    # Rebuilt from its hparams (as load_from_checkpoint does): the same settings, typed again.
    again = FedDyMemModule(**dict(patchcore.hparams))
    assert again.model_settings == patchcore.model_settings and again.memory_settings == patchcore.memory_settings
    with pytest.raises(
        TypeError, match=r"ModelSettings got unknown settings \['backbon'\]; it has \['approximate_above'"
    ):
        FedDyMemModule({"backbon": "resnet18"})


def test_batches_without_masks_and_predict_fields():
    module = FedDyMemModule(ModelSettings(weights="none"))
    module.set_global_memory(torch.zeros(4, module.model.memory_dim))
    module.threshold.fill_(1.0)
    images = torch.randn(3, 3, 64, 64)
    module.test_step({"image": images, "label": torch.tensor([0, 1, 1])}, 0)  # no "mask": image AUROC only
    assert set(module.compute_test_metrics()) == {"image_auroc"}
    out = module.predict_step({"image": images, "path": ["a.png", "b.png", "c.png"]}, 0)
    assert set(out) == {"image_path", "pred_score", "pred_label", "anomaly_map", "pred_mask"}
    assert out["image_path"] == ["a.png", "b.png", "c.png"] and out["anomaly_map"].shape == (3, 64, 64)
    assert torch.equal(out["pred_label"], out["pred_score"] > 1.0) and out["pred_mask"].dtype == torch.bool


@pytest.mark.e2e
def test_a_client_of_a_finished_run_exported_for_lightning_predicts_as_feddymem_predict(
    tmp_path, synthetic_yaml, synthetic_root
):
    from conftest import FAST
    from feddymem.cli import main
    from feddymem.trained import load_trained

    args = [f"dataset={synthetic_yaml}", f"output_dir={tmp_path}", "name=run", "data.num_clients=2", *FAST]
    assert main(["train", *args, "federation.rounds=0"]) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "client1.ckpt"
    assert main(["export", str(checkpoint), "--client", "1", "--format", "lightning", "--out", str(out)]) == 0
    module = FedDyMemModule.load_from_checkpoint(out).eval()
    trained = load_trained(checkpoint, 1)
    assert module.model_settings == trained.model.settings and float(module.threshold) == trained.threshold
    split = load_product({"name": "p0", "layout": "mvtec", "root": str(synthetic_root / "product0")})
    extractor = trained.model.feature_extractor
    images = torch.stack(
        [ImageDataset(split.test, 96, 96, extractor.mean, extractor.std)[i]["image"] for i in range(4)]
    )
    with torch.no_grad():
        _, expected = trained.model(images)
        got = module.predict_step({"image": images, "path": [s.path for s in split.test[:4]]}, 0)
    assert torch.allclose(got["pred_score"], expected, atol=1e-5)
    assert torch.equal(got["pred_label"], expected > trained.threshold)
