"""Low-rank factorization by truncated SVD, with per-layer ranks chosen under a MAC budget.

A Linear layer W (m x k) becomes two: k -> t (S^1/2 V^T) then t -> m (U S^1/2, the bias kept),
storing mt + tk weights instead of mk (plus t when S is kept apart: the lecture's mt + t + tk).
A convolution W (N, C, X, Y) is first matricized, one of two ways:
- "tai" (Tai et al. 2016): (C*X) x (Y*N), giving a vertical X x 1 conv to t channels, then a
  horizontal 1 x Y conv to N;
- "zhang" (Zhang et al. 2016): (C*X*Y) x N, giving an X x Y conv to t channels, then a 1 x 1.

Rank selection under a budget on the network's multiply-accumulates (MACs):
- CPTV: one fraction beta of the squared singular values kept in every layer, beta the largest
  that meets the budget;
- POS (Zhang et al. 2017): maximise prod_i sum_j m_ij sigma_ij^2 (the product of the kept
  energies) under the budget; solved exactly by dynamic programming over the budget;
- relaxed (lowrank/relaxed.py): masks on the singular values descended on the training loss.
A layer whose factorization would cost as much as the layer itself stays dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deepshrink.errors import ConfigError, UnsupportedLayerError
from deepshrink.inputs import Inputs, call, take

SCHEMES = ("zhang", "tai")


@dataclass
class LayerSpectrum:
    """One layer's SVD and what each rank would cost."""

    name: str
    layer: nn.Module
    left: torch.Tensor  # U, (m, r)
    singular_values: torch.Tensor  # S, (r,), descending
    right: torch.Tensor  # V^T, (r, k)
    dense_macs: int
    dense_parameters: int
    first_positions: int = 1  # output positions of the first factor (conv: spatial, per example)
    second_positions: int = 1
    scheme: str = "linear"

    @property
    def full_rank(self) -> int:
        """The number of singular values: min(m, k)."""
        return len(self.singular_values)

    @property
    def energy(self) -> np.ndarray:
        """Squared singular values, descending."""
        return self.singular_values.double().square().numpy()

    def factored_parameters(self, rank: int) -> int:
        """The two factors' parameters at `rank`.

        Args:
            rank: the rank.

        Returns:
            rank x (m + k).
        """
        rows, columns = self.left.shape[0], self.right.shape[1]
        return rank * (rows + columns)

    def factored_macs(self, rank: int) -> int:
        """The two factors' multiply-accumulates per example at `rank`.

        Args:
            rank: the rank.

        Returns:
            The MACs, by the layer's scheme (a 1x1 second factor, or Tai's vertical + horizontal pair).
        """
        rows, columns = self.left.shape[0], self.right.shape[1]
        if self.scheme == "tai":  # vertical conv: (C*X) per output, horizontal: (Y*N) per output
            return rank * columns * self.first_positions + rank * rows * self.second_positions
        return rank * (rows + columns) * self.first_positions

    def macs(self, rank: int | None) -> int:
        """MACs at `rank`; None (or a rank that saves nothing) means the dense layer.

        Args:
            rank: the rank, or None.

        Returns:
            The MACs per example.
        """
        if rank is None or self.factored_macs(rank) >= self.dense_macs:
            return self.dense_macs
        return self.factored_macs(rank)

    @property
    def break_even(self) -> int:
        """The smallest rank at which factorizing saves nothing."""
        per_rank = self.factored_macs(1)
        return min(self.full_rank, math.ceil(self.dense_macs / per_rank)) if per_rank else self.full_rank


@dataclass
class RankChoice:
    """Ranks per layer (None = kept dense) and the resulting cost."""

    method: str
    ranks: dict[str, int | None]
    macs: int
    dense_macs: int
    beta: float | None = None  # CPTV: the energy fraction every layer keeps
    # The relaxation: which singular triplets each layer keeps (None: the largest `rank`), every
    # candidate's scores, what was scored, and the winner's label.
    components: dict[str, np.ndarray] | None = None
    candidates: list[dict] | None = None
    criterion: str | None = None
    winner: str | None = None

    @property
    def mac_fraction(self) -> float:
        """The share of the dense MACs the chosen ranks keep."""
        return self.macs / self.dense_macs


