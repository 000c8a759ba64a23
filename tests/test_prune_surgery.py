"""Dynamic Network Surgery: hysteresis thresholds, splicing, straight-through gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepshrink.data import make_loader
from deepshrink.errors import ConfigError
from deepshrink.prune.module import current_masks
from deepshrink.prune.surgery import (
    SurgeryMask,
    dynamic_network_surgery,
    finish_surgery,
    layer_threshold,
    start_surgery,
)
from deepshrink.train import TrainConfig, evaluate


def test_mask_update_follows_the_two_thresholds():
    surgery = SurgeryMask(torch.tensor([True, False, True, False, True]), low=0.9, high=1.1)
    surgery.update(torch.tensor([0.5, 1.0, 1.0, 2.0, -1.5]))
    # below a: pruned; between a and b: unchanged; above b: kept (spliced if it was pruned)
    assert surgery.mask.tolist() == [False, False, True, True, True]


def test_a_pruned_weight_that_grows_is_spliced_back():
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.01, 1.0, 1.0, 1.0]] * 3))
    surgery = start_surgery(layer, threshold=0.5)
    assert not surgery.mask[0, 0]
    with torch.no_grad():
        layer.parametrizations.weight.original[0, 0] = 2.0
    surgery.update(layer.parametrizations.weight.original)
    assert surgery.mask[0, 0] and layer.weight[0, 0] == 2.0


def test_pruned_weights_keep_receiving_gradient():
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.01, 1.0, 1.0, 1.0]] * 3))
    start_surgery(layer, threshold=0.5)
    assert layer.weight[0, 0] == 0.0
    layer(torch.ones(2, 4)).sum().backward()
    assert torch.all(layer.parametrizations.weight.original.grad[:, 0] != 0)


def test_finish_leaves_an_ordinary_pruning_mask_with_exact_zeros():
    layer = nn.Linear(10, 10)
    start_surgery(layer, layer_threshold(layer.weight, sparsity=0.7))
    mask = finish_surgery(layer)
    assert torch.equal(current_masks(nn.Sequential(layer))["0"], mask)
    assert torch.all(layer.weight[~mask] == 0) and torch.all(layer.parametrizations.weight.original[~mask] == 0)


def test_threshold_from_crate_is_mean_plus_crate_std():
    weight = torch.tensor([-1.0, 2.0, -3.0, 4.0])
    magnitude = weight.abs()
    assert layer_threshold(weight, crate=0.5) == pytest.approx((magnitude.mean() + 0.5 * magnitude.std()).item())
    with pytest.raises(ConfigError, match="exactly one"):
        layer_threshold(weight)


def test_surgery_trains_a_sparse_model_and_splices(small_data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10))
    loader = make_loader(small_data.train, 64, shuffle=True)
    result = dynamic_network_surgery(
        model,
        loader,
        TrainConfig(epochs=3, learning_rate=0.05),
        sparsities={"1": 0.9, "3": 0.5},
        gamma=1e-3,
        progress=False,
    )
    kept = result.masks["1"].float().mean().item()
    assert 0.02 < kept < 0.3
    assert result.spliced > 0
    assert torch.all(model[1].weight[~result.masks["1"]] == 0)
    assert evaluate(model, make_loader(small_data.validation, 1000, shuffle=False)).metric > 0.75
