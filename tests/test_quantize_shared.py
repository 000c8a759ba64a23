"""Weight sharing on real layers: distinct values, pruned zeros, the centroid gradient, round trips."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deepshrink.checkpoint import load_checkpoint, load_state_into, save_checkpoint
from deepshrink.errors import ConfigError
from deepshrink.layers import select_weights
from deepshrink.models import build_model
from deepshrink.prune.masks import sparsity_mask
from deepshrink.prune.module import apply_masks
from deepshrink.quantize.shared import (
    POSTERIOR_BITS_RANGE,
    distinct_values,
    posterior_bits,
    remove_sharing,
    share_layer_weights,
    share_weights,
    sharing_of,
)


def pruned_lenet(sparsity=0.9):
    torch.manual_seed(0)
    model = build_model("lenet-5")
    apply_masks(
        model, {name: sparsity_mask(getattr(model, name).weight, sparsity) for name in ("conv1", "conv2", "fc1", "fc2")}
    )
    return model


@settings(max_examples=200, deadline=None)
@given(span=st.floats(0.0, 1e6), sigma=st.floats(0.0, 20.0, exclude_min=True))
def test_posterior_bits_give_the_finest_spacing_not_below_sigma(span, sigma):
    """The widths `posterior_bits` picks: codebook spacing span / 2^bits at least the
    posterior's sigma, and one more bit would go below it, except where POSTERIOR_BITS_RANGE
    clips; layers without a posterior keep the paper's widths."""
    chosen = posterior_bits(select_weights(_lenet(), None), {"fc1": {"sigma": sigma, "span": span}})
    low, high = POSTERIOR_BITS_RANGE
    bits = chosen["fc1"]
    assert low <= bits <= high
    if bits > low:
        assert span / 2**bits >= sigma * (1 - 1e-9)
    if bits < high:
        assert span / 2 ** (bits + 1) < sigma * (1 + 1e-9)
    assert posterior_bits(select_weights(_lenet(), None), {"fc2": {"sigma": sigma, "span": span}})["fc1"] == 5
    assert {name: chosen[name] for name in ("conv1", "conv2", "fc2")} == {"conv1": 8, "conv2": 8, "fc2": 5}


@functools.cache
def _lenet():
    return build_model("lenet-5")


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_each_layer_has_at_most_2_to_the_bits_values_zero_included(bits):
    model = pruned_lenet()
    zeros = {name: getattr(model, name).weight == 0 for name in ("conv1", "conv2", "fc1", "fc2")}
    share_weights(model, {"*": bits})
    for name, was_zero in zeros.items():
        layer = getattr(model, name)
        assert distinct_values(layer) <= 2**bits, name
        assert torch.equal(layer.weight == 0, was_zero), name  # pruned zeros are exactly the zero code


def test_default_bits_are_8_for_conv_and_5_for_fc():
    model = pruned_lenet()
    records = share_weights(model)
    assert {name: record.bits for name, record in records.items()} == {"conv1": 8, "conv2": 8, "fc1": 5, "fc2": 5}


def test_unpruned_layer_uses_all_2_to_the_bits_centroids():
    layer = nn.Linear(100, 50)
    record = share_layer_weights(layer, 4)
    assert not record.zero_code and distinct_values(layer) == 16


def test_pruned_zeros_stay_exactly_zero_through_fine_tuning():
    model = pruned_lenet()
    zeros = {name: getattr(model, name).weight == 0 for name in ("conv1", "fc1")}
    share_weights(model, {"conv1": 8, "fc1": 5})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    inputs, targets = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for _ in range(20):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    for name, was_zero in zeros.items():
        assert torch.all(getattr(model, name).weight[was_zero] == 0.0), name
    assert distinct_values(model.fc1) <= 32


def test_centroid_gradient_is_the_sum_of_weight_gradients_per_code():
    """dL/dC_k = sum over ij of dL/dW_ij * 1(I_ij = k), computed by hand against autograd."""
    torch.manual_seed(1)
    layer = nn.Linear(30, 20)
    with torch.no_grad():
        layer.weight[layer.weight.abs() < 0.05] = 0.0
    share_layer_weights(layer, 3)
    sharing = sharing_of(layer)
    inputs = torch.randn(7, 30)
    weight = layer.weight.detach().requires_grad_(True)
    loss = (nn.functional.linear(inputs, weight, layer.bias) ** 2).sum()
    (weight_gradient,) = torch.autograd.grad(loss, weight)
    (layer(inputs) ** 2).sum().backward()
    codes = sharing.indices.long()
    for code in range(1, 8):
        expected = weight_gradient[codes == code].sum()
        assert torch.allclose(sharing.codebook.grad[code - 1], expected, atol=1e-5), code


def test_remove_makes_it_permanent_with_the_same_output():
    model = pruned_lenet()
    share_weights(model)
    inputs = torch.randn(3, 1, 28, 28)
    expected = model(inputs)
    remove_sharing(model)
    assert sharing_of(model.fc1) is None and isinstance(model.fc1.weight, nn.Parameter)
    assert torch.equal(model(inputs), expected)
    assert distinct_values(model.fc1) <= 32


def test_state_dict_round_trips_through_a_checkpoint(tmp_path):
    model = pruned_lenet()
    share_weights(model)
    path = save_checkpoint(tmp_path / "shared.safetensors", model, model_name="lenet-5")
    restored = load_state_into(build_model("lenet-5"), load_checkpoint(path), path)
    inputs = torch.randn(2, 1, 28, 28)
    assert torch.equal(restored(inputs), model(inputs))
    assert sharing_of(restored.conv2) is not None
    assert torch.equal(sharing_of(restored.conv2).indices, sharing_of(model.conv2).indices)


