"""Choosing the layers a stage works on: by name pattern, among the supported layer types."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

import torch
from torch import nn

from deepshrink.errors import ConfigError, UnsupportedLayerError

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


# The paper's widths, for both the codebook bits and the relative index bits: 8 for
# convolutions, 5 for fully connected layers (Han et al. 2016, Section 3 and Tables 2-3).
PAPER_CONV_BITS = 8
PAPER_FC_BITS = 5


def paper_default_bits(layer: nn.Module) -> int:
    """The paper's default width for `layer`: 8 bits for convolutions, 5 for the others."""
    return PAPER_CONV_BITS if isinstance(layer, nn.Conv1d | nn.Conv2d) else PAPER_FC_BITS


def matching(pattern: str, names: Iterable[str]) -> list[str]:
    """The names the glob `pattern` matches, in order; case-sensitive, as layer names are."""
    return [name for name in names if fnmatch.fnmatchcase(name, pattern)]


def compressible_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear, Conv1d, Conv2d and Embedding layer of `model`, by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SUPPORTED_LAYERS)}


def select_layers(model: nn.Module, patterns: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """The supported layers whose names match any of the glob `patterns` (all when None).

    A pattern that matches no supported layer is an error naming it and the layers there are,
    since a typo would otherwise silently leave a layer uncompressed.
    """
    layers = compressible_layers(model)
    if patterns is None:
        return layers
    patterns = list(patterns)
    all_modules = dict(model.named_modules())
    selected: dict[str, nn.Module] = {}
    for pattern in patterns:
        matches = matching(pattern, layers)
        if not matches:
            unsupported = [name for name in matching(pattern, all_modules) if name]
            if unsupported:
                kinds = ", ".join(f"{name} ({type(all_modules[name]).__name__})" for name in unsupported[:5])
                raise UnsupportedLayerError(
                    f"layer pattern {pattern!r} matches only unsupported layers: {kinds}; "
                    "supported types are Linear, Conv1d, Conv2d and Embedding"
                )
            raise ConfigError(f"layer pattern {pattern!r} matches no layer; the layers are {', '.join(layers)}")
        for name in matches:
            selected[name] = layers[name]
    return {name: selected[name] for name in layers if name in selected}


def match_per_layer(layers: Iterable[str], values: dict[str, float], what: str) -> dict[str, float]:
    """Resolve {glob pattern: value} into {layer name: value}; a later pattern wins over an earlier one."""
    layers = list(layers)
    resolved: dict[str, float] = {}
    for pattern, value in values.items():
        matches = matching(pattern, layers)
        if not matches:
            raise ConfigError(f"{what} pattern {pattern!r} matches no layer; the layers are {', '.join(layers)}")
        for name in matches:
            resolved[name] = value
    return resolved


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict a model without parametrizations would have, holding the effective values.

    `X.parametrizations.weight.original` becomes `X.weight` (the pruned or shared weight as the
    layer computes with it); the parametrizations' own entries are dropped. Never build this by
    deep-copying a model and removing parametrizations from the copy: the copy shares the
    original's dynamically created class, so removing them from one breaks the other.
    """
    state = {}
    parametrized_prefix = ".parametrizations."
    for key, value in model.state_dict().items():
        if parametrized_prefix not in key:
            state[key] = value
            continue
        owner, _, rest = key.partition(parametrized_prefix)
        tensor_name, _, tail = rest.partition(".")
        if tail == "original":
            module = model.get_submodule(owner)
            state[f"{owner}.{tensor_name}" if owner else tensor_name] = getattr(module, tensor_name).detach()
    return state


# A parametrized weight's entries in a state_dict: LAYER.parametrizations.weight.POSITION.FIELD,
# POSITION being the parametrization's place in the layer's list (torch.nn.utils.parametrize).
_PARAMETRIZED = re.compile(r"^(?P<layer>.+)\.parametrizations\.weight\.(?P<position>\d+)\.(?P<field>[^.]+)$")


def parametrization_entries(state_dict, field: str) -> list[tuple[str, int, str]]:
    """(layer name, position, key prefix) of every parametrization entry named `field` (e.g.
    "mask", "codebook"), in state_dict order; the prefix + another field name is that
    parametrization's other entry."""
    entries = []
    for key in state_dict:
        found = _PARAMETRIZED.match(key)
        if found and found["field"] == field:
            entries.append((found["layer"], int(found["position"]), key[: -len(field)]))
    return entries


def check_position(layer: nn.Module, position: int, name: str) -> None:
    """A parametrization saved at `position` of `name`'s list is registered there: the ones before
    it must be restored first."""
    from torch.nn.utils import parametrize

    registered = len(layer.parametrizations.weight) if parametrize.is_parametrized(layer, "weight") else 0
    if registered != position:
        raise ConfigError(
            f"the state_dict holds parametrization {position} of {name!r}, but {registered} are registered: "
            "restore them in order (checkpoint.load_state_into does)"
        )
