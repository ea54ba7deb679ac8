import torch

from feddymem.models.generator import MemoryGenerator
from feddymem.models.loss import HypersphereLoss


def test_loss_falls_over_steps_on_a_fixed_batch():
    torch.manual_seed(0)
    gen = MemoryGenerator(8)
    loss_fn = HypersphereLoss(k_nearest=3, j_negatives=3, margin=0.1)
    memory = torch.randn(32, 8)
    batch = torch.randn(4, 8, 6, 6) * 2
    opt = torch.optim.AdamW([*gen.parameters(), *loss_fn.parameters()], lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn(gen(batch), memory)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert loss_fn.radius.item() != 1e-5  # the radius is learned too


def test_loss_terms():
    loss_fn = HypersphereLoss(k_nearest=1, j_negatives=1, margin=0.0, radius_init=1.0)
    memory = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    # Patch at distance 0.5 from item 0 (inside r = 1) and 2.5 from item 1 (outside): nothing to pay.
    assert loss_fn(torch.tensor([[0.5, 0.0]]), memory).item() == 0.0
    # Patch at squared distance 4 from its nearest item: attract pays 4 - 1 = 3; the next is far: repel 0.
    assert abs(loss_fn(torch.tensor([[-2.0, 0.0]]), memory).item() - 3.0) < 1e-6
    # The hard negative at squared distance 1 is not beyond r² + margin = 1.5: repel pays 0.5.
    close = HypersphereLoss(k_nearest=1, j_negatives=1, margin=0.5, radius_init=1.0)
    assert abs(close(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 0.0]])).item() - 0.5) < 1e-6


def test_gradient_through_the_selected_neighbours_equals_the_full_distance_matrix():
    # The reference: the same loss written on the full (P, M) matrix of squared distances.
    torch.manual_seed(3)
    memory = torch.randn(200, 16)
    patches = torch.randn(50, 16, requires_grad=True)
    loss_fn = HypersphereLoss(k_nearest=3, j_negatives=3, margin=0.5, radius_init=1.0)
    loss_fn(patches, memory).backward()
    fast = patches.grad.clone()
    patches.grad = None
    nearest = torch.topk(torch.cdist(patches, memory).pow(2), 6, dim=1, largest=False).values
    r2 = loss_fn.radius.pow(2)
    reference = torch.relu(nearest[:, :3] - r2).mean() + torch.relu(r2 + 0.5 - nearest[:, 3:]).mean()
    reference.backward()
    assert torch.allclose(fast, patches.grad, atol=1e-5)
