"""Weight sharing as a torch parametrization: weight = codebook[indices].

The codebook is the trainable Parameter; the indices are a buffer, fixed while fine-tuning as in
Han et al. (2016). Autograd's backward of the gather sums the weight gradients per code, which
is exactly the paper's centroid gradient dL/dC_k = sum_ij dL/dW_ij * 1(I_ij = k).

Pruned layers reserve code 0 for exact zero: it is not a Parameter, so it never moves, and the
pruned positions stay exactly 0.0 through fine-tuning. A b-bit layer then has at most 2^b - 1
non-zero centroids plus the zero, so never more than 2^b distinct values. The encoder relies on
that code 0 for its filler zeros.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from deepshrink.errors import ConfigError
from deepshrink.layers import (
    Weight,
    as_weight,
    check_position,
    compressible_weights,
    match_per_layer,
    paper_default_bits,
    parametrization_entries,
    select_weights,
    weights_by_key,
)
from deepshrink.prune.module import pruning_mask_of
from deepshrink.quantize.kmeans import kmeans_1d, weighted_kmeans_1d

MAX_BITS = 16
SAMPLE_SIZE = 200_000


class _CodebookLookup(torch.autograd.Function):
    """`codebook[indices]` whose gradient is the paper's per-centroid sum, accumulated
    deterministically in float64.

    Autograd's own backward of indexing scatters with atomic adds across threads, so the same
    seed gave centroids that differed in the last bit from run to run (and different files);
    `bincount` sums serially, in a fixed order, and is 20x faster at LeNet-300-100's fc1.
    """

    @staticmethod
    def forward(context, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        # int32, the narrowest type index_select and bincount take: half of int64's memory.
        flat = indices.reshape(-1).to(torch.int32)
        context.save_for_backward(flat)
        context.codes = codebook.shape[0]
        return codebook.index_select(0, flat).view(indices.shape)

    @staticmethod
    def backward(context, gradient: torch.Tensor):
        (flat,) = context.saved_tensors
        sums = torch.bincount(flat, weights=gradient.reshape(-1).double(), minlength=context.codes)
        return sums.to(gradient.dtype), None


class SharedWeights(nn.Module):
    """The parametrization. Ignores the original weight; builds it from codebook and indices."""

    def __init__(self, codebook: torch.Tensor, indices: torch.Tensor, zero_code: bool) -> None:
        super().__init__()
        self.codebook = nn.Parameter(codebook.detach().clone().float())
        self.register_buffer("indices", indices.clone())
        self.register_buffer("zero_code", torch.tensor(bool(zero_code)))

    def full_codebook(self) -> torch.Tensor:
        """Every code's value: with a zero code, entry 0 is a constant 0.0 ahead of the Parameter.

        Returns:
            The codebook, with the zero entry where there is one.
        """
        if bool(self.zero_code):
            return torch.cat([self.codebook.new_zeros(1), self.codebook])
        return self.codebook

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight drawn from the codebook; each centroid's gradient sums its weights' gradients.

        Args:
            weight: the original weight (its dtype only).

        Returns:
            codebook[indices].
        """
        return _CodebookLookup.apply(self.full_codebook(), self.indices).to(weight.dtype)


def index_dtype(bits: int) -> torch.dtype:
    """The narrowest torch type that holds every code of a `bits`-bit codebook.

    Args:
        bits: the codebook's width.

    Returns:
        uint8, int16 or int32.
    """
    return torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32


NUMPY_INDEX_TYPES = {torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32}


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ConfigError(f"bits={bits!r} should be an integer from 1 to {MAX_BITS} (the paper uses 5 to 8)")


@dataclass(frozen=True)
class SharingRecord:
    """What sharing did to one layer: its codebook before fine-tuning, for plots and reports."""

    bits: int
    zero_code: bool
    initial_centroids: np.ndarray  # the k-means starting points
    centroids: np.ndarray  # the converged k-means codebook (non-zero codes)
    inertia: float
    sample: np.ndarray  # up to SAMPLE_SIZE of the shared weights before sharing, for plots


