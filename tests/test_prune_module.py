"""The pruning parametrization on real layers and optimizers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepshrink.errors import ConfigError, UnsupportedLayerError
from deepshrink.layers import parametrization_entries, select_weights
from deepshrink.models import build_model
from deepshrink.prune.masks import sparsity_mask
from deepshrink.prune.module import apply_masks, current_masks, prune_weight, remove_pruning, restore_pruning


def random_masks(model, sparsity=0.8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(layer.value.shape, generator=generator) > sparsity
        for name, layer in select_weights(model).items()
    }


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ],
    ids=["sgd-momentum-decay", "nesterov", "adam", "adamw"],
)
def test_pruned_weights_stay_exactly_zero_through_many_steps(make_optimizer):
    torch.manual_seed(0)
    model = build_model("lenet-5")
    optimizer = make_optimizer(model.parameters())  # built BEFORE pruning: identity must survive
    masks = random_masks(model)
    apply_masks(model, masks)
    inputs, targets = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    for name, layer in select_weights(model).items():
        assert torch.all(layer.value[~masks[name]] == 0.0), name
        assert torch.all(layer.original()[~masks[name]] == 0.0), name
        assert torch.any(layer.value[masks[name]] != 0.0), name


def test_gradient_at_masked_positions_is_zero():
    model = build_model("lenet-300-100")
    masks = random_masks(model)
    apply_masks(model, masks)
    nn.functional.cross_entropy(model(torch.randn(8, 784)), torch.randint(0, 10, (8,))).backward()
    gradient = model.fc1.parametrizations.weight.original.grad
    assert torch.all(gradient[~masks["fc1"]] == 0.0)
    assert torch.any(gradient[masks["fc1"]] != 0.0)


def test_parameter_identity_is_kept_and_remove_gives_the_same_output():
    model = build_model("lenet-5")
    before = {name: id(layer.value) for name, layer in select_weights(model).items()}
    apply_masks(model, random_masks(model))
    for name, layer in select_weights(model).items():
        assert id(layer.original()) == before[name]
    inputs = torch.randn(4, 1, 28, 28)
    expected = model(inputs)
    masks = {name: mask.clone() for name, mask in current_masks(model).items()}
    remove_pruning(model)
    assert not current_masks(model)
    assert torch.equal(model(inputs), expected)
    for name, layer in select_weights(model).items():
        assert isinstance(layer.value, nn.Parameter) and id(layer.value) == before[name]
        assert torch.all(layer.value[~masks[name]] == 0.0)


def test_state_dict_round_trip_keeps_the_masks():
    model = build_model("lenet-300-100")
    apply_masks(model, random_masks(model))
    state = model.state_dict()
    fresh = restore_pruning(build_model("lenet-300-100"), state)
    fresh.load_state_dict(state)
    for name, mask in current_masks(model).items():
        assert torch.equal(current_masks(fresh)[name], mask)
    inputs = torch.randn(3, 784)
    assert torch.equal(fresh(inputs), model(inputs))


def test_masks_are_found_at_any_position_and_restored_only_in_order():
    model = build_model("lenet-300-100")
    apply_masks(model, random_masks(model))
    state = {key.replace("weight.0.mask", "weight.1.mask"): value for key, value in model.state_dict().items()}
    assert {key for key, position, _ in parametrization_entries(state, "mask") if position == 1} == {
        f"{name}.weight" for name in current_masks(model)
    }
    with pytest.raises(ConfigError, match="parametrization 1 of 'fc1', but 0 are registered"):
        restore_pruning(build_model("lenet-300-100"), state)


def test_pruning_again_tightens_the_existing_mask():
    layer = nn.Linear(20, 10)
    prune_weight(layer, sparsity_mask(layer.weight, 0.5))
    prune_weight(layer, sparsity_mask(layer.weight, 0.8, current_masks(nn.Sequential(layer))["0"]))
    assert len(layer.parametrizations.weight) == 1
    assert int((layer.weight == 0).sum()) == 160


@pytest.mark.parametrize(
    "layer", [nn.Linear(6, 4), nn.Conv1d(3, 4, 3), nn.Conv2d(3, 4, 3, padding=1, stride=2), nn.Embedding(10, 6)]
)
def test_every_supported_layer_type_can_be_pruned(layer):
    mask = sparsity_mask(layer.weight, 0.5)
    prune_weight(layer, mask)
    assert torch.all(layer.weight[~mask] == 0)
    examples = [
        (nn.Linear, torch.randn(2, 6)),
        (nn.Conv1d, torch.randn(2, 3, 9)),
        (nn.Conv2d, torch.randn(2, 3, 8, 8)),
        (nn.Embedding, torch.tensor([1, 2, 3])),
    ]
    inputs = next(example for kind, example in examples if isinstance(layer, kind))
    layer(inputs).sum().backward()
    assert torch.all(layer.parametrizations.weight.original.grad[~mask] == 0)


def test_layers_are_chosen_by_name_patterns():
    model = build_model("lenet-5")
    assert list(select_weights(model, ["conv*"])) == ["conv1", "conv2"]
    assert list(select_weights(model, ["fc2", "conv1"])) == ["conv1", "fc2"]


def test_unknown_layer_pattern_is_named():
    with pytest.raises(ConfigError, match="'fc9'.*conv1, conv2, fc1, fc2"):
        select_weights(build_model("lenet-5"), ["fc9"])


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(UnsupportedLayerError, match=r"1.weight \(BatchNorm1d.weight\).*stored losslessly"):
        select_weights(model, ["1"])
    recurrent = nn.Sequential(nn.LSTM(3, 4))
    with pytest.raises(UnsupportedLayerError, match=r"0.bias_ih_l0 \(LSTM.bias_ih_l0\)"):
        select_weights(recurrent, ["0.bias_ih_l0"])


def test_mask_of_the_wrong_shape_is_refused():
    with pytest.raises(ConfigError, match="mask shape"):
        prune_weight(nn.Linear(4, 4), torch.ones(3, 4, dtype=torch.bool))
