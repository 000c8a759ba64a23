"""Automatic per-layer settings: from a target (a compression ratio, or a budget on the metric's
drop) to each weight's sparsity and bits.

1. Sensitivity: each compressible weight alone is pruned by magnitude to each candidate
   sparsity, and (separately) shared by k-means at each candidate width, and the task's metric
   is measured on the validation split each time, without retraining.
2. Size: each (sparsity, bits) option of a weight costs its entries at bits + index bits (with
   the relative index's filler entries) plus its codebook, as the encoder lays them out.
3. Choice: a multiple-choice knapsack. Assuming the layers' drops add up, each weight takes the
   option minimising drop + lambda x size, and lambda is found by bisection: the smallest
   that fits the size (ratio target), or the largest whose summed drop stays in the budget
   (metric target).
4. Calibration: the chosen settings are applied to a copy (masks and k-means, no retraining).
   For a ratio, the copy is encoded for real, the size budget scaled by target / measured and
   the choice made again, until the file is 2.5-5% below the target (retraining changes the
   coded size a little). For a metric budget, the copy's drop is measured on the validation
   split (drops of layers compressed together need not add up) and the budget tightened until
   the whole fits it.

The measured drops are without retraining, which recovers much of them: a metric budget is
therefore met conservatively, and the achieved ratio is the lower for it. The pipeline then
prunes and shares with the recipe's retraining (pipeline.py composes this before the stages).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from deepshrink.errors import ConfigError
from deepshrink.layers import Weight, compressible_weights, plain_state_dict
from deepshrink.progress import progress_bar
from deepshrink.settings import between, check_fields

UNSHARED_BITS = 32  # a weight the plan leaves unshared keeps its float32 values
# Retraining moves the weights the codes stand for, and with them the Huffman-coded size: by
# +1.9% on LeNet-300-100 at 30x (measured when the plan left out the file's header, about 1% of
# that file). A ratio target is planned this far below its size.
RETRAINING_MARGIN = 0.025


@dataclass(frozen=True)
class TargetSettings:
    """A recipe's `target:` in place of per-layer sparsities and bits: exactly one of `ratio`
    (the file's size against the fp32 parameters) or `max_metric_drop` (percent of the
    reference's metric, in the metric's worse direction)."""

    ratio: float | None = field(default=None, metadata=between(1.0, help="the file's size against fp32, e.g. 30"))
    max_metric_drop: float | None = field(
        default=None, metadata=between(0.0, help="the most the metric may get worse, in percent of the reference's")
    )
    sparsities: list[float] = field(
        default_factory=lambda: [0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97],
        metadata=between(0.0, 1.0, open_high=True, help="the sparsities each layer may take"),
    )
    bits: list[int] = field(
        default_factory=lambda: [2, 3, 4, 5, 6, 8], metadata=between(1, 16, help="the widths each layer may take")
    )
    # The paper's Figure 7: convolutions lose accuracy below 4 bits, fully connected layers hold
    # to 2. Measured without retraining, low widths look cheap, but fine-tuning centroids wins
    # back less than retraining wins back after pruning (a 1-D CNN at 10x: -2.5% with 2-3-bit
    # convolutions, +0.3% with 4 bits and pruning).
    convolution_min_bits: int = field(default=4, metadata=between(1, 16, help="the fewest bits a convolution takes"))
    # The plan evaluates the validation split a few hundred times (each layer at each candidate,
    # then the calibration): a split of 100,000 images would take hours, so it measures on the
    # first ones. The paper's LeNets validate on 5,000, all of them used.
    examples: int = field(
        default=10_000,
        metadata=between(1, help="at most this many validation examples in each of the plan's measurements")
        | {"recorded_when_set": True},
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if (self.ratio is None) == (self.max_metric_drop is None):
            raise ConfigError("target needs exactly one of ratio (e.g. 30) or max_metric_drop (percent, e.g. 0.5)")


@dataclass(frozen=True)
class LayerPlan:
    """What the plan chose for one weight, and why: its measured drops and estimated bytes."""

    name: str
    weights: int
    sparsity: float
    bits: int  # UNSHARED_BITS when left unshared
    pruning_drop: float  # metric drop with only this weight pruned to `sparsity`, no retraining
    sharing_drop: float  # metric drop with only this weight shared at `bits`, no retraining
    estimated_bytes: float


@dataclass(frozen=True)
class Plan:
    """The chosen settings, the target and the evidence: per-layer sensitivities and sizes."""

    target: dict
    reference_metric: float
    metric_name: str
    layers: list[LayerPlan]
    estimated_drop: float  # sum of the chosen options' drops, in metric units
    fixed_bytes: int  # what the plan does not choose: biases, norms, the header
    measured_bytes: int | None  # the calibrated file's size without retraining (ratio target)
    measured_drop: float | None  # the whole chosen compression's drop without retraining (metric target)
    sensitivity: dict  # name -> {"sparsity": {s: drop}, "bits": {b: drop}}
    # Planned after a pruning that learns its own sparsity (variational dropout): the layers'
    # sparsities are the pruning's, only the bits were chosen, and the drops above count from
    # the pruned model (the estimated and measured drops include what pruning itself cost).
    after_pruning: bool = False

    @property
    def sparsity(self) -> dict[str, float]:
        """{weight name: sparsity} for the weights the plan prunes (none when it was made after pruning)."""
        if self.after_pruning:
            return {}
        return {layer.name: layer.sparsity for layer in self.layers if layer.sparsity > 0}

    @property
    def bits(self) -> dict[str, int]:
        """{weight name: bits} for the weights the plan shares."""
        return {layer.name: layer.bits for layer in self.layers if layer.bits != UNSHARED_BITS}

    def to_dict(self) -> dict:
        """The plan as plain data (plan.json).

        Returns:
            A dict that `from_dict` reads back.
        """
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Plan:
        """A plan as `to_dict` wrote it.

        Args:
            values: the dict.

        Returns:
            The Plan.
        """
        return cls(**{**values, "layers": [LayerPlan(**layer) for layer in values["layers"]]})


def _drop(reference: float, value: float, higher_is_better: bool) -> float:
    """How much worse `value` is than `reference` in the metric's direction (negative: better)."""
    return reference - value if higher_is_better else value - reference