def share_layer_weights(
    layer: Weight | nn.Module,
    bits: int,
    init: str = "linear",
    *,
    seed: int = 0,
    zero_code: bool | None = None,
    importance: torch.Tensor | None = None,
) -> SharingRecord:
    """Replace the weight `layer` (a Weight, or a Linear / convolution / Embedding module) by a
    codebook of at most 2^bits values plus indices.

    `zero_code` reserves code 0 for exact zero; the default reserves it when the layer has
    any zero weights (a pruned layer). A pruning parametrization on the layer is folded in:
    its zeros become code 0.

    Args:
        layer: a Weight or a single-weight module.
        bits: the codebook's width, 1 to MAX_BITS.
        init: the k-means initialisation.
        seed: the seed of k-means.
        zero_code: reserve code 0 for zero (default: when there are zeros).
        importance: a non-negative weight per entry, the weight's shape (e.g. the loss's Fisher
            diagonal): k-means then minimises the importance-weighted squared error
            (`weighted_kmeans_1d`). None: every weight counts alike, as in the paper.

    Returns:
        The SharingRecord.

    Raises:
        ConfigError: `bits` out of range, a parametrization other than a pruning mask, or an
            importance of another shape.
    """
    _check_bits(bits)
    layer = as_weight(layer)
    if layer.parametrizations():
        if pruning_mask_of(layer) is None:
            raise ConfigError(
                f"{layer.name!r} ({layer.kind}.{layer.tensor}) is already parametrized by something other than pruning"
            )
        layer.remove_parametrizations()
    weight = layer.value.detach()
    if importance is not None and tuple(importance.shape) != tuple(weight.shape):
        raise ConfigError(
            f"importance for {layer.name!r} has shape {tuple(importance.shape)}, and the weight {tuple(weight.shape)}"
        )
    values = weight.flatten().cpu().numpy()
    nonzero = values != 0
    if zero_code is None:
        zero_code = not bool(nonzero.all())
    # Codes in their narrowest type from the start (uint8 up to 8 bits): an int64 array of
    # VGG-16's fc6 alone would be 822 MB.
    numpy_type = NUMPY_INDEX_TYPES[index_dtype(bits)]
    indices = np.zeros(values.shape, dtype=numpy_type)
    clusters = 2**bits - 1 if zero_code else 2**bits
    shared = values[nonzero] if zero_code else values
    if clusters == 0 or shared.size == 0:
        centroids = np.zeros(0 if zero_code else 1)
        initial = centroids
        inertia = 0.0
    elif importance is not None:
        weights = importance.detach().flatten().double().cpu().numpy()
        weights = weights[nonzero] if zero_code else weights
        # A floor of a millionth of the mean: a run of weights the estimate gave no gradient (units
        # no example reached) still pulls its centroid, and a layer with none is clustered unweighted.
        floor = 1e-6 * max(float(weights.mean()), 1e-30)
        # From the paper's clustering, not from `init` itself: weighted Lloyd from a linear start
        # can stop at a worse optimum of its own objective than the unweighted one reaches, and
        # from the unweighted centroids it can only improve on them.
        unweighted = kmeans_1d(shared, clusters, init, seed=seed)
        result = weighted_kmeans_1d(shared, weights + floor, clusters, unweighted.centroids, seed=seed)
        result = replace(result, initial=unweighted.initial)
    else:
        result = kmeans_1d(shared, clusters, init, seed=seed)
    if clusters and shared.size:
        initial = result.initial
        centroids = result.centroids
        inertia = result.inertia
        if zero_code:
            indices[nonzero] = result.labels.astype(numpy_type) + 1
        else:
            indices = result.labels.astype(numpy_type, copy=False)
    codebook = torch.from_numpy(centroids.astype(np.float32))
    codes = torch.from_numpy(indices).view(weight.shape)
    sharing = SharedWeights(codebook.to(weight.device), codes.to(weight.device), zero_code)
    layer.register(sharing, unsafe=True)
    if shared.size > SAMPLE_SIZE:
        shared = np.random.default_rng(seed).choice(shared, SAMPLE_SIZE, replace=False)
    return SharingRecord(
        bits, bool(zero_code), np.asarray(initial, dtype=np.float64), centroids, inertia, np.sort(shared)
    )


def default_bits(layers: Mapping[str, Weight]) -> dict[str, int]:
    """The paper's defaults: 8 bits for convolutions, 5 for fully connected layers.

    Args:
        layers: {name: Weight}.

    Returns:
        {name: bits}.
    """
    return {name: paper_default_bits(layer) for name, layer in layers.items()}


# Codebook widths the posterior may choose: 1 bit is the narrowest codebook; past 8 bits a
# codebook's centroids outnumber what a layer's posterior resolves in any measured case, and the
# tables grow with 2^bits.
POSTERIOR_BITS_RANGE = (1, 8)


