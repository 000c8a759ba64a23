"""OBD and OBS against closed forms on problems whose Hessian is known."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepshrink.data import make_loader
from deepshrink.prune.saliency import (
    exact_hessian_diagonal,
    fisher_diagonal,
    obd_saliency,
    optimal_brain_surgeon,
    softmax_layer_hessian,
)


def spd_matrix(size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(size, size, generator=generator, dtype=torch.float64)
    return factor @ factor.T + size * torch.eye(size, dtype=torch.float64)


def test_exact_diagonal_of_a_quadratic_is_the_diagonal_of_its_matrix():
    hessian = spd_matrix(6)
    diagonal = exact_hessian_diagonal(lambda w: 0.5 * w @ hessian @ w + w.sum(), torch.randn(6, dtype=torch.float64))
    assert torch.allclose(diagonal, hessian.diagonal())


def test_obd_saliency_is_half_h_w_squared():
    weight, diagonal = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([4.0, 1.0, 8.0])
    assert obd_saliency(weight, diagonal).tolist() == [2.0, 2.0, 1.0]


def quadratic_loss(hessian, optimum):
    return lambda w: 0.5 * (w - optimum) @ hessian @ (w - optimum)


def constrained_minimum(hessian, optimum, removed):
    """min 1/2 (w - w*)^T H (w - w*) subject to w_S = 0, solved directly."""
    size = len(optimum)
    free = [index for index in range(size) if index not in removed]
    removed = list(removed)
    shift = -optimum[removed]
    free_shift = -torch.linalg.solve(hessian[free][:, free], hessian[free][:, removed] @ shift)
    solution = optimum.clone()
    solution[removed] = 0.0
    solution[free] = optimum[free] + free_shift
    return solution


def test_obs_removes_the_weight_whose_constrained_loss_is_smallest():
    hessian, optimum = spd_matrix(5, seed=1), torch.tensor([0.3, -1.2, 0.05, 2.0, -0.4], dtype=torch.float64)
    loss = quadratic_loss(hessian, optimum)
    result = optimal_brain_surgeon(optimum, torch.linalg.inv(hessian), prune_count=1)
    brute = {q: loss(constrained_minimum(hessian, optimum, {q})).item() for q in range(5)}
    chosen = int(torch.nonzero(~result.mask).item())
    assert chosen == min(brute, key=brute.get)
    # L_q = w_q^2 / (2 [H^-1]_qq) is exact for a quadratic, and delta_w reaches the constrained optimum.
    assert result.predicted_increase == pytest.approx(brute[chosen], rel=1e-9)
    assert loss(result.weight).item() == pytest.approx(brute[chosen], rel=1e-9)
    assert torch.allclose(result.weight, constrained_minimum(hessian, optimum, {chosen}))


def test_sequential_obs_with_downdates_is_exact_for_the_chosen_set():
    hessian, optimum = spd_matrix(7, seed=2), torch.linspace(-1, 1, 7, dtype=torch.float64) + 0.1
    result = optimal_brain_surgeon(optimum, torch.linalg.inv(hessian), prune_count=3)
    removed = set(torch.nonzero(~result.mask).flatten().tolist())
    assert len(removed) == 3 and torch.all(result.weight[list(removed)] == 0.0)
    assert torch.allclose(result.weight, constrained_minimum(hessian, optimum, removed))
    loss = quadratic_loss(hessian, optimum)
    assert result.predicted_increase == pytest.approx(loss(result.weight).item(), rel=1e-9)
    best = min(loss(constrained_minimum(hessian, optimum, set(s))).item() for s in itertools.combinations(range(7), 3))
    assert loss(result.weight).item() <= 1.5 * best  # greedy, so near (not always at) the best set


def test_softmax_layer_hessian_matches_autograd():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(20, 3, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (20,), generator=generator)
    weight = torch.randn(4, 3, generator=generator, dtype=torch.float64)

    def loss(flat):
        return nn.functional.cross_entropy(inputs @ flat.view(4, 3).T, labels)

    expected = torch.autograd.functional.hessian(loss, weight.flatten())
    probabilities = torch.softmax(inputs @ weight.T, dim=1)
    assert torch.allclose(softmax_layer_hessian(inputs, probabilities, damping=0.0), expected, atol=1e-12)


def test_fisher_diagonal_estimates_the_gauss_newton_diagonal():
    """For one linear layer the Gauss-Newton matrix is exactly softmax_layer_hessian (bias-free)."""
    torch.manual_seed(0)
    inputs = torch.randn(4000, 5)
    model = nn.Linear(5, 3, bias=False)
    with torch.no_grad():
        model.weight.mul_(3)
    loader = make_loader(TensorDataset(inputs, torch.zeros(4000, dtype=torch.long)), 500, shuffle=False)
    estimate = fisher_diagonal(model, loader, max_examples=4000, seed=0)[""]
    probabilities = torch.softmax(model(inputs), dim=1).detach()
    exact = softmax_layer_hessian(inputs, probabilities, damping=0.0).diagonal().view(3, 5).float()
    assert torch.allclose(estimate, exact, rtol=0.15, atol=1e-3)


def test_fisher_diagonal_is_the_same_whatever_the_chunk_of_examples(monkeypatch):
    """A large model's per-example gradients go a few examples at a time (PER_EXAMPLE_BYTES): the
    same estimate as 256 at once, to float rounding."""
    from deepshrink.prune import saliency

    torch.manual_seed(1)
    inputs = torch.randn(600, 6)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    loader = make_loader(TensorDataset(inputs, torch.zeros(600, dtype=torch.long)), 300, shuffle=False)
    whole = fisher_diagonal(model, loader, max_examples=600, seed=0)
    weight_bytes = sum(parameter.numel() * 4 for name, parameter in model.named_parameters() if "weight" in name)
    monkeypatch.setattr(saliency, "PER_EXAMPLE_BYTES", 7 * weight_bytes)  # chunks of 7 examples
    chunked = fisher_diagonal(model, loader, max_examples=600, seed=0)
    assert whole.keys() == chunked.keys() and len(whole) == 2
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-5, atol=1e-9)