def storage(rows: int, columns: int, rank: int) -> int:
    """The lecture's storage of a rank-t SVD of an m x k matrix: mt + t + tk.

    Args:
        rows: m.
        columns: k.
        rank: t.

    Returns:
        The values stored.
    """
    return rows * rank + rank + rank * columns


def compression_rate(rows: int, columns: int, rank: int) -> float:
    """The lecture's compression rate mk / (t (m + k + 1)).

    Args:
        rows: m.
        columns: k.
        rank: t.

    Returns:
        The rate.
    """
    return rows * columns / (rank * (rows + columns + 1))


def _matrix(layer: nn.Module, scheme: str) -> torch.Tensor:
    weight = layer.weight.detach().double()
    if isinstance(layer, nn.Linear):
        return weight  # (out, in): rows m = out, columns k = in
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1:
        raise UnsupportedLayerError(f"low-rank factorization supports Linear and Conv2d with groups=1, not {layer}")
    out_channels, in_channels, height, width = weight.shape
    if scheme == "zhang":  # (N) x (C*X*Y): rows are output channels
        return weight.reshape(out_channels, in_channels * height * width)
    # tai: rows indexed by (y, n), columns by (c, x): the horizontal factor is the "left" one
    return weight.permute(3, 0, 1, 2).reshape(width * out_channels, in_channels * height)


def layer_spectra(
    model: nn.Module, example_input: Inputs, scheme: str = "zhang", layers: list[str] | None = None
) -> dict[str, LayerSpectrum]:
    """SVD of every Linear / Conv2d layer (or those named) with its MAC costs per rank.

    Args:
        model: the model.
        example_input: one batch's inputs (a tensor, or a tuple or dict of them), to size each
            layer's outputs.
        scheme: how convolutions factor: "zhang" (k x k then 1x1) or "tai" (vertical then horizontal).
        layers: the layers' names (default: all).

    Returns:
        {layer name: LayerSpectrum}. A layer holding a tied weight is left out: factoring it
        would give it a matrix of its own, and the tie would be gone. So is a layer whose weight
        the module around it reads as a tensor (a MultiheadAttention's out_proj, a Transformer
        layer's linear1 on its fast path: two factors in its place would never be called), one
        the example never reaches, and, unless named, a grouped convolution.

    Raises:
        ConfigError: an unknown scheme.
    """
    from deepshrink.layers import called_by_its_parents, tied_modules

    if scheme not in SCHEMES:
        raise ConfigError(f"scheme={scheme!r} should be one of {', '.join(SCHEMES)}")
    tied = tied_modules(model)
    chosen = {
        name: layer
        for name, layer in model.named_modules()
        if isinstance(layer, nn.Linear | nn.Conv2d)
        and (layers is None or name in layers)
        and name not in tied
        and called_by_its_parents(model, name)
        # A grouped convolution (MobileNet's depthwise ones) has no one matrix to factor; one
        # named in `layers` stays, and its factorization says so.
        and (layers is not None or not (isinstance(layer, nn.Conv2d) and layer.groups != 1))
    }
    shapes: dict[str, tuple] = {}
    handles = [
        layer.register_forward_hook(
            lambda module, inputs, output, name=name: shapes.__setitem__(name, (inputs[0].shape, output.shape))
        )
        for name, layer in chosen.items()
    ]
    try:
        with torch.no_grad():
            call(model, take(example_input, slice(0, 1)))
    finally:
        for handle in handles:
            handle.remove()
    spectra = {}
    for name, layer in chosen.items():
        if name not in shapes:  # the example never reached it: nothing to size its arithmetic by
            continue
        matrix = _matrix(layer, scheme)
        left, singular, right = torch.linalg.svd(matrix, full_matrices=False)
        input_shape, output_shape = shapes[name]
        if isinstance(layer, nn.Linear):
            positions = output_shape.numel() // output_shape[-1]
            spectrum = LayerSpectrum(
                name, layer, left, singular, right, matrix.numel() * positions, matrix.numel(), positions, positions
            )
        else:
            out_positions = output_shape[2] * output_shape[3]
            macs = layer.weight.numel() * out_positions
            if scheme == "zhang":
                spectrum = LayerSpectrum(
                    name, layer, left, singular, right, macs, layer.weight.numel(), out_positions, out_positions, scheme
                )
            else:  # the vertical factor keeps the input's full (unstrided) width
                vertical_positions = output_shape[2] * input_shape[3]
                spectrum = LayerSpectrum(
                    name,
                    layer,
                    left,
                    singular,
                    right,
                    macs,
                    layer.weight.numel(),
                    vertical_positions,
                    out_positions,
                    scheme,
                )
        spectra[name] = spectrum
    return spectra


