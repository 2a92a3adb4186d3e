"""BDLoss against a direct float64 computation, its memory footprint, gradients; the L1 baseline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from wbsr_train.loss import BDLoss, make_loss, optimizer_groups, pairwise_mse


def reference_bd(pred: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """METHOD.md 3 written out directly with a (B, B, D) broadcast, in whatever dtype it is given."""
    p, t = pred.flatten(1), target.flatten(1)
    d = ((p[:, None, :] - t[None, :, :]) ** 2).mean(-1)
    noise_var = 2 * sigma**2
    log_softmax = (-d / noise_var).log_softmax(dim=1)
    return -log_softmax.diagonal().mean() * noise_var.detach()


def pair(b: int, noise: float, seed: int = 0, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, 3, size, size, generator=g)
    return target + noise * torch.randn(b, 3, size, size, generator=g), target


@pytest.mark.parametrize("noise", [0.1, 1e-3, 1e-4])
def test_matches_direct_float64(noise: float) -> None:
    pred, target = pair(8, noise, size=32)
    loss_fn = BDLoss(0.05)
    pred32 = pred.clone().requires_grad_(True)
    loss = loss_fn(pred32, target)
    loss.backward()

    pred64 = pred.double().requires_grad_(True)
    sigma64 = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    ref = reference_bd(pred64, target.double(), sigma64)
    ref.backward()

    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(pred32.grad.double(), pred64.grad, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(loss_fn.sigma.grad.double(), sigma64.grad, rtol=1e-5, atol=1e-12)


def test_pairwise_mse_diagonal_accurate_for_near_identical() -> None:
    pred, target = pair(16, 1e-4, seed=1, size=64)
    d = pairwise_mse(pred.flatten(1), target.flatten(1))
    direct = ((pred.double() - target.double()) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(d.diagonal(), direct, rtol=1e-6, atol=0)


def largest_op_allocation(fn) -> int:
    """Bytes allocated (net, inclusive) by the most memory-hungry op recorded while running fn()."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


def test_no_b_by_b_by_d_tensor() -> None:
    b, c, h = 64, 3, 128
    pred, target = pair(b, 0.1, size=h)
    pred.requires_grad_(True)
    loss_fn = BDLoss()
    bbd_bytes = b * b * c * h * h * 4
    assert largest_op_allocation(lambda: loss_fn(pred, target).backward()) < bbd_bytes / 16
    assert pred.grad is not None and torch.isfinite(pred.grad).all()

    # The probe does catch a (B, B, D) tensor, on a size the direct form can afford.
    small = pair(32, 0.1, size=64)
    sigma = torch.tensor(0.05, requires_grad=True)
    naive_bytes = 32 * 32 * 3 * 64 * 64 * 4
    assert largest_op_allocation(lambda: reference_bd(*small, sigma).backward()) >= naive_bytes


def test_gradients_reach_sigma_and_pred() -> None:
    pred, target = pair(4, 0.05)
    pred.requires_grad_(True)
    loss_fn = BDLoss(0.05)
    loss_fn(pred, target).backward()
    assert loss_fn.sigma.grad is not None and loss_fn.sigma.grad.abs() > 0
    assert pred.grad.abs().sum() > 0


def test_batch_of_one_is_zero() -> None:
    pred, target = pair(1, 0.1)
    pred.requires_grad_(True)
    loss_fn = BDLoss()
    loss = loss_fn(pred, target)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros_like(pred))
    assert loss_fn.sigma.grad.item() == 0.0


def test_perfect_prediction_beats_swapped() -> None:
    _, target = pair(4, 0.0)
    loss_fn = BDLoss()
    assert loss_fn(target, target) < loss_fn(target.roll(1, dims=0), target)


def test_make_loss_and_groups() -> None:
    pred, target = pair(4, 0.1)
    l1 = make_loss("l1", 0.05)
    assert torch.equal(l1(pred, target), F.l1_loss(pred, target))
    bd = make_loss("bd", 0.2)
    assert isinstance(bd.balance, BDLoss) and bd.sigma.item() == pytest.approx(0.2)
    with pytest.raises(ValueError):
        make_loss("mse", 0.05)

    model = torch.nn.Conv2d(3, 3, 3, padding=1)
    assert len(optimizer_groups(model, l1, lr=2e-4)) == 1
    groups = optimizer_groups(model, bd, lr=2e-4, lr_sigma=1e-2)
    assert [g["lr"] for g in groups] == [2e-4, 1e-2]
    assert groups[1]["params"][0] is bd.sigma
    opt = torch.optim.Adam(groups)
    before = bd.sigma.item()
    bd(model(pred), target).backward()
    opt.step()
    # Adam's first step moves each parameter by about its lr.
    assert abs(bd.sigma.item() - before) == pytest.approx(1e-2, rel=1e-3)