def _evaluate(model, loader, device, task) -> float:
    from deepshrink.train import evaluate

    return evaluate(model, loader, device, task).metric


def measure_sensitivity(
    model: nn.Module,
    loader,
    task,
    sparsities: list[float],
    bits: list[int],
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    shared_model: nn.Module | None = None,
    convolution_min_bits: int = 1,
) -> tuple[float, dict[str, dict[str, dict]]]:
    """The reference metric, and per weight the metric drop at each sparsity and each width,
    each weight changed alone and restored after. `model` is left as it was.

    `shared_model` is the model as the pipeline shares it (a copy with BatchNorm folded:
    per-channel scales change what a few bits can hold); widths are measured on it, and only
    those a weight may take (convolutions: `convolution_min_bits` and up). Default `model`.

    Args:
        model: the trained model; left as it was.
        loader: the validation loader.
        task: the task whose metric is measured.
        sparsities: the sparsities to try per weight.
        bits: the widths to try per weight.
        device: where to evaluate.
        seed: the seed of k-means.
        progress: a progress bar.
        shared_model: the model the widths are measured on (default `model`).
        convolution_min_bits: the narrowest width a convolution may take.

    Returns:
        (reference metric, {weight: {"sparsity": {sparsity: drop}, "bits": {bits: drop}}}).

    Raises:
        ConfigError: `model` is already pruned or shared.
    """
    from deepshrink.prune.masks import sparsity_mask
    from deepshrink.quantize.shared import share_layer_weights

    model = model.to(device).eval()
    reference = _evaluate(model, loader, device, task)
    higher = task.metric.higher_is_better
    weights = compressible_weights(model)
    shared_model = (shared_model if shared_model is not None else model).to(device).eval()
    shared_weights = compressible_weights(shared_model)
    prunings = [sparsity for sparsity in sparsities if sparsity > 0]
    widths = {}
    for name, weight in weights.items():
        usable = [width for width in bits if not weight.is_convolution or width >= convolution_min_bits]
        widths[name] = usable or sorted(bits)[-1:]  # given only narrower candidates, the widest
    total = sum(len(prunings) + len(widths[name]) for name in weights)
    bar = progress_bar(total=total, desc="sensitivity", enabled=progress)
    result: dict[str, dict[str, dict]] = {}
    for name, weight in weights.items():
        if weight.parametrizations():
            raise ConfigError(f"{name!r} is already pruned or shared; plan from the trained reference")
        parameter = weight.value
        saved = parameter.detach().clone()
        drops: dict[str, dict] = {"sparsity": {0.0: 0.0}, "bits": {UNSHARED_BITS: 0.0}}
        for sparsity in prunings:
            with torch.no_grad():
                parameter.mul_(sparsity_mask(saved, sparsity))
            drops["sparsity"][sparsity] = _drop(reference, _evaluate(model, loader, device, task), higher)
            with torch.no_grad():
                parameter.copy_(saved)
            bar.update(1)
        for width in widths[name]:
            share_layer_weights(shared_weights[name], width, seed=seed, zero_code=False)
            drops["bits"][width] = _drop(reference, _evaluate(shared_model, loader, device, task), higher)
            shared_weights[name].remove_parametrizations(leave_parametrized=False)
            bar.update(1)
        result[name] = drops
    bar.close()
    return reference, result


