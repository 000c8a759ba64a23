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
  energies) under the budget; solved exactly by dynamic programming over the budget.
A layer whose factorization would cost as much as the layer itself stays dense.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deepshrink.errors import ConfigError, UnsupportedLayerError
from deepshrink.layers import compressible_layers
from deepshrink.train import TrainConfig, evaluate, fit

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
        return len(self.singular_values)

    @property
    def energy(self) -> np.ndarray:
        """Squared singular values, descending."""
        return self.singular_values.double().square().numpy()

    def factored_parameters(self, rank: int) -> int:
        rows, columns = self.left.shape[0], self.right.shape[1]
        return rank * (rows + columns)

    def factored_macs(self, rank: int) -> int:
        rows, columns = self.left.shape[0], self.right.shape[1]
        if self.scheme == "tai":  # vertical conv: (C*X) per output, horizontal: (Y*N) per output
            return rank * columns * self.first_positions + rank * rows * self.second_positions
        return rank * (rows + columns) * self.first_positions

    def macs(self, rank: int | None) -> int:
        """MACs at `rank`; None (or a rank that saves nothing) means the dense layer."""
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
        return self.macs / self.dense_macs


def storage(rows: int, columns: int, rank: int) -> int:
    """The lecture's storage of a rank-t SVD of an m x k matrix: mt + t + tk."""
    return rows * rank + rank + rank * columns


