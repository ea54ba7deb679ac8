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


def test_patchcore_reweighting_keeps_a_patch_near_an_isolated_memory_item_and_discounts_a_dense_one(fedmodel):
    # Memory: nine copies of p (a dense region), and q with its eight neighbours far away (isolated).
    d = fedmodel.generator.out_channels
    p, q = torch.zeros(d), torch.zeros(d)
    q[0] = 100.0
    far = torch.zeros(8, d)
    far[:, 1] = torch.arange(8) * 10.0 + 500.0
    dense = torch.cat([p.repeat(9, 1), q[None], far])
    saved = fedmodel.memory.clone()
    try:
        fedmodel.set_memory(dense)
        near_p, near_q = p.clone(), q.clone()
        near_p[2], near_q[2] = 3.0, 3.0  # distance 3 from p, and from q
        embeddings = torch.stack([near_p, near_q]).view(2, d, 1, 1)
        patch_scores = torch.full((2, 1, 1), 3.0)
        scores = fedmodel.reweighted_max(embeddings, patch_scores)
        # Near p: m* and its eight neighbours are equally far, weight 1 − 1/9. Near the isolated q: its
        # neighbours are far, the softmax weight of q vanishes and the score stays whole (eq. 7).
        assert abs(float(scores[0]) - 3.0 * 8 / 9) < 1e-5
        assert abs(float(scores[1]) - 3.0) < 1e-5
    finally:
        fedmodel.set_memory(saved)


def test_a_large_memory_is_searched_approximately_for_scores_and_loss_with_nearly_exact_results():
    from feddymem.models.torch_model import FedDyMemModel

    torch.manual_seed(0)
    exact, approx = FedDyMemModel(weights="none"), FedDyMemModel(weights="none", approximate_above=1000, nprobe=8)
    d = exact.generator.out_channels
    centres = torch.randn(30, d) * 3
    memory = centres[torch.randint(30, (4000,))] + torch.randn(4000, d)
    embeddings = (centres[torch.randint(30, (2 * 49,))] + torch.randn(2 * 49, d)).T.reshape(d, 2, 7, 7)
    embeddings = embeddings.permute(1, 0, 2, 3).contiguous()
    for model in (exact, approx):
        model.set_memory(memory)
    assert approx.memory_index().approximate and not exact.memory_index().approximate
    s_exact, s_approx = exact.patch_scores(embeddings), approx.patch_scores(embeddings)
    assert torch.all(s_approx >= s_exact - 1e-3) and float((s_approx / s_exact).mean()) < 1.05
    l_exact, l_approx = exact.compute_loss(embeddings), approx.compute_loss(embeddings)
    assert abs(float(l_approx) - float(l_exact)) < 0.05 * abs(float(l_exact))
