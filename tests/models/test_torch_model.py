import torch

from feddymem.memory.reduce import MemoryReduceSettings
from feddymem.models.settings import ModelSettings
from feddymem.models.torch_model import softmin_scores


def test_image_from_memory_scores_lower_than_perturbed(fedmodel):
    torch.manual_seed(0)
    images = torch.randn(3, 3, 96, 96)
    embeddings = fedmodel.embed(fedmodel.extract(images)).detach()
    bank = fedmodel.build_memory(embeddings, MemoryReduceSettings("position_mean"))
    fedmodel.set_memory(bank.items)
    # Image 0's patches rebuilt from the patch items: the per-position mean itself.
    from_memory = bank.items[:, : embeddings.shape[1]].T.reshape(1, *embeddings.shape[1:])
    perturbed = from_memory + 0.5 * torch.randn_like(from_memory)
    _, clean = fedmodel.anomaly_map(fedmodel.patch_scores(from_memory), (96, 96))
    _, dirty = fedmodel.anomaly_map(fedmodel.patch_scores(perturbed), (96, 96))
    assert clean.item() < 1e-3 < dirty.item()


def test_faiss_and_torch_scoring_agree(fedmodel):
    from feddymem.models.torch_model import FedDyMemModel

    torch.manual_seed(1)
    model = FedDyMemModel(ModelSettings(context=9), feature_extractor=fedmodel.feature_extractor)
    emb = model.embed(model.extract(torch.randn(2, 3, 96, 96))).detach()
    model.set_memory(model.build_memory(emb, MemoryReduceSettings("coreset", coreset_ratio=0.3)).items)
    # Far enough from the items that float32 distances (|q|² + |m|² − 2q·m, in FAISS and in torch) agree.
    probe = emb + torch.randn_like(emb)
    for scores in (model.patch_scores, model.context_scores):
        assert torch.allclose(scores(probe, use_index=True), scores(probe, use_index=False), rtol=1e-3, atol=1e-3)
    exported = model.score_embeddings(probe, (96, 96), use_index=False)
    for a, b in zip(model.score_embeddings(probe, (96, 96)), exported, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)


def test_softmin_weighting():
    d = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 5.0]])
    s = softmin_scores(d, "softmin")
    assert torch.allclose(s[0], torch.tensor(1 / 3))
    assert s[1] > 0.95
    assert torch.equal(softmin_scores(d, "nearest"), d[:, 0])


def test_patchcore_reweighting_keeps_a_patch_near_an_isolated_memory_item_and_discounts_a_dense_one(fedmodel):
    from feddymem.models.torch_model import FedDyMemModel

    # PatchCore's memory is patches alone (its strategy turns the context map off).
    model = FedDyMemModel(ModelSettings(context=0), feature_extractor=fedmodel.feature_extractor)
    # Memory: nine copies of p (a dense region), and q with its eight neighbours far away (isolated).
    d = model.generator.out_channels
    p, q = torch.zeros(d), torch.zeros(d)
    q[0] = 100.0
    far = torch.zeros(8, d)
    far[:, 1] = torch.arange(8) * 10.0 + 500.0
    model.set_memory(torch.cat([p.repeat(9, 1), q[None], far]))
    near_p, near_q = p.clone(), q.clone()
    near_p[2], near_q[2] = 3.0, 3.0  # distance 3 from p, and from q
    embeddings = torch.stack([near_p, near_q]).view(2, d, 1, 1)
    scores = model.reweighted_max(embeddings, torch.full((2, 1, 1), 3.0))
    # Near p: m* and its eight neighbours are equally far, weight 1 − 1/9. Near the isolated q: its
    # neighbours are far, the softmax weight of q vanishes and the score stays whole (eq. 7).
    assert abs(float(scores[0]) - 3.0 * 8 / 9) < 1e-5
    assert abs(float(scores[1]) - 3.0) < 1e-5


def test_a_large_memory_is_searched_approximately_for_scores_and_loss_with_nearly_exact_results():
    from feddymem.models.torch_model import FedDyMemModel

    torch.manual_seed(0)
    exact = FedDyMemModel(ModelSettings(weights="none", context=0))
    approx = FedDyMemModel(ModelSettings(weights="none", context=0, approximate_above=1000, nprobe=8))
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