def compression_rate(rows: int, columns: int, rank: int) -> float:
    """The lecture's compression rate mk / (t (m + k + 1))."""
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
    model: nn.Module, example_input: torch.Tensor, scheme: str = "zhang", layers: list[str] | None = None
) -> dict[str, LayerSpectrum]:
    """SVD of every Linear / Conv2d layer (or those named) with its MAC costs per rank."""
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme={scheme!r} should be one of {', '.join(SCHEMES)}")
    chosen = {
        name: layer
        for name, layer in compressible_layers(model).items()
        if isinstance(layer, nn.Linear | nn.Conv2d) and (layers is None or name in layers)
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
            model(example_input[:1])
    finally:
        for handle in handles:
            handle.remove()
    spectra = {}
    for name, layer in chosen.items():
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
    """Per layer, the smallest rank keeping `beta` of the squared singular values."""
    ranks = {}
    for name, spectrum in spectra.items():
        cumulative = np.cumsum(spectrum.energy)
        ranks[name] = int(np.searchsorted(cumulative, beta * cumulative[-1] * (1 - 1e-12)) + 1)
    return _normalized(ranks, spectra)


def select_cptv(spectra: dict[str, LayerSpectrum], budget: float) -> RankChoice:
    """CPTV: the largest energy fraction beta, the same in every layer, that meets the MAC budget."""
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
        raise ConfigError(f"a budget of {budget} of the MACs cannot be met even at rank 1 everywhere")
    ranks: dict[str, int | None] = {}
    remaining = resolution
    for name, (options, picked) in zip(reversed(names), reversed(choices), strict=True):
        rank, macs, _ = options[picked[remaining]]
        ranks[name] = rank
        remaining -= math.ceil(macs / unit - 1e-9)
    ranks = {name: ranks[name] for name in names}
    return RankChoice("POS", _normalized(ranks, spectra), _total(spectra, ranks), dense)


def factored_modules(layer: nn.Module, rank: int, scheme: str) -> nn.Sequential:
    """The two layers that replace `layer` at `rank`, with their shapes only (weights unset)."""
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
    """The checkpoint / file metadata that lets a loader rebuild the factored architecture."""
    return {"scheme": scheme, "ranks": {name: rank for name, rank in choice_ranks.items() if rank is not None}}


def apply_structure(model: nn.Module, structure: dict | None) -> nn.Module:
    """Rebuild a factored architecture (shapes only) from `structure_of` metadata, in place."""
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
    """Replace each layer with a rank in `ranks` by its two factors, in place."""
    for name, rank in ranks.items():
        if rank is not None:
            _replace(model, name, factorized_layer(spectra[name], rank, (components or {}).get(name)))
    return model


# The relaxation's descents: one metric, or both with all their roundings as candidates.
PROJECTIONS = ("euclidean", "cost", "both")


def _project(masks: torch.Tensor, costs: torch.Tensor, limit: float, metric: str = "euclidean") -> torch.Tensor:
    """Projection onto {0 <= m <= 1, costs . m <= limit}, nearest in the `metric`.

    "euclidean": argmin |m - y|^2, which is clip(y - lambda costs): a component gives up mask in
    proportion to its cost. "cost": argmin sum_i c_i (m_i - y_i)^2, the norm in which a unit of
    mask is worth its MACs, which is clip(y - lambda): every component gives up the same amount.
    lambda, the budget's multiplier, by bisection.
    """
    clipped = masks.clamp(0, 1)
    if float(costs @ clipped) <= limit:
        return clipped
    step = costs if metric == "euclidean" else torch.ones_like(costs)
    low, high = 0.0, float((masks.max() + 1) / step.min())
    for _ in range(60):
        middle = (low + high) / 2
        if float(costs @ (masks - middle * step).clamp(0, 1)) > limit:
            low = middle
        else:
            high = middle
    return (masks - high * step).clamp(0, 1)


def select_relaxed(
    model: nn.Module,
    spectra: dict[str, LayerSpectrum],
    budget: float,
    loader,
    *,
    steps: int = 300,
    learning_rate: float = 0.05,
    rounding_points: int = 6,
    evaluation_batches: int = 8,
    validation=None,
    finetune=None,
    finetune_loaders: Callable[[int], Iterable] | None = None,
    selection_seeds: Sequence[int] = (1,),
    finetune_criterion: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    projection: str = "euclidean",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> RankChoice:
    """The masking-variable relaxation (COBLA, Li & Shi 2018) by projected gradient descent.

    Each layer's weight is U diag(m * S) V^T with masks m in [0, 1]; the training loss is
    minimised over the masks under the linear MAC budget sum_i c_i sum_j m_ij <= B (c_i a
    rank's cost in layer i), starting from all masks at one (projected). Masks are rounded at
    `rounding_points` points along the descent: the components with the largest masks are kept
    while the true budget allows, and a layer whose rounded rank saves nothing runs dense.

    `projection` "euclidean" is the plain projected gradient. Its projection, clip(m - lambda c),
    takes mask in proportion to a component's cost, so at tight budgets it zeroes the expensive
    layers before the gradient has a say (LeNet-5 at 0.2 of the MACs: conv2 rounded to rank 2 of
    50). "cost" descends in the metric sum c_i dm_i^2 instead: each step moves a mask by its
    gradient per MAC, and the projection takes the same amount from every component, as in a
    knapsack. It starts from a uniform cut and moves expensive components slowly, so at loose
    budgets it is still far from the optimum after `steps` steps. "both" runs the two descents
    and keeps all their roundings as candidates. The default stays "euclidean": with
    fine-tuning after, the cost metric's better roundings did not carry over to test accuracy,
    and twice the candidates gave the noisy selection more chances to pick badly
    (BENCHMARKS.md, "The relaxation with a cost-metric descent").

    The linear budget prices every layer as factored, so it cannot see that a small layer is
    cheaper left whole; the rounded candidates, together with the POS and CPTV choices for the
    same budget, are therefore scored by the training loss itself, on `evaluation_batches` fixed
    batches, and the lowest wins. The result is never worse on that loss than POS or CPTV.

    With a `validation` loader, each distinct candidate is instead factorized, fine-tuned by
    `finetune` (a TrainConfig; default one epoch of SGD at learning rate 0.01) once per seed in
    `selection_seeds`, on `finetune_loaders(seed)` (a function from a shuffling seed to a training
    loader; default `loader`, for a single seed only), and scored by its mean validation accuracy
    over those runs, ties going to the lower mean validation loss. `finetune_criterion` is the
    fine-tuning loss (train.fit's `criterion`; default cross-entropy): pass the final fine-tuning's,
    a distillation loss for instance. The network is fine-tuned after factorizing anyway, and the
    loss before fine-tuning misjudges which ranks fine-tune best.
    Accuracy rather than loss, because accuracy is what the fine-tuned network is judged by, and
    the two disagree: on LeNet-5 at 0.7 of the MACs a rounding had 5% less validation loss than
    CPTV after one epoch and ended 0.11 points behind it on test. Pass the same `finetune`
    schedule as the final fine-tuning, so that the score is the outcome being chosen for.

    Every candidate is fine-tuned with the same seeds, which pairs the comparison. More seeds
    average out the shuffles, which move one network's validation accuracy by 0.1-0.15 points on
    LeNet-300-100; they cannot average out the validation images. Two fine-tuned candidates
    disagree on 1-1.5% of them, so on 5,000 images their accuracy difference carries a sampling
    error of 0.13-0.17 points whatever the seeds, and five seeds did not choose better than one
    (BENCHMARKS.md, "Selection by the mean of five fine-tuning runs"). Where the candidates differ
    by less than that, as on LeNet-300-100 at 0.5-0.7 of the MACs, no validation score can tell
    which of them will be ahead on another set of images.

    `candidates` lists every candidate's scores, `criterion` what was scored.
    """
    from torch.func import functional_call
    from tqdm.auto import tqdm

    _check_budget(budget)
    if projection not in PROJECTIONS:
        raise ConfigError(f"projection={projection!r} should be one of {', '.join(PROJECTIONS)}")
    selection_seeds = list(selection_seeds)
    if not selection_seeds:
        raise ConfigError("selection_seeds is empty; give at least one shuffling seed, e.g. (1,)")
    if finetune_loaders is None:
        if len(selection_seeds) > 1:
            raise ConfigError(
                f"selection_seeds={selection_seeds} asks for {len(selection_seeds)} fine-tuning runs per candidate "
                "but finetune_loaders is not given; pass a function from a seed to a shuffled training loader"
            )
        finetune_loaders = lambda seed: loader  # noqa: E731
    if steps < 1 or rounding_points < 1 or evaluation_batches < 1:
        raise ConfigError(
            f"steps={steps}, rounding_points={rounding_points} and evaluation_batches={evaluation_batches} "
            "should all be at least 1"
        )
    dense = _dense_total(spectra)
    names = list(spectra)
    pieces = [spectra[name].full_rank for name in names]
    costs_all = torch.cat(
        [
            torch.full((spectra[name].full_rank,), float(spectra[name].factored_macs(1)), dtype=torch.float64)
            for name in names
        ]
    )
    # The linear budget counts every layer as factored; a layer later found cheaper dense only saves more.
    limit = budget * dense
    factors = {
        name: (
            spectra[name].left.float().to(device),
            spectra[name].singular_values.float().to(device),
            spectra[name].right.float().to(device),
        )
        for name in names
    }
    shapes = {name: spectra[name].layer.weight.shape for name in names}
    model = model.to(device).eval()

    def loss_of(masks: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weights = {}
        for name, mask in zip(names, masks.float().to(device).split(pieces), strict=True):
            left, singular, right = factors[name]
            weights[f"{name}.weight"] = _unmatricize(
                (left * (mask * singular)) @ right, shapes[name], spectra[name].scheme
            )
        logits = functional_call(model, weights, (images.to(device),))
        return nn.functional.cross_entropy(logits, labels.to(device))

    iterator = iter(loader)
    fixed_batches = []
    for _ in range(evaluation_batches):
        try:
            fixed_batches.append(next(iterator))
        except StopIteration:
            break

    def evaluation_loss(masks: torch.Tensor) -> float:
        with torch.no_grad():
            return sum(float(loss_of(masks, *batch)) for batch in fixed_batches) / len(fixed_batches)

    def binary_masks(ranks: dict[str, int | None], components: dict | None = None) -> torch.Tensor:
        parts = []
        for name in names:
            part = torch.zeros(spectra[name].full_rank, dtype=torch.float64)
            if ranks[name] is None:
                part[:] = 1
            elif components is not None and name in components:
                part[torch.as_tensor(components[name], dtype=torch.long)] = 1
            else:
                part[: ranks[name]] = 1
            parts.append(part)
        return torch.cat(parts)

    candidates = []
    for other in (select_pos(spectra, budget), select_cptv(spectra, budget)):
        candidates.append((other.method, other.ranks, None))
    rounding_steps = {round(steps * (point + 1) / rounding_points) for point in range(rounding_points)}
    # Euclidean first: a shuffling loader advances, so "both" then holds the Euclidean run's roundings.
    for metric in ("euclidean", "cost") if projection == "both" else (projection,):
        masks = _project(torch.ones(sum(pieces), dtype=torch.float64), costs_all, limit, metric)
        masks.requires_grad_(True)
        # In the cost metric the gradient is divided by each component's cost (the metric's inverse).
        scale = costs_all if metric == "cost" else torch.ones_like(costs_all)
        prefix = "relaxation step" if metric == "euclidean" else f"relaxation ({metric} metric) step"
        iterator = iter(loader)
        bar = tqdm(range(1, steps + 1), desc=f"relaxed rank selection ({metric})", disable=not progress, leave=False)
        for step in bar:
            try:
                images, labels = next(iterator)
            except StopIteration:
                iterator = iter(loader)
                images, labels = next(iterator)
            (gradient,) = torch.autograd.grad(loss_of(masks, images, labels), masks)
            with torch.no_grad():
                direction = gradient / scale
                direction /= direction.abs().max().clamp_min(1e-300)
                masks.copy_(_project(masks - learning_rate * direction, costs_all, limit, metric))
            if step in rounding_steps:
                ranks, components = _round_masks(masks.detach(), spectra, names, pieces, limit)
                candidates.append((f"{prefix} {step}", ranks, components))
    # Each candidate's (accuracy, loss); the highest accuracy wins, then the lowest loss.
    scored: list[tuple[float | None, float, str, dict, dict | None]] = []
    per_seed: dict[str, list[float]] = {}
    if validation is None:
        criterion = "training loss"
        for label, ranks, components in candidates:
            scored.append((None, evaluation_loss(binary_masks(ranks, components)), label, ranks, components))
    else:
        criterion = f"mean validation accuracy after fine-tuning with seeds {selection_seeds}"
        scores: dict[tuple, list[tuple[float, float]]] = {}
        bar = tqdm(candidates, desc="fine-tune candidates", disable=not progress, leave=False)
        for label, ranks, components in bar:
            key = candidate_key(ranks, components)
            if key not in scores:
                scores[key] = [
                    _finetuned_score(
                        model,
                        spectra,
                        ranks,
                        components,
                        finetune_loaders(seed),
                        validation,
                        finetune,
                        finetune_criterion,
                        device,
                    )
                    for seed in selection_seeds
                ]
            runs = scores[key]
            accuracy = sum(run[0] for run in runs) / len(runs)
            loss = sum(run[1] for run in runs) / len(runs)
            per_seed[label] = [run[0] for run in runs]
            scored.append((accuracy, loss, label, ranks, components))
    _, _, label, ranks, components = min(scored, key=lambda entry: (-(entry[0] or 0.0), entry[1]))
    return RankChoice(
        "relaxed",
        ranks,
        _total(spectra, ranks),
        dense,
        components=components,
        candidates=[
            {"candidate": entry[2], "accuracy": entry[0], "loss": entry[1], "ranks": entry[3]}
            | ({"accuracy_per_seed": per_seed[entry[2]]} if entry[2] in per_seed else {})
            for entry in scored
        ],
        criterion=criterion,
        winner=label,
    )


def candidate_key(ranks: dict[str, int | None], components: dict | None) -> tuple:
    """Candidates that build the same network get the same key (rounding often repeats one)."""
    chosen = components or {}
    return tuple(
        (name, rank, tuple(int(index) for index in chosen[name]) if name in chosen else None)
        for name, rank in ranks.items()
    )


def _finetuned_score(
    model, spectra, ranks, components, loader, validation, finetune, criterion, device
) -> tuple[float, float]:
    """Validation (accuracy, loss) of the network factorized at `ranks` after fine-tuning it by `finetune`."""
    config = finetune if finetune is not None else TrainConfig(epochs=1, learning_rate=0.01)
    candidate = factorize(copy.deepcopy(model), spectra, ranks, components)
    fit(candidate, loader, config, device=device, criterion=criterion, progress=False)
    result = evaluate(candidate, validation, device)
    return result.accuracy, result.loss


def _round_masks(
    values: torch.Tensor, spectra: dict[str, LayerSpectrum], names: list[str], pieces: list[int], limit: float
) -> tuple[dict[str, int | None], dict[str, np.ndarray]]:
    """Components in order of their masks (ties: larger singular values first) join their layer
    while the true budget holds; a layer whose rank stops saving MACs costs only its dense MACs,
    so the budget the linear relaxation left unspent is filled here."""
    order = torch.argsort(values, descending=True, stable=True).tolist()
    offsets = np.cumsum([0, *pieces])
    layer_of = np.repeat(np.arange(len(names)), pieces)
    chosen: dict[str, list[int]] = {name: [] for name in names}
    for index in order:
        name = names[layer_of[index]]
        trial = {other: max(len(chosen[other]), 1) for other in names}
        trial[name] = len(chosen[name]) + 1
        if _total(spectra, trial) <= limit:
            chosen[name].append(int(index - offsets[layer_of[index]]))
    components = {name: np.array(sorted(chosen[name]) or [0]) for name in names}
    ranks = _normalized({name: len(components[name]) for name in names}, spectra)
    return ranks, {name: components[name] for name in names if ranks[name] is not None}


def _unmatricize(matrix: torch.Tensor, shape: torch.Size, scheme: str) -> torch.Tensor:
    """The inverse of _matrix: a layer weight from its (possibly low-rank) matrix."""
    if len(shape) == 2:
        return matrix
    out_channels, in_channels, height, width = shape
    if scheme == "zhang":
        return matrix.reshape(shape)
    return matrix.reshape(width, out_channels, in_channels, height).permute(1, 2, 3, 0)


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