def test_bits_out_of_range_are_named():
    from deepshrink.errors import ConfigError

    with pytest.raises(ConfigError, match="bits=17"):
        share_layer_weights(nn.Linear(3, 3), 17)
    with pytest.raises(ConfigError, match="bits=0"):
        share_layer_weights(nn.Linear(3, 3), 0)


def test_centroid_gradient_is_the_float64_sum_and_the_same_every_time():
    """A centroid's gradient is the sum of its weights' gradients (computed here in float64,
    the trusted reference), and repeated backward passes give the same bits: autograd's own
    indexing backward adds across threads in a varying order, which made the same seed give
    different files."""
    model = pruned_lenet()
    share_weights(model, {"*": 5})
    layer = model.fc1
    torch.manual_seed(1)
    upstream = torch.randn_like(layer.weight)
    sharing = sharing_of(layer)
    codes = sharing.indices.long().reshape(-1)
    expected = torch.zeros(32, dtype=torch.float64).index_add_(0, codes, upstream.reshape(-1).double())[1:]
    gradients = []
    for _ in range(5):
        sharing.codebook.grad = None
        (layer.weight * upstream).sum().backward()
        gradients.append(sharing.codebook.grad.clone())
    torch.testing.assert_close(gradients[0].double(), expected, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(gradient, gradients[0]) for gradient in gradients)


def test_codes_stay_narrow_from_sharing_to_the_encoder(monkeypatch):
    """uint8 codes up to 8 bits (int16 to 15), into the encoder as uint8 / uint16: no int64 copy."""
    from deepshrink.encode import codec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    share_weights(model, {"0": 5, "1": 12})
    assert sharing_of(model[0]).indices.dtype == torch.uint8
    assert sharing_of(model[1]).indices.dtype == torch.int16
    seen = []
    original = codec._encode_stream

    def recording(symbols, *arguments):
        seen.append(symbols.dtype)
        return original(symbols, *arguments)

    monkeypatch.setattr(codec, "_encode_stream", recording)
    codec.encode_model(model, layout="dense")
    assert seen[:2] == [np.dtype(np.uint8), np.dtype(np.uint16)]


def _pruned_lenet(state: dict, data) -> tuple[nn.Module, object]:
    from deepshrink.stages import PruneSettings, StageContext, run_stage
    from deepshrink.stages.base import Loaders

    model = build_model("lenet-300-100")
    model.load_state_dict(state)
    context = StageContext(loaders=Loaders.from_splits(data), progress=False)
    run_stage(model, PruneSettings(sparsity={"*": 0.8}, rounds=1, retrain_epochs=0), context)
    return model, context


def test_fisher_weighting_lowers_the_fisher_weighted_error_and_keeps_the_codebook_limit(small_data, small_lenet_state):
    """`weighting: fisher` on a pruned LeNet-300-100: at most 2^bits values a layer, the pruned
    zeros still zero, and the loss-weighted squared error sum_i F_ii (w_i - c_i)^2 (F the same
    Fisher estimate, recomputed here) below what the paper's unweighted k-means leaves."""
    from deepshrink.layers import plain_copy
    from deepshrink.prune.saliency import fisher_diagonal
    from deepshrink.stages import QuantizeSettings, run_stage

    weighted, context = _pruned_lenet(small_lenet_state, small_data)
    plain = build_model("lenet-300-100")
    plain.load_state_dict(plain_copy(weighted).state_dict())
    pruned = {name: weight.value.detach().clone() for name, weight in select_weights(weighted).items()}
    fisher = fisher_diagonal(
        plain_copy(weighted), context.loaders.train(128, context.seed), None, max_examples=600, seed=context.seed
    )
    unweighted = plain_copy(weighted)
    result = run_stage(
        weighted, QuantizeSettings(bits={"*": 3}, weighting="fisher", fisher_examples=600, finetune_epochs=0), context
    )
    run_stage(unweighted, QuantizeSettings(bits={"*": 3}, finetune_epochs=0), context)
    assert result.log["weighting"] == "fisher"
    errors = {}
    for label, model in (("weighted", weighted), ("unweighted", unweighted)):
        errors[label] = 0.0
        for name, weight in select_weights(model).items():
            values = weight.value.detach()
            assert torch.unique(values).numel() <= 8 and bool((values[pruned[name] == 0] == 0).all()), (label, name)
            errors[label] += float((fisher[name] * (values - pruned[name]) ** 2).sum())
    assert errors["weighted"] < 0.95 * errors["unweighted"], errors


def test_fisher_weighting_is_refused_where_it_has_no_meaning(small_data, small_lenet_state):
    from deepshrink.stages import QuantizeSettings, StageContext, run_stage
    from deepshrink.tasks import regression

    with pytest.raises(ConfigError, match="use it with method kmeans"):
        QuantizeSettings(method="soft", weighting="fisher")
    with pytest.raises(ConfigError, match="fisher_examples goes with"):
        QuantizeSettings(bits={"*": 4}, fisher_examples=100)
    model, context = _pruned_lenet(small_lenet_state, small_data)
    settings = QuantizeSettings(bits={"*": 3}, weighting="fisher", finetune_epochs=0)
    with pytest.raises(ConfigError, match="it needs data"):
        run_stage(model, settings, StageContext(loaders=None, progress=False))
    with pytest.raises(ConfigError, match="this task is regression"):
        run_stage(model, settings, StageContext(loaders=context.loaders, progress=False, task=regression()))