def posterior_bits(layers: Mapping[str, Weight], posterior: Mapping[str, Mapping[str, float]]) -> dict[str, int]:
    """Each layer's width from its posterior (Louizos et al. 2017, Section 5, for a codebook):
    the most bits whose evenly spaced codebook over the layer's kept weights, span / 2^bits
    apart, is no finer than their mean posterior standard deviation sigma, i.e.
    floor(log2(span / sigma)) within POSTERIOR_BITS_RANGE. Finer centroids would encode digits
    the data never pinned down. A layer without a posterior (not under variational dropout) gets
    the paper's default.

    Args:
        layers: {name: Weight}: the layers to share.
        posterior: {name: {"sigma": ..., "span": ...}} (`prune.variational.posterior_resolution`).

    Returns:
        {name: bits}.
    """
    low, high = POSTERIOR_BITS_RANGE
    chosen = {}
    for name, layer in layers.items():
        entry = posterior.get(name)
        if entry is None or not entry["sigma"] > 0:
            chosen[name] = paper_default_bits(layer)
            continue
        ratio = entry["span"] / entry["sigma"]
        if not ratio > 0:  # one kept value, all equal, or a span too small to tell from zero
            chosen[name] = low
        elif not math.isfinite(ratio):
            chosen[name] = high
        else:
            chosen[name] = min(max(math.floor(math.log2(ratio)), low), high)
    return chosen


def share_weights(
    model: nn.Module,
    bits: Mapping[str, int] | None = None,
    init: str = "linear",
    *,
    seed: int = 0,
    importance: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, SharingRecord]:
    """Share the weights of the layers matched by `bits` ({glob: bits}); all layers at the paper's
    defaults when `bits` is None. Returns what was done to each layer.

    Args:
        model: the model, changed in place.
        bits: {layer glob: bits}, or None.
        init: the k-means initialisation.
        seed: the seed of k-means.
        importance: {weight name: per-entry importance} for importance-weighted k-means (see
            `share_layer_weights`); a layer it does not name is clustered unweighted.

    Returns:
        {weight name: SharingRecord}.

    Raises:
        ConfigError: a glob matches nothing, or a width is out of range.
    """
    if bits is None:
        layers = compressible_weights(model)
        resolved = default_bits(layers)
    else:
        layers = select_weights(model, list(bits))
        resolved = match_per_layer(layers, dict(bits), "bits")
    importance = importance or {}
    return {
        name: share_layer_weights(layer, int(resolved[name]), init, seed=seed, importance=importance.get(name))
        for name, layer in layers.items()
    }


def sharing_of(weight: Weight | nn.Module) -> SharedWeights | None:
    """The weight's SharedWeights parametrization, if it has one.

    Args:
        weight: a Weight or a single-weight module.

    Returns:
        The SharedWeights, or None.
    """
    return next((item for item in as_weight(weight).parametrizations() if isinstance(item, SharedWeights)), None)


def remove_sharing(model: nn.Module) -> nn.Module:
    """Make sharing permanent: plain weights holding the codebook values (and exact zeros).

    Args:
        model: changed in place.

    Returns:
        `model`.
    """
    for weight in compressible_weights(model).values():
        if sharing_of(weight) is not None:
            weight.remove_parametrizations()
    return model


def restore_sharing(model: nn.Module, state_dict: Mapping[str, torch.Tensor], position: int | None = None) -> nn.Module:
    """Register the sharing that a weight-shared model's state_dict holds, so loading then fits.

    Args:
        model: the model, changed in place.
        state_dict: the state_dict to be loaded.
        position: restore only the sharing at that place in its layer's parametrization list
            (see prune.module.restore_pruning).

    Returns:
        `model`.

    Raises:
        ConfigError: a layer the model does not have, a codebook without its indices, or an
            entry out of order.
    """
    weights = weights_by_key(model)
    for key, place, prefix in parametrization_entries(state_dict, "codebook"):
        if position is not None and place != position:
            continue
        if key not in weights:
            raise ConfigError(f"the state_dict shares a weight {key!r} that the model does not have")
        indices, zero_code = state_dict.get(prefix + "indices"), state_dict.get(prefix + "zero_code")
        if indices is None or zero_code is None:
            raise ConfigError(f"the state_dict has a codebook for {key!r} but no indices or zero_code")
        if sharing_of(weights[key]) is None:
            check_position(weights[key], place)
            sharing = SharedWeights(state_dict[prefix + "codebook"], indices, bool(zero_code))
            weights[key].register(sharing, unsafe=True)
    return model


def distinct_values(weight: Weight | nn.Module) -> int:
    """How many distinct values the weight holds (at most 2^bits when shared).

    Args:
        weight: a Weight or a single-weight module.

    Returns:
        The count.
    """
    return int(torch.unique(as_weight(weight).value.detach()).numel())