def _two_pattern_images(n: int, seed: int, d: int, size: int = 16) -> torch.Tensor:
    """Embeddings (n, d, size, size) whose every patch is pattern A or B at random, as in a normal texture."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.zeros(d), torch.zeros(d)
    a[0], b[1] = 5.0, 5.0
    choice = torch.rand(n, size, size, generator=g) < 0.5
    patches = torch.where(choice[..., None], a, b) + 0.05 * torch.randn(n, size, size, d, generator=g)
    return patches.permute(0, 3, 1, 2).contiguous()


def test_the_context_map_sees_a_broad_change_that_no_single_patch_shows():
    from feddymem.models.torch_model import FedDyMemModel

    with_context = FedDyMemModel(ModelSettings(weights="none", context=9, context_in_score=True))
    patch_only = FedDyMemModel(ModelSettings(weights="none", context=0))
    d = with_context.generator.out_channels
    train = _two_pattern_images(8, 0, d)
    bank = with_context.build_memory(train, MemoryReduceSettings("coreset", coreset_ratio=0.5))
    assert bank.items.shape[1] == 2 * d  # patch and context items side by side
    # As many context items as patch items, at the default ratio too (none repeated to fill the pairs).
    default_ratio = with_context.build_memory(train, MemoryReduceSettings("coreset"))
    assert torch.unique(default_ratio.items[:, d:], dim=0).shape[0] == default_ratio.items.shape[0]
    # Every context item is one training image's context embedding (a raw coreset here).
    context_rows = with_context.context_embeddings(train).permute(0, 2, 3, 1).reshape(-1, d)
    assert torch.cdist(bank.items[:, d:], context_rows).min(1).values.max() < 1e-2  # cdist: float32 matmul
    with_context.set_memory(bank.items)
    patch_only.set_memory(bank.items[:, :d])
    normal = _two_pattern_images(1, 1, d)
    anomalous = normal.clone()
    anomalous[0, :, 4:12, 4:12] = normal[0, :, 4, 4, None, None]  # one normal patch over a broad region
    for model in (with_context, patch_only):
        model.eval()
    _, patch_scores = patch_only.score_embeddings(torch.cat([normal, anomalous]), (64, 64))
    _, scores = with_context.score_embeddings(torch.cat([normal, anomalous]), (64, 64))
    # Each of its patches is normal: the patch map alone ranks the two images alike...
    assert abs(float(patch_scores[1] - patch_scores[0])) < 0.1 * float(patch_scores[0])
    # ... and the context map sets the broad change apart: in the map, and in the score when asked.
    assert float(scores[1]) > 1.5 * float(scores[0])
    default = FedDyMemModel(ModelSettings(weights="none", context=9)).eval()  # the context map, not in the score
    default.set_memory(bank.items)
    both = torch.cat([normal, anomalous])
    maps, default_scores = default.score_embeddings(both, (64, 64))
    assert torch.equal(default_scores, patch_scores)  # the default score: the patch map's maximum, as before
    assert torch.equal(maps, with_context.score_embeddings(both, (64, 64))[0])  # the map: patch + context
    # Scores alone (held-out statistics): the same scores; the context map is skipped unless it enters them.
    patch_maps, same_scores = default.score_embeddings(both, (64, 64), maps=False)
    assert torch.equal(same_scores, default_scores) and not torch.equal(patch_maps, maps)
    assert torch.equal(with_context.score_embeddings(both, (64, 64), maps=False)[1], scores)


def test_without_a_context_window_the_map_is_the_patch_map_as_before(fedmodel):
    from feddymem.models.torch_model import FedDyMemModel

    model = FedDyMemModel(ModelSettings(context=0), feature_extractor=fedmodel.feature_extractor)  # the patch map alone
    emb = model.embed(model.extract(torch.randn(2, 3, 96, 96))).detach()
    model.set_memory(model.build_memory(emb, MemoryReduceSettings("coreset", coreset_ratio=0.3)).items)
    assert model.memory.shape[1] == model.generator.out_channels and torch.equal(model.part_scales, torch.ones(1))
    maps, scores = model.score_embeddings(emb + 0.5, (96, 96))
    expected_maps, expected_scores = model.anomaly_map(model.patch_scores(emb + 0.5), (96, 96))
    assert torch.equal(maps, expected_maps) and torch.equal(scores, expected_scores)


def test_with_privacy_noise_the_context_part_is_released_and_counted_on_its_own(fedmodel):
    from feddymem.memory.noise import NoiseSettings
    from feddymem.models.torch_model import FedDyMemModel

    emb = torch.randn(6, fedmodel.generator.out_channels, 12, 12, generator=torch.Generator().manual_seed(0))
    noise = NoiseSettings(0.01, 50.0, 0, 3)  # real noise, small enough that no DP-Lloyd iteration stops early
    banks = {
        context: FedDyMemModel(
            ModelSettings(context=context), feature_extractor=fedmodel.feature_extractor
        ).build_memory(emb, MemoryReduceSettings("cluster_mean", size=4, noise=noise, min_cluster_size=1))
        for context in (0, 9)
    }
    # Each part runs its own noisy Lloyd iterations (a noisy start and 3 iterations): the accountant sees both.
    assert banks[0].releases == 4 and banks[9].releases == 8
    assert banks[9].items.shape[1] == 2 * banks[0].items.shape[1]
