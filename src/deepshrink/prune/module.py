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
from torch.nn.utils import parametrize

from deepshrink.errors import ConfigError
from deepshrink.layers import check_position, compressible_layers, parametrization_entries


class PruningMask(nn.Module):
    """The parametrization: multiplies the weight by a fixed boolean mask."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def pruning_mask_of(layer: nn.Module) -> PruningMask | None:
    """The layer's PruningMask parametrization of `weight`, if it has one."""
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    for parametrization in layer.parametrizations.weight:
        if isinstance(parametrization, PruningMask):
            return parametrization
    return None


def original_weight(layer: nn.Module) -> nn.Parameter:
    """The trainable Parameter behind `layer.weight`, parametrized or not."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


def prune_layer(layer: nn.Module, mask: torch.Tensor) -> nn.Module:
    """Apply (or tighten) a keep-mask on `layer.weight`. Returns the layer."""
    weight = original_weight(layer)
    if mask.shape != weight.shape:
        raise ConfigError(
            f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)} "
            f"of {type(layer).__name__}"
        )
    mask = mask.to(device=weight.device, dtype=torch.bool)
    with torch.no_grad():
        weight.mul_(mask)
    existing = pruning_mask_of(layer)
    if existing is not None:
        existing.mask.copy_(mask)
    else:
        parametrize.register_parametrization(layer, "weight", PruningMask(mask))
    return layer


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Prune each named layer of `model` with its mask."""
    layers = compressible_layers(model)
    for name, mask in masks.items():
        if name not in layers:
            raise ConfigError(f"no prunable layer named {name!r}; the layers are {', '.join(layers)}")
        prune_layer(layers[name], mask)
    return model


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The keep-mask of every pruned layer, by name."""
    masks = {}
    for name, layer in compressible_layers(model).items():
        parametrization = pruning_mask_of(layer)
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
    for layer in compressible_layers(model).values():
        if pruning_mask_of(layer) is not None:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return model


def restore_pruning(model: nn.Module, state_dict: Mapping[str, torch.Tensor], position: int | None = None) -> nn.Module:
    """Register the masks that a pruned model's state_dict holds, so load_state_dict then fits.

    `position` restores only the masks at that place in their layer's parametrization list
    (checkpoint.load_state_into restores every kind place by place, so the order is the saved one).
    Raises ConfigError for a mask of a layer the model does not have, or out of order.
    """
    layers = compressible_layers(model)
    for name, place, prefix in parametrization_entries(state_dict, "mask"):
        if position is not None and place != position:
            continue
        if name not in layers:
            raise ConfigError(f"the state_dict prunes a layer {name!r} that the model does not have")
        if pruning_mask_of(layers[name]) is None:
            check_position(layers[name], place, name)
            parametrize.register_parametrization(layers[name], "weight", PruningMask(state_dict[prefix + "mask"]))
    return model
