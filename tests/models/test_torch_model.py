import torch

from feddymem.models.torch_model import softmin_scores


def test_image_from_memory_scores_lower_than_perturbed(fedmodel):
    torch.manual_seed(0)
    images = torch.randn(3, 3, 96, 96)
    embeddings = fedmodel.embed(fedmodel.extract(images)).detach()
    bank = fedmodel.build_memory(embeddings, "position_mean")
    fedmodel.set_memory(bank.items)
    # Image 0's patches rebuilt from memory items: the per-position mean itself.
    from_memory = bank.items.T.reshape(1, *embeddings.shape[1:])
    perturbed = from_memory + 0.5 * torch.randn_like(from_memory)
    _, clean = fedmodel.anomaly_map(fedmodel.patch_scores(from_memory), (96, 96))
    _, dirty = fedmodel.anomaly_map(fedmodel.patch_scores(perturbed), (96, 96))
    assert clean.item() < 1e-3 < dirty.item()


def test_faiss_and_torch_scoring_agree(fedmodel):
    torch.manual_seed(1)
    emb = fedmodel.embed(fedmodel.extract(torch.randn(2, 3, 96, 96))).detach()
    fedmodel.set_memory(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])[::3])
    probe = emb + 0.1 * torch.randn_like(emb)
    assert torch.allclose(
        fedmodel.patch_scores(probe, use_index=True),
        fedmodel.patch_scores(probe, use_index=False),
        rtol=1e-3,
        atol=1e-3,
    )


def test_softmin_weighting():
    d = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 5.0]])
    s = softmin_scores(d, "softmin")
    assert torch.allclose(s[0], torch.tensor(1 / 3))
    assert s[1] > 0.95
    assert torch.equal(softmin_scores(d, "nearest"), d[:, 0])