def _monotone(drops: dict[str, dict]) -> dict[str, dict]:
    """Measured drops made monotone: pruning more, or sharing with fewer bits, never loses less.
    A single evaluation's noise (a validation split of a few thousand examples moves by tenths
    of a percent) would otherwise make a harsher setting look free."""
    result = {}
    for kind, ascending in (("sparsity", True), ("bits", False)):
        keys = sorted(drops[kind], reverse=not ascending)  # from the mildest setting to the harshest
        running, smoothed = 0.0, {}
        for key in keys:
            running = max(running, drops[kind][key])
            smoothed[key] = running
        result[kind] = smoothed
    return result


def option_bytes(shape: tuple[int, ...], sparsity: float, bits: int, index_bits: int) -> float:
    """Bytes of one weight of `shape` pruned to `sparsity` and shared at `bits` (or left as
    float32 when bits is UNSHARED_BITS), laid out as the encoder does before entropy coding.

    Args:
        shape: the weight's shape.
        sparsity: the fraction pruned.
        bits: the code width, or UNSHARED_BITS.
        index_bits: the relative index's width.

    Returns:
        The estimated bytes (a float: an expectation).
    """
    from deepshrink.encode.sparse import as_matrix

    rows, columns = as_matrix(tuple(shape))
    count = rows * columns
    kept = count * (1.0 - sparsity)
    if sparsity == 0:
        values = count * bits
    else:
        # A gap longer than the index can say takes a filler entry per 2^index_bits zeros. With
        # the kept positions spread at random, the entry at column i of a row has a gap of at
        # least j * 2^index_bits (rows restart the count) with probability sparsity^(j L) when
        # j L <= i: summed over a row's columns, the fillers below.
        span = 1 << index_bits
        fillers, step = 0.0, 1
        while step * span < columns and sparsity ** (step * span) > 1e-12:
            fillers += sparsity ** (step * span) * (columns - step * span)
            step += 1
        fillers *= rows * (1.0 - sparsity)
        entries = kept + fillers
        values = entries * (bits + index_bits)
        # Each row's entry count, at the width of the largest (about 1.5x the mean, here).
        values += rows * (int(1.5 * entries / rows) + 1).bit_length()
    codebook = 32 * (1 << bits) if bits != UNSHARED_BITS else 0
    return (values + codebook) / 8


CHOICE_STEPS = 4096  # the budget's resolution in the knapsack: a step is 1/4096 of it


