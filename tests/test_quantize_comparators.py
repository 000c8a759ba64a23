"""Fixed-point rounding, binarization and product/residual quantization."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deepshrink.errors import ConfigError
from deepshrink.quantize.binary import (
    BinaryWeights,
    SignActivation,
    binarize,
    binary_connect,
    binary_mlp,
    clip_real_weights,
)
from deepshrink.quantize.fixed_point import FixedPointFormat, FixedPointParameters, quantize_fixed_point
from deepshrink.quantize.product import product_quantize, residual_quantize

FORMAT = FixedPointFormat(integer_bits=2, fraction_bits=4)  # range [-2, 2 - 1/16], eps 1/16


def test_format_range_and_resolution():
    assert (FORMAT.minimum, FORMAT.maximum, FORMAT.resolution, FORMAT.word_length) == (-2.0, 2 - 1 / 16, 1 / 16, 6)


def test_round_to_nearest_and_saturation():
    values = torch.tensor([0.03, 0.032, -0.03, 5.0, -5.0, 1.99])
    quantized = quantize_fixed_point(values, FORMAT, "nearest")
    assert quantized.tolist() == [0.0, 0.0625, -0.0, 2 - 1 / 16, -2.0, 2 - 1 / 16]


def test_stochastic_rounding_is_unbiased():
    """Mean error over many draws is ~0, where round-to-nearest is off by the full fraction."""
    values = torch.full((200_000,), 0.3 * FORMAT.resolution)
    generator = torch.Generator().manual_seed(0)
    stochastic = quantize_fixed_point(values, FORMAT, "stochastic", generator)
    assert set(stochastic.unique().tolist()) == {0.0, FORMAT.resolution}
    error = (stochastic - values).mean().item()
    assert abs(error) < 0.005 * FORMAT.resolution  # ~5 standard errors
    assert (quantize_fixed_point(values, FORMAT, "nearest") - values).mean().item() == pytest.approx(
        -0.3 * FORMAT.resolution
    )


def test_stochastic_rounding_saturates_too():
    values = torch.tensor([10.0, -10.0, 1.97])
    quantized = quantize_fixed_point(values, FORMAT, "stochastic", torch.Generator().manual_seed(1))
    assert quantized[0] == FORMAT.maximum and quantized[1] == FORMAT.minimum and quantized[2] <= FORMAT.maximum


def test_fixed_point_parameters_land_on_the_grid():
    model = nn.Linear(10, 4)
    FixedPointParameters(FORMAT, "stochastic")(model)
    for parameter in model.parameters():
        steps = parameter / FORMAT.resolution
        assert torch.equal(steps, steps.round())


@pytest.mark.parametrize("values", [{"integer_bits": 0, "fraction_bits": 3}, {"integer_bits": 2, "fraction_bits": -1}])
def test_bad_formats_are_named(values):
    with pytest.raises(ConfigError, match="bits="):
        FixedPointFormat(**values)


def test_binarization_gives_plus_and_minus_one():
    weights = torch.tensor([-0.7, -0.0, 0.0, 0.2, 3.0])
    assert binarize(weights).tolist() == [-1.0, 1.0, 1.0, 1.0, 1.0]
    stochastic = binarize(torch.randn(1000), stochastic=True, generator=torch.Generator().manual_seed(0))
    assert set(stochastic.unique().tolist()) == {-1.0, 1.0}


def test_stochastic_binarization_follows_the_hard_sigmoid():
    weights = torch.full((100_000,), 0.5)  # P(+1) = (0.5 + 1) / 2 = 0.75
    draws = binarize(weights, stochastic=True, generator=torch.Generator().manual_seed(0))
    assert (draws == 1).float().mean().item() == pytest.approx(0.75, abs=0.01)


def test_sign_activation_gradient_is_masked_where_the_input_exceeds_one():
    inputs = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    output = SignActivation()(inputs)
    assert output.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
    output.backward(torch.full_like(inputs, 3.0))
    assert inputs.grad.tolist() == [0.0, 3.0, 3.0, 3.0, 3.0, 3.0, 0.0]


def test_binary_connect_computes_with_signs_and_updates_the_clipped_real_copy():
    model = binary_connect(binary_mlp((8,), in_features=6, num_classes=3))
    layer = model[1]
    assert set(layer.weight.unique().tolist()) <= {-1.0, 1.0}
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    nn.functional.cross_entropy(model(torch.randn(16, 6)), torch.randint(0, 3, (16,))).backward()
    gradient = layer.parametrizations.weight.original.grad
    assert gradient is not None and torch.any(gradient != 0)  # straight through to the real weights
    optimizer.step()
    clip_real_weights(model)
    assert layer.parametrizations.weight.original.abs().max() <= 1.0


def test_stochastic_binary_weights_are_deterministic_in_eval_mode():
    parametrization = BinaryWeights(stochastic=True).eval()
    weights = torch.tensor([0.3, -0.3])
    assert parametrization(weights).tolist() == [1.0, -1.0]


def test_product_quantization_reconstructs_exactly_with_as_many_clusters_as_rows():
    weight = torch.randn(8, 12)
    quantized = product_quantize(weight, subspaces=3, clusters=8)
    assert torch.allclose(quantized.reconstruct(), weight, atol=1e-6)


def test_product_quantization_compression_rate_follows_the_paper():
    quantized = product_quantize(torch.randn(300, 784), subspaces=4, clusters=16)
    expected = 32 * 300 * 784 / (32 * 16 * 784 + 4 * 300 * 4)
    assert quantized.compression_rate == pytest.approx(expected)
    assert quantized.reconstruct().shape == (300, 784)


def test_residual_quantization_error_shrinks_with_each_stage():
    weight = torch.randn(100, 20, generator=torch.Generator().manual_seed(0))
    errors = [(residual_quantize(weight, stages, 8).reconstruct() - weight).norm().item() for stages in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2]
    quantized = residual_quantize(weight, 2, 8)
    assert quantized.compression_rate == pytest.approx(32 * 100 * 20 / (2 * 3 * 100 + 32 * 2 * 8 * 20))
    assert math.isfinite(quantized.compression_rate)


def test_product_quantization_rejects_uneven_splits():
    with pytest.raises(ConfigError, match="subspaces=5"):
        product_quantize(torch.randn(4, 12), subspaces=5, clusters=2)