def _total(spectra: dict[str, LayerSpectrum], ranks: dict[str, int | None]) -> int:
    return sum(spectrum.macs(ranks[name]) for name, spectrum in spectra.items())


def _dense_total(spectra: dict[str, LayerSpectrum]) -> int:
    return sum(spectrum.dense_macs for spectrum in spectra.values())


def _check_budget(budget: float) -> None:
    if not 0 < budget <= 1:
        raise ConfigError(f"budget={budget!r} should be a fraction of the original MACs in (0, 1], e.g. 0.5")


def _normalized(ranks: dict[str, int | None], spectra: dict[str, LayerSpectrum]) -> dict[str, int | None]:
    """A rank that saves nothing means the dense layer."""
    return {
        name: None if rank is None or spectra[name].factored_macs(rank) >= spectra[name].dense_macs else rank
        for name, rank in ranks.items()
    }


def cptv_ranks(spectra: dict[str, LayerSpectrum], beta: float) -> dict[str, int | None]:
    """Per layer, the smallest rank keeping `beta` of the squared singular values.

    Args:
        spectra: from layer_spectra.
        beta: the energy fraction, in [0, 1].

    Returns:
        {layer name: rank, or None where factoring saves nothing}.
    """
    ranks = {}
    for name, spectrum in spectra.items():
        cumulative = np.cumsum(spectrum.energy)
        ranks[name] = int(np.searchsorted(cumulative, beta * cumulative[-1] * (1 - 1e-12)) + 1)
    return _normalized(ranks, spectra)


def select_cptv(spectra: dict[str, LayerSpectrum], budget: float) -> RankChoice:
    """CPTV: the largest energy fraction beta, the same in every layer, that meets the MAC budget.

    Args:
        spectra: from layer_spectra.
        budget: the fraction of the dense MACs allowed, in (0, 1].

    Returns:
        The RankChoice.

    Raises:
        ConfigError: `budget` out of range.
    """
    _check_budget(budget)
    dense = _dense_total(spectra)
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if _total(spectra, cptv_ranks(spectra, middle)) <= budget * dense:
            low = middle
        else:
            high = middle
    ranks = cptv_ranks(spectra, low)
    return RankChoice("CPTV", ranks, _total(spectra, ranks), dense, beta=low)