def choose(
    options: dict[str, list[tuple[float, int, float, float]]],
    size_budget: float | None = None,
    drop_budget: float | None = None,
) -> dict[str, tuple[float, int, float, float]]:
    """Per weight, one option (sparsity, bits, drop, bytes): the least summed drop whose total
    bytes fit `size_budget`, or the fewest bytes whose summed drop fits `drop_budget` (where
    none does: the least drop there is).

    A multiple-choice knapsack, solved exactly by dynamic programming over the budget cut into
    CHOICE_STEPS steps, each option's cost rounded up to whole steps, so the budget always
    holds and at most one step per weight of it goes unspent. (A Lagrangian relaxation, the
    usual shortcut, reaches only the corners of the trade-off's convex hull: on LeNet-300-100
    it jumped from 36 KB straight to 26 KB, one layer's step from 5 to 2 bits.)

    Args:
        options: per weight, its options (sparsity, bits, drop, bytes).
        size_budget: the most bytes in all; or
        drop_budget: the most summed drop.

    Returns:
        Per weight, the option chosen.

    Raises:
        ConfigError: even the smallest options do not fit the size budget.
    """
    names = list(options)
    by_size = size_budget is not None
    if by_size:
        smallest = sum(min(option[3] for option in options[name]) for name in names)
        if smallest > size_budget:
            raise ConfigError(
                f"the weights cannot be made smaller than {smallest:,.0f} bytes with these candidate sparsities "
                f"and bits, and the target leaves {size_budget:,.0f}: add higher sparsities or fewer bits, or "
                "lower the ratio"
            )
        budget, cost_index, value_index = size_budget, 3, 2
    else:
        least = sum(min(option[2] for option in options[name]) for name in names)
        if least > drop_budget:
            return {name: min(options[name], key=lambda option: (option[2], option[3])) for name in names}
        budget, cost_index, value_index = drop_budget, 2, 3
    step = budget / CHOICE_STEPS if budget > 0 else 1.0
    # best[c]: the least summed value (drop, or bytes) of the weights so far within c steps of cost.
    best = np.zeros(CHOICE_STEPS + 1)
    taken = np.zeros((len(names), CHOICE_STEPS + 1), dtype=np.int32)
    for position, name in enumerate(names):
        following = np.full(CHOICE_STEPS + 1, np.inf)
        for index, option in enumerate(options[name]):
            cost = max(option[cost_index], 0.0)
            steps = math.ceil(cost / step - 1e-9) if budget > 0 else (0 if cost == 0 else CHOICE_STEPS + 1)
            if steps > CHOICE_STEPS:
                continue
            # Equal drops (common: small drops measure as 0) go to the larger option, which is the
            # safer one; equal sizes to the smaller drop.
            value = option[value_index] - (1e-9 * option[3] / budget if by_size else -1e-9 * option[2])
            candidate = np.full(CHOICE_STEPS + 1, np.inf)
            candidate[steps:] = best[: CHOICE_STEPS + 1 - steps] + value
            better = candidate < following
            following[better] = candidate[better]
            taken[position, better] = index
        best = following
    if not np.isfinite(best[-1]):  # only by rounding: fall back to the cheapest option of each
        return {
            name: min(options[name], key=lambda option: (option[cost_index], option[value_index])) for name in names
        }
    chosen, remaining = {}, CHOICE_STEPS
    for position in range(len(names) - 1, -1, -1):
        name = names[position]
        option = options[name][taken[position, remaining]]
        chosen[name] = option
        cost = max(option[cost_index], 0.0)
        remaining -= math.ceil(cost / step - 1e-9) if budget > 0 else 0
    return {name: chosen[name] for name in names}


def _fixed_bytes(model: nn.Module, weights: dict[str, Weight]) -> int:
    """The tensors the plan does not choose for, as the container stores them (zstd byte planes)."""
    from deepshrink.encode import lossless

    chosen = {key for weight in weights.values() for key in (weight.key, *weight.alias_keys)}  # a tie: stored once
    total = 0
    for key, tensor in plain_state_dict(model).items():
        if key in chosen:
            continue
        data = tensor.detach().cpu().contiguous().numpy().tobytes()
        packed = lossless.compress(data, tensor.element_size()) if data else None
        total += len(data) if packed is None else len(packed)
    return total


