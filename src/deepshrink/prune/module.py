"""Pruning as a torch parametrization: weight = weight_orig * mask, with the mask a buffer.

The original Parameter keeps its identity (an optimizer built before pruning keeps working),
masked positions get exactly zero gradient, and the masked entries of the original are zeroed
when the mask is applied, so SGD with momentum and weight decay and Adam all leave them at
exactly 0.0: their gradient, decay term and optimizer state are all zero.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from deepshrink.errors import ConfigError
from deepshrink.layers import (
    Weight,
    as_weight,
    check_position,
    compressible_weights,
    parametrization_entries,
    weights_by_key,
)


class PruningMask(nn.Module):
    """The parametrization: multiplies the weight by a fixed boolean mask."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight with the pruned entries zeroed.

        Args:
            weight: the original weight.

        Returns:
            weight x mask.
        """
        return weight * self.mask


def pruning_mask_of(weight: Weight | nn.Module) -> PruningMask | None:
    """The weight's PruningMask parametrization, if it has one.

    Args:
        weight: a Weight or a single-weight module.

    Returns:
        The PruningMask, or None.
    """
    return next((item for item in as_weight(weight).parametrizations() if isinstance(item, PruningMask)), None)


def only_pruned(weight: Weight | nn.Module) -> bool:
    """Whether the weight is its own or only pruned: a weight drawn from a shared codebook
    cannot be rescaled or rewritten row by row without leaving the codebook.

    Args:
        weight: a Weight or a single-weight module.

    Returns:
        True when every parametrization on it is a PruningMask (or it has none).
    """
    return all(isinstance(item, PruningMask) for item in as_weight(weight).parametrizations())


def prune_weight(weight: Weight | nn.Module, mask: torch.Tensor) -> Weight:
    """Apply (or tighten) a keep-mask on `weight`.

    Args:
        weight: a Weight, or a Linear / convolution / Embedding module.
        mask: the keep-mask, the weight's shape.

    Returns:
        The weight as a Weight.

    Raises:
        ConfigError: the mask's shape is not the weight's.
    """
    weight = as_weight(weight)
    original = weight.original()
    if mask.shape != original.shape:
        raise ConfigError(
            f"mask shape {tuple(mask.shape)} does not match the shape {tuple(original.shape)} of {weight.name!r} "
            f"({weight.kind}.{weight.tensor})"
        )
    mask = mask.to(device=original.device, dtype=torch.bool)
    with torch.no_grad():
        original.mul_(mask)
    existing = pruning_mask_of(weight)
    if existing is not None:
        existing.mask.copy_(mask)
    else:
        weight.register(PruningMask(mask))
    return weight


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Prune each named weight of `model` with its mask.

    Args:
        model: the model, changed in place.
        masks: {weight name: keep-mask}.

    Returns:
        `model`.

    Raises:
        ConfigError: a name is not one of the model's weights, or a mask has another shape.
    """
    weights = compressible_weights(model)
    for name, mask in masks.items():
        if name not in weights:
            raise ConfigError(f"no prunable layer named {name!r}; the layers are {', '.join(weights)}")
        prune_weight(weights[name], mask)
    return model


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The keep-mask of every pruned weight, by name.

    Args:
        model: the model.

    Returns:
        {weight name: keep-mask}.
    """
    masks = {}
    for name, weight in compressible_weights(model).items():
        parametrization = pruning_mask_of(weight)
        if parametrization is not None:
            masks[name] = parametrization.mask
    return masks


def remove_pruning(model: nn.Module) -> nn.Module:
    """Make pruning permanent: plain weights with exact zeros, no parametrization left.

    Args:
        model: changed in place.

    Returns:
        `model`.
    """
    for weight in compressible_weights(model).values():
        if pruning_mask_of(weight) is not None:
            weight.remove_parametrizations()
    return model


def restore_pruning(model: nn.Module, state_dict: Mapping[str, torch.Tensor], position: int | None = None) -> nn.Module:
    """Register the masks that a pruned model's state_dict holds, so load_state_dict then fits.

    Args:
        model: changed in place.
        state_dict: a pruned model's state_dict.
        position: restore only the masks at this place in their weight's parametrization list
            (checkpoint.load_state_into restores every kind place by place, so the order is
            the saved one); None restores all.

    Returns:
        `model`.

    Raises:
        ConfigError: a mask of a weight the model does not have, or one out of order.
    """
    weights = weights_by_key(model)
    for key, place, prefix in parametrization_entries(state_dict, "mask"):
        if position is not None and place != position:
            continue
        if key not in weights:
            raise ConfigError(f"the state_dict prunes a weight {key!r} that the model does not have")
        if pruning_mask_of(weights[key]) is None:
            check_position(weights[key], place)
            weights[key].register(PruningMask(state_dict[prefix + "mask"]))
    return model
