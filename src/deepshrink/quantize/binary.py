"""BinaryConnect (Courbariaux, Bengio & David 2015) and binarized networks (Hubara et al. 2016).

BinaryConnect keeps a real-valued copy of each weight, uses its binarization in the forward
and backward passes, applies the gradient to the real-valued copy (a straight-through
estimator), and clips that copy to [-1, 1] after each update. Binarization is deterministic,
w_b = sign(w), or stochastic, w_b = +1 with probability hard_sigmoid(w) = clip((w + 1) / 2, 0, 1).
At evaluation time the stochastic variant uses sign(w), so the deployed weights are binary.

Binarized networks also binarize the activations with sign(r) and pass the gradient straight
through where |r| <= 1: g_r = g_q * 1(|r| <= 1). Both need batch normalisation after each
binary layer to set the scale that +/-1 weights cannot, as in the papers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from deepshrink.errors import ConfigError


def binarize(weights: torch.Tensor, stochastic: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """+1 / -1 values; sign(0) is +1. Stochastic: +1 with probability clip((w + 1) / 2, 0, 1).

    Args:
        weights: the real-valued weights.
        stochastic: draw each sign at random (else deterministic sign).
        generator: the random source of the stochastic draws.

    Returns:
        The binary values, `weights`' dtype.
    """
    if not stochastic:
        return torch.where(weights >= 0, 1.0, -1.0).to(weights.dtype)
    probability = ((weights + 1) / 2).clamp(0, 1)
    draws = torch.rand(weights.shape, generator=generator, device="cpu").to(weights.device)
    return torch.where(draws < probability, 1.0, -1.0).to(weights.dtype)


class _StraightThroughBinarize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, stochastic, generator):
        return binarize(weights, stochastic, generator)

    @staticmethod
    def backward(ctx, gradient):
        return gradient, None, None


class BinaryWeights(nn.Module):
    """Parametrization: the layer computes with binarized weights; gradients reach the real copy."""

    def __init__(self, stochastic: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.stochastic = stochastic
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        """The binarized weight (stochastic only while training); gradients pass straight through.

        Args:
            weights: the real-valued weight.

        Returns:
            +1 / -1 values.
        """
        stochastic = self.stochastic and self.training
        return _StraightThroughBinarize.apply(weights, stochastic, self.generator)


class _SignStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs):
        ctx.save_for_backward(inputs)
        return torch.where(inputs >= 0, 1.0, -1.0).to(inputs.dtype)

    @staticmethod
    def backward(ctx, gradient):
        (inputs,) = ctx.saved_tensors
        return gradient * (inputs.abs() <= 1).to(gradient.dtype)


class SignActivation(nn.Module):
    """sign(r) forward; g_r = g_q * 1(|r| <= 1) backward."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """sign(inputs), with the straight-through gradient inside [-1, 1].

        Args:
            inputs: the activations.

        Returns:
            +1 / -1 values.
        """
        return _SignStraightThrough.apply(inputs)


def binary_connect(model: nn.Module, stochastic: bool = False, seed: int = 0) -> nn.Module:
    """Binarize the weights of every Linear and Conv layer of `model` (in place).

    Args:
        model: the model, changed in place.
        stochastic: stochastic binarization while training.
        seed: the seed of the stochastic draws.

    Returns:
        `model`.

    Raises:
        ConfigError: the model has no Linear or Conv layer.
    """
    found = False
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
            with torch.no_grad():
                module.weight.clamp_(-1, 1)
            parametrize.register_parametrization(module, "weight", BinaryWeights(stochastic, seed))
            found = True
    if not found:
        raise ConfigError("binary_connect found no Linear or Conv layer to binarize")
    return model


def clip_real_weights(model: nn.Module, step: int = 0) -> None:
    """After each update, keep the real-valued weights in [-1, 1] (BinaryConnect's clip).

    Args:
        model: the model, changed in place.
        step: the optimizer step (the after_step protocol of `fit`; unused).
    """
    with torch.no_grad():
        for module in model.modules():
            if parametrize.is_parametrized(module, "weight") and any(
                isinstance(item, BinaryWeights) for item in module.parametrizations.weight
            ):
                module.parametrizations.weight.original.clamp_(-1, 1)


def binary_mlp(
    hidden: tuple[int, ...] = (300, 100),
    in_features: int = 784,
    num_classes: int = 10,
    binarize_activations: bool = False,
) -> nn.Sequential:
    """LeNet-300-100 shaped for binary weights: BatchNorm after each Linear sets the scale.

    With `binarize_activations` the hidden activations are sign(.) (a binarized network);
    otherwise ReLU (BinaryConnect, which binarizes the weights only).

    Args:
        hidden: the hidden layers' widths.
        in_features: the flattened input's size.
        num_classes: the outputs.
        binarize_activations: sign activations (BNN) instead of ReLU.

    Returns:
        The nn.Sequential.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.BatchNorm1d(size)]
        layers.append(SignActivation() if binarize_activations else nn.ReLU())
        width = size
    layers += [nn.Linear(width, num_classes), nn.BatchNorm1d(num_classes)]
    return nn.Sequential(*layers)