def applied(
    model: nn.Module, chosen: dict[str, tuple], before_sharing: Callable[[nn.Module], nn.Module] | None = None
) -> nn.Module:
    """A copy of `model` pruned by magnitude and shared as `chosen` says, without retraining
    (`before_sharing` in between, as measure_sensitivity). A weight already at least as sparse
    as its option (planned after pruning) keeps its zeros and is not pruned again.

    Args:
        model: the trained model; not changed.
        chosen: per weight, its option (sparsity, bits, ...).
        before_sharing: a step between pruning and sharing (folding BatchNorm).

    Returns:
        The compressed copy.
    """
    from deepshrink.prune.masks import sparsity_mask
    from deepshrink.prune.module import apply_masks
    from deepshrink.quantize.shared import share_weights

    trial = copy.deepcopy(model)
    weights = compressible_weights(trial)
    masks = {
        name: sparsity_mask(weights[name].value, option[0])
        for name, option in chosen.items()
        if option[0] > _zero_fraction(weights[name])
    }
    apply_masks(trial, masks)
    if before_sharing is not None:
        trial = before_sharing(trial)
    widths = {name: option[1] for name, option in chosen.items() if option[1] != UNSHARED_BITS}
    if widths:
        share_weights(trial, widths)
    return trial


def _zero_fraction(weight: Weight) -> float:
    """The fraction of the weight's values that are exactly zero."""
    value = weight.value.detach()
    return float((value == 0).sum()) / max(value.numel(), 1)


def measured_bytes(
    model: nn.Module, chosen: dict[str, tuple], encode_settings, before_sharing=None, metadata: dict | None = None
) -> int:
    """The file size of `model` compressed as `chosen` says, without retraining.

    Args:
        model: the trained model; not changed.
        chosen: per weight, its option (sparsity, bits, ...).
        encode_settings: the recipe's EncodeSettings.
        before_sharing: a step between pruning and sharing (folding BatchNorm).
        metadata: the file header's metadata, as the pipeline will write it.

    Returns:
        The .dcz file's size in bytes.
    """
    from deepshrink.encode.sizes import encoded_bytes

    return encoded_bytes(applied(model, chosen, before_sharing).cpu(), encode_settings, metadata)