def select_pos(spectra: dict[str, LayerSpectrum], budget: float, resolution: int = 4000) -> RankChoice:
    """POS: the ranks maximising the product of kept energies under the MAC budget.

    Solved exactly as a multiple-choice knapsack by dynamic programming over the budget in
    `resolution` steps (each layer's cost rounded up, so the budget always holds), rather than
    greedily: a greedy pass cannot weigh a layer's jump from dense to its break-even rank.

    Args:
        spectra: from layer_spectra.
        budget: the fraction of the dense MACs allowed, in (0, 1].
        resolution: the budget's steps.

    Returns:
        The RankChoice.

    Raises:
        ConfigError: `budget` out of range, or unreachable even at rank 1 everywhere.
    """
    _check_budget(budget)
    dense = _dense_total(spectra)
    limit = budget * dense
    unit = limit / resolution
    names = list(spectra)
    # best[b]: the largest sum of log kept energies over the layers so far within b budget steps.
    best = np.zeros(resolution + 1)
    choices = []
    for name in names:
        spectrum = spectra[name]
        cumulative = np.cumsum(spectrum.energy)
        options = [(None, spectrum.dense_macs, math.log(cumulative[-1]))] + [
            (rank, spectrum.factored_macs(rank), math.log(max(cumulative[rank - 1], 1e-300)))
            for rank in range(1, spectrum.break_even)
        ]
        updated = np.full(resolution + 1, -np.inf)
        picked = np.full(resolution + 1, -1, dtype=np.int64)
        for index, (_, macs, value) in enumerate(options):
            steps = math.ceil(macs / unit - 1e-9)
            if steps > resolution:
                continue
            candidate = np.full(resolution + 1, -np.inf)
            candidate[steps:] = best[: resolution + 1 - steps] + value
            better = candidate > updated
            updated[better] = candidate[better]
            picked[better] = index
        best = updated
        choices.append((options, picked))
    if not np.isfinite(best[resolution]):
        # The least each layer can cost: rank 1, or dense where rank 1 costs more (a thin layer).
        least = sum(min(spectrum.dense_macs, spectrum.factored_macs(1)) for spectrum in spectra.values()) / dense
        raise ConfigError(
            f"a budget of {budget} of the MACs cannot be met even at rank 1 everywhere: the layers low-rank can "
            f"factor ({len(spectra)}) cost at least {least:.3g} of their MACs; give a budget above that"
        )
    ranks: dict[str, int | None] = {}
    remaining = resolution
    for name, (options, picked) in zip(reversed(names), reversed(choices), strict=True):
        rank, macs, _ = options[picked[remaining]]
        ranks[name] = rank
        remaining -= math.ceil(macs / unit - 1e-9)
    ranks = {name: ranks[name] for name in names}
    return RankChoice("POS", _normalized(ranks, spectra), _total(spectra, ranks), dense)


def factored_modules(layer: nn.Module, rank: int, scheme: str) -> nn.Sequential:
    """The two layers that replace `layer` at `rank`, with their shapes only (weights unset).

    Args:
        layer: a Linear or Conv2d.
        rank: the rank.
        scheme: "zhang" or "tai" for a convolution.

    Returns:
        The nn.Sequential of the two layers.
    """
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        return nn.Sequential(
            nn.Linear(layer.in_features, rank, bias=False), nn.Linear(rank, layer.out_features, bias=bias)
        )
    out_channels, in_channels, height, width = layer.weight.shape
    if scheme == "zhang":
        return nn.Sequential(
            nn.Conv2d(in_channels, rank, (height, width), layer.stride, layer.padding, layer.dilation, bias=False),
            nn.Conv2d(rank, out_channels, 1, bias=bias),
        )
    stride, padding, dilation = layer.stride, layer.padding, layer.dilation
    return nn.Sequential(
        nn.Conv2d(in_channels, rank, (height, 1), (stride[0], 1), (padding[0], 0), (dilation[0], 1), bias=False),
        nn.Conv2d(rank, out_channels, (1, width), (1, stride[1]), (0, padding[1]), (1, dilation[1]), bias=bias),
    )


