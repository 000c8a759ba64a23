"""BatchNorm folding: a BatchNorm that directly follows a convolution or linear layer is merged
into that layer's weight and bias, so that weight sharing acts on the weights the network really
applies and the file holds them, with no BatchNorm left to store or run.

The pipeline folds after pruning and before weight sharing (`batchnorm: fold`, the default):
retraining a pruned network went better with its BatchNorm frozen in place (eval mode, its
scale and shift still training) than with it folded away, on every setting we measured, and
scaling a pruned weight's rows keeps its zeros where they are.

In eval mode BatchNorm computes gamma * (y - mean) / sqrt(var + eps) + beta per channel, which
is affine in y = W x + b; so W' = W * s and b' = (b - mean) * s + beta with s = gamma /
sqrt(var + eps) give the same outputs with one layer fewer. Folding is only exact for a
BatchNorm whose input is nothing but that layer's output, so pairs are found in the traced
graph (torch.fx) where the model can be traced, else among neighbours in an nn.Sequential.

A folded model has an nn.Identity where each BatchNorm was and a bias on each folded layer;
the pairs are recorded in a file's metadata (`FOLDED_KEY`) so that loading rebuilds that
shape in a fresh copy of the user's model before any tensor is read.
"""

from __future__ import annotations

import torch
from torch import nn

from deepshrink.errors import ConfigError

FOLDED_KEY = "batchnorm_folded"
FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# No real network has more; a file cannot make us walk an unbounded list.
MAX_PAIRS = 100_000


def _channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _fits(layer: nn.Module, batchnorm: nn.Module) -> bool:
    """A layer and a BatchNorm that can merge: matching kinds and channel counts, a weight that
    is its own or only pruned, and a BatchNorm that normalises with stored statistics (the only
    kind that is affine)."""
    from deepshrink.prune.module import only_pruned

    if not isinstance(layer, FOLDABLE) or not isinstance(batchnorm, BATCHNORMS) or not only_pruned(layer):
        return False
    if not batchnorm.track_running_stats or batchnorm.running_mean is None:
        return False
    return _channels(layer) == batchnorm.num_features


def _traced_pairs(model: nn.Module) -> list[tuple[str, str]] | None:
    """Pairs from the traced graph, or None when the model cannot be traced symbolically."""
    import torch.fx

    from deepshrink.graph import trace

    traced = trace(model)
    if traced is None:
        return None
    modules, calls = dict(model.named_modules()), traced.calls
    pairs = []
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), BATCHNORMS):
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            continue
        source = node.args[0]
        if source.op != "call_module" or len(source.users) != 1:
            continue
        # A module called twice shares its weights between two places: folding one would break the other.
        if calls[source.target] != 1 or calls[node.target] != 1:
            continue
        if _fits(modules[source.target], modules[node.target]):
            pairs.append((source.target, node.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Pairs of neighbours inside nn.Sequential containers (a layer, then its BatchNorm)."""
    pairs = []
    for prefix, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.named_children())
        for (first_name, first), (second_name, second) in zip(children, children[1:], strict=False):
            if _fits(first, second):
                join = f"{prefix}." if prefix else ""
                pairs.append((join + first_name, join + second_name))
    return pairs


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, BatchNorm) module names where the BatchNorm's input is only that layer's output.

    Args:
        model: the model; traced with torch.fx where it can be, else its nn.Sequential neighbours.

    Returns:
        The (layer name, BatchNorm name) pairs; a layer holding a tied weight is left out (its
        other holders would be rescaled too).
    """
    from deepshrink.layers import tied_modules

    traced = _traced_pairs(model)
    pairs = traced if traced is not None else _sequential_pairs(model)
    tied = tied_modules(model)
    return [(layer, batchnorm) for layer, batchnorm in pairs if layer not in tied]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, pairs: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Fold each BatchNorm of `pairs` (default: every foldable pair) into the layer before it.

    In place; the BatchNorm becomes nn.Identity. Outputs in eval mode stay the same (within float
    rounding).

    Args:
        model: the model, changed in place.
        pairs: (layer name, BatchNorm name) pairs, default `foldable_pairs(model)`.

    Returns:
        The pairs folded, as [layer, batchnorm] lists, as recorded in a file's metadata.

    Raises:
        ConfigError: a pair's kinds or channel counts do not match.
    """
    pairs = foldable_pairs(model) if pairs is None else [tuple(pair) for pair in pairs]
    modules = dict(model.named_modules())
    for layer_name, batchnorm_name in pairs:
        layer, batchnorm = modules[layer_name], modules[batchnorm_name]
        if not _fits(layer, batchnorm):
            raise ConfigError(f"cannot fold {batchnorm_name} into {layer_name}: their kinds or channels differ")
        scale = batchnorm.running_var.double().add(batchnorm.eps).rsqrt()
        if batchnorm.affine:
            scale = scale * batchnorm.weight.double()
        shift = batchnorm.bias.double() if batchnorm.affine else torch.zeros_like(scale)
        bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
        weight_shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        # A pruned layer's mask multiplies its original weight: scaling the original's rows scales
        # the weight the layer applies, and keeps every pruned entry exactly zero.
        parametrizations = getattr(layer, "parametrizations", None)
        stored = parametrizations.weight.original if parametrizations is not None else layer.weight
        stored.copy_((stored.double() * scale.reshape(weight_shape)).to(stored.dtype))
        folded_bias = (bias - batchnorm.running_mean.double()) * scale + shift
        if layer.bias is None:
            layer.bias = nn.Parameter(folded_bias.to(layer.weight.dtype))
        else:
            layer.bias.copy_(folded_bias.to(layer.bias.dtype))
        _set_module(model, batchnorm_name, nn.Identity())
    return [list(pair) for pair in pairs]


def apply_folding(model: nn.Module, pairs: object, error: type[Exception] = ConfigError) -> nn.Module:
    """Give `model` a folded model's shape from recorded `pairs`.

    No values: a file's tensors fill them. Each BatchNorm becomes nn.Identity, each layer gets a
    bias. Pairs already folded in `model` are left as they are.

    Args:
        model: the unfolded model, changed in place.
        pairs: the pairs a file records (validated here: it comes from a file).
        error: the exception class for pairs `model` cannot take.

    Returns:
        `model`.

    Raises:
        error: `pairs` is malformed or names a pair the model cannot take.
    """
    if not pairs:
        return model
    if not isinstance(pairs, list) or len(pairs) > MAX_PAIRS:
        raise error(f"{FOLDED_KEY} should be a list of [layer, batchnorm] name pairs, not {str(pairs)[:80]!r}")
    modules = dict(model.named_modules())
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(name, str) for name in pair)):
            raise error(f"{FOLDED_KEY} entry {str(pair)[:80]!r} should be a [layer, batchnorm] pair of names")
        layer_name, batchnorm_name = pair
        layer, batchnorm = modules.get(layer_name), modules.get(batchnorm_name)
        if isinstance(layer, FOLDABLE) and isinstance(batchnorm, nn.Identity) and layer.bias is not None:
            continue  # already folded
        if not _fits(layer, batchnorm):
            raise error(
                f"the file folds BatchNorm {batchnorm_name!r} into {layer_name!r}, which this model cannot take; "
                "pass the model the file was made from (model=...)"
            )
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(_channels(layer), dtype=layer.weight.dtype))
        _set_module(model, batchnorm_name, nn.Identity())
    return model