def plan_settings(
    model: nn.Module,
    loader,
    task,
    target: TargetSettings,
    *,
    prune: bool,
    quantize: bool,
    encode_settings,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    before_sharing: Callable[[nn.Module], nn.Module] | None = None,
    reference_metric: float | None = None,
    file_metadata: dict | None = None,
) -> Plan:
    """Per-layer sparsity and bits for `model` to meet `target` on `loader` (the validation split).

    `model` may already be pruned (pruning masks) by a method that learns its own sparsity,
    variational dropout: with `prune` False the plan then keeps each layer's zeros, chooses
    only the bits, and counts a metric target's drop from `reference_metric`, so that what
    pruning cost is part of the budget.

    Args:
        model: the trained model; not changed.
        loader: the validation loader (the pipeline gives its first `target.examples` examples).
        task: the task whose metric the target's drop is measured in.
        target: the ratio or the largest metric drop.
        prune: whether the recipe prunes; without it, sparsity stays 0.
        quantize: whether the recipe shares; without it, values stay float32.
        encode_settings: the recipe's EncodeSettings (index widths), for the size estimate.
        device: where to evaluate.
        seed: the seed of k-means.
        progress: progress bars.
        before_sharing: what the pipeline does to the pruned model before sharing it (folding
            BatchNorm), in place; see measure_sensitivity.
        reference_metric: the unpruned reference's metric on `loader`, for an already pruned
            `model` (default: `model`'s own).
        file_metadata: what the file's header will record besides the tensors, counted in a
            ratio target's size (hundreds of bytes: a real share of a small model's file).

    Returns:
        The Plan.

    Raises:
        ConfigError: a target the candidates cannot reach (or one pruning alone already
            missed), nothing to choose, or a model already shared.
    """
    from deepshrink.encode.codec import index_widths
    from deepshrink.encode.sizes import parameter_bytes
    from deepshrink.layers import plain_copy
    from deepshrink.prune.module import only_pruned

    if not prune and not quantize:
        raise ConfigError("a target chooses per-layer sparsity and bits: the recipe needs a prune or quantize stage")
    weights = compressible_weights(model)
    parametrized = [name for name, weight in weights.items() if weight.parametrizations()]
    if parametrized:
        if prune or not all(only_pruned(weights[name]) for name in parametrized):
            first = parametrized[0]
            raise ConfigError(
                f"{first!r} is already {'pruned' if only_pruned(weights[first]) else 'shared'}: a plan chooses "
                "from the trained reference, or (bits only) from a model pruned and not yet shared"
            )
        model = plain_copy(model)  # the zeros stay; each width is tried on the plain weights
    sparsities = sorted(set(target.sparsities) | {0.0}) if prune else [0.0]
    widths = sorted(set(target.bits)) if quantize else []
    # The model as the pipeline shares it, made once: for the widths' drops and the fixed bytes.
    folded = before_sharing(copy.deepcopy(model)) if before_sharing is not None else model
    reference, sensitivity = measure_sensitivity(
        model,
        loader,
        task,
        sparsities,
        widths,
        device=device,
        seed=seed,
        progress=progress,
        shared_model=folded,
        convolution_min_bits=target.convolution_min_bits,
    )
    smoothed = {name: _monotone(drops) for name, drops in sensitivity.items()}
    weights = compressible_weights(model)
    candidates = {name: sparsities for name in weights}
    if not prune:  # each weight keeps the zeros it has (none, unless pruned before the plan)
        candidates = {name: [_zero_fraction(weight)] for name, weight in weights.items()}
        for name, (sparsity,) in candidates.items():
            smoothed[name]["sparsity"] = {sparsity: 0.0}
    index_bits = index_widths(weights, encode_settings.index_bits)
    options = {
        name: _options(
            tuple(weight.value.shape),
            candidates[name],
            [width for width in sensitivity[name]["bits"] if width != UNSHARED_BITS],  # in the order measured
            smoothed[name],
            index_bits[name],
        )
        for name, weight in weights.items()
    }
    fixed = _fixed_bytes(folded, compressible_weights(folded))
    measured, measured_drop = None, None
    if target.ratio is not None:
        goal = parameter_bytes(model) / target.ratio
        if goal - fixed <= 0:
            raise ConfigError(
                f"ratio {target.ratio} leaves {goal:,.0f} bytes, but the tensors that are not weights "
                f"(biases, norms) alone take {fixed:,} bytes: lower the ratio"
            )
        chosen, measured = _calibrated_to_size(
            options,
            goal,
            fixed,
            lambda chosen: measured_bytes(model, chosen, encode_settings, before_sharing, file_metadata),
        )
    higher = task.metric.higher_is_better
    counted_from = reference if reference_metric is None else reference_metric
    spent = _drop(counted_from, reference, higher)  # by pruning before the plan; 0 from the reference
    if target.ratio is None:
        allowed = target.max_metric_drop / 100 * abs(counted_from) - spent
        if allowed < 0:
            raise ConfigError(
                f"pruning alone already changed the validation {task.metric.name} by {-spent:+.4f} "
                f"({counted_from:.4f} to {reference:.4f}), more than max_metric_drop {target.max_metric_drop:g}% "
                "allows: raise max_metric_drop, or prune less (a lower kl_weight)"
            )
        chosen, measured_drop = _calibrated_to_drop(
            options,
            allowed,
            lambda chosen: _drop(
                reference, _evaluate(applied(model, chosen, before_sharing), loader, device, task), higher
            ),
        )
        measured_drop = None if measured_drop is None else measured_drop + spent
    layers = [
        LayerPlan(
            name,
            weights[name].value.numel(),
            option[0],
            option[1],
            smoothed[name]["sparsity"][option[0]],
            smoothed[name]["bits"][option[1]],
            option[3],
        )
        for name, option in chosen.items()
    ]
    return Plan(
        target={key: value for key, value in asdict(target).items() if value is not None},
        reference_metric=counted_from,
        metric_name=task.metric.name,
        layers=layers,
        estimated_drop=spent + sum(option[2] for option in chosen.values()),
        fixed_bytes=fixed,
        measured_bytes=measured,
        measured_drop=measured_drop,
        sensitivity={
            name: {kind: {str(key): value for key, value in drops.items()} for kind, drops in values.items()}
            for name, values in sensitivity.items()
        },
        after_pruning=bool(parametrized),
    )