def factorized_layer(spectrum: LayerSpectrum, rank: int, components=None) -> nn.Sequential:
    """The two layers replacing `spectrum.layer` at `rank` (singular values split as sqrt into both).

    `components` picks which singular triplets to keep (default: the `rank` largest).

    Args:
        spectrum: the layer's SVD.
        rank: the rank (ignored when `components` is given).
        components: the indices of the singular triplets to keep.

    Returns:
        The nn.Sequential of the two layers, weights set.
    """
    layer = spectrum.layer
    keep = torch.arange(rank) if components is None else torch.as_tensor(components, dtype=torch.long)
    rank = len(keep)
    scale = spectrum.singular_values[keep].sqrt()
    left = (spectrum.left[:, keep] * scale).float()  # (m, t)
    right = (scale[:, None] * spectrum.right[keep]).float()  # (t, k)
    scheme = "zhang" if spectrum.scheme == "linear" else spectrum.scheme
    factors = factored_modules(layer, rank, scheme)
    first, second = factors
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            first.weight.copy_(right)
            second.weight.copy_(left)
        elif scheme == "zhang":
            first.weight.copy_(right.reshape(first.weight.shape))
            second.weight.copy_(left.reshape(second.weight.shape))
        else:  # tai: columns were (c, x), rows (y, n)
            out_channels, _, _, width = layer.weight.shape
            first.weight.copy_(right.reshape(first.weight.shape))
            second.weight.copy_(left.reshape(width, out_channels, rank).permute(1, 2, 0).unsqueeze(2))
        if layer.bias is not None:
            second.bias.copy_(layer.bias.detach())
    return factors.to(layer.weight.device)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def structure_of(choice_ranks: dict[str, int | None], scheme: str) -> dict:
    """The checkpoint / file metadata that lets a loader rebuild the factored architecture.

    Args:
        choice_ranks: {layer name: rank or None}.
        scheme: the convolutions' scheme.

    Returns:
        {"scheme", "ranks"} (the factored layers only).
    """
    return {"scheme": scheme, "ranks": {name: rank for name, rank in choice_ranks.items() if rank is not None}}


def apply_structure(model: nn.Module, structure: dict | None) -> nn.Module:
    """Rebuild a factored architecture (shapes only) from `structure_of` metadata, in place.

    Args:
        model: the dense model, changed in place.
        structure: the metadata, or None.

    Returns:
        `model`.

    Raises:
        ConfigError: the metadata is malformed, or names a layer or rank this model cannot take.
    """
    if not structure:
        return model
    if not isinstance(structure, dict) or structure.get("scheme") not in SCHEMES:
        raise ConfigError(f"low-rank metadata {structure!r} is malformed; it needs a scheme and ranks")
    ranks = structure.get("ranks")
    if not isinstance(ranks, dict):
        raise ConfigError(f"low-rank metadata ranks {ranks!r} should map layer names to ranks")
    modules = dict(model.named_modules())
    for name, rank in ranks.items():
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear | nn.Conv2d) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"low-rank metadata names layer {name!r} at rank {rank!r}, which this model cannot take")
        # Checked before building: a rank above the matrix's smaller side is never a factorisation,
        # and a file could otherwise make us allocate factors of any size.
        rows, columns = layer.weight.shape[0], layer.weight[0].numel()
        if rank > min(rows, columns):
            raise ConfigError(
                f"low-rank metadata gives layer {name!r} rank {rank}, above its {rows} x {columns} weight's "
                f"largest possible rank {min(rows, columns)}"
            )
        _replace(model, name, factored_modules(layer, rank, structure["scheme"]))
    return model


def factorize(
    model: nn.Module,
    spectra: dict[str, LayerSpectrum],
    ranks: dict[str, int | None],
    components: dict[str, np.ndarray] | None = None,
) -> nn.Module:
    """Replace each layer with a rank in `ranks` by its two factors, in place.

    Args:
        model: the model, changed in place.
        spectra: from layer_spectra.
        ranks: {layer name: rank or None}.
        components: {layer name: the singular triplets to keep}.

    Returns:
        `model`.
    """
    for name, rank in ranks.items():
        if rank is not None:
            _replace(model, name, factorized_layer(spectra[name], rank, (components or {}).get(name)))
    return model


def _unmatricize(matrix: torch.Tensor, shape: torch.Size, scheme: str) -> torch.Tensor:
    """The inverse of _matrix: a layer weight from its (possibly low-rank) matrix."""
    if len(shape) == 2:
        return matrix
    out_channels, in_channels, height, width = shape
    if scheme == "zhang":
        return matrix.reshape(shape)
    return matrix.reshape(width, out_channels, in_channels, height).permute(1, 2, 3, 0)


def parameter_count(model: nn.Module) -> int:
    """All of the model's parameters, counted.

    Args:
        model: the model.

    Returns:
        The count.
    """
    return sum(parameter.numel() for parameter in model.parameters())