def _options(
    shape: tuple[int, ...], sparsities: list[float], widths: list[int], drops: dict[str, dict], index_bits: int
) -> list[tuple[float, int, float, float]]:
    """One weight's options (sparsity, bits, estimated drop, estimated bytes): every sparsity with
    every width in `widths` (none: float32 values). Their order breaks ties in `choose`."""
    return [
        (
            sparsity,
            width,
            drops["sparsity"][sparsity] + drops["bits"][width],
            option_bytes(shape, sparsity, width, index_bits),
        )
        for sparsity in sparsities
        for width in widths or [UNSHARED_BITS]
    ]


def _calibrated_to_size(
    options: dict, goal: float, fixed: int, measure: Callable[[dict], int]
) -> tuple[dict, int | None]:
    """The options chosen for a file of `goal` bytes, and the bytes `measure` found for them.

    The size model is an estimate: choose under a budget, encode, and scale the budget by how
    far the estimate was, until the file lands between 1 - 2 margins and 1 - 1 margin of the
    goal (retraining moves it a little) or the choice stops changing. Of the choices measured,
    the largest file within 1 - 1 margin of the goal is kept, else the largest within the goal,
    else the smallest: on a small model the choices are coarse and the estimate's error is not
    monotone in the budget, so the last choice tried can be the only one over the goal.
    """
    budget, chosen, tried = goal - fixed, None, []
    for _ in range(6):  # the budget stays positive: each step scales it by a positive factor
        previous, chosen = chosen, choose(options, size_budget=budget)
        if chosen == previous:
            break  # the budget moved too little to change anything
        measured = measure(chosen)
        tried.append((measured, chosen))
        if (1 - 2 * RETRAINING_MARGIN) * goal <= measured <= (1 - RETRAINING_MARGIN) * goal:
            break
        budget *= (1 - 1.5 * RETRAINING_MARGIN) * goal / measured
    for limit in ((1 - RETRAINING_MARGIN) * goal, goal):
        within = [entry for entry in tried if entry[0] <= limit]
        if within:
            measured, chosen = max(within, key=lambda entry: entry[0])
            return chosen, measured
    measured, chosen = min(tried, key=lambda entry: entry[0])
    return chosen, measured


def _calibrated_to_drop(options: dict, allowed: float, measure: Callable[[dict], float]) -> tuple[dict, float | None]:
    """The options chosen for a whole metric drop of at most `allowed`, and the drop `measure`
    found for them: the drops of layers changed together need not add up, so the whole is
    measured and the summed budget tightened until it holds."""
    budget, chosen, measured = allowed, None, None
    for _ in range(6):
        previous, chosen = chosen, choose(options, drop_budget=budget)
        if chosen == previous:
            break
        measured = measure(chosen)
        if measured <= allowed:
            break
        budget *= 0.6 * allowed / measured if measured > 0 else 0.6
    return chosen, measured


def format_plan(plan: Plan, markdown: bool = False) -> str:
    """The plan as a table: each weight's choice, its measured drops and estimated bytes.

    Args:
        plan: the plan.
        markdown: a Markdown table.

    Returns:
        The table.
    """
    from deepshrink.tables import render_table

    header = ["layer", "weights", "sparsity", "bits", "drop (pruned alone)", "drop (shared alone)", "est. bytes"]
    rows = [
        [
            layer.name,
            f"{layer.weights:,}",
            f"{100 * layer.sparsity:.0f}%",
            "fp32" if layer.bits == UNSHARED_BITS else str(layer.bits),
            "(learned)" if plan.after_pruning else f"{layer.pruning_drop:+.4f}",  # in the estimated drop
            f"{layer.sharing_drop:+.4f}",
            f"{layer.estimated_bytes:,.0f}",
        ]
        for layer in plan.layers
    ]
    return render_table(header, rows, markdown)


__all__ = ["LayerPlan", "Plan", "TargetSettings", "choose", "format_plan", "measure_sensitivity", "plan_settings"]
