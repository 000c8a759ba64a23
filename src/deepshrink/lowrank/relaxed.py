"""Rank selection by the masking-variable relaxation (COBLA, Li & Shi 2018).

Each layer's weight is U diag(m * S) V^T with masks m in [0, 1]. The training loss is minimised
over the masks by projected gradient descent under the linear MAC budget
sum_i c_i sum_j m_ij <= B (c_i a rank's cost in layer i), starting from all masks at one
(projected). The masks are rounded at several points along the descent; the roundings, with the
POS and CPTV choices for the same budget, are the candidates, and a score picks one.

Why each choice (the measurements are in BENCHMARKS.md):
- Projections. "euclidean" is the plain projected gradient; its projection clip(m - lambda c)
  takes mask in proportion to a component's cost, so at tight budgets it zeroes expensive layers
  before the gradient has a say. "cost" descends in the metric sum c_i dm_i^2 (a knapsack-like
  step, the same amount from every component) but moves expensive components slowly. "both"
  keeps the roundings of the two. The default stays "euclidean": the cost metric's better
  roundings did not carry over to test accuracy after fine-tuning ("The relaxation with a
  cost-metric descent").
- Scores. The linear budget prices every layer as factored and cannot see that a small layer is
  cheaper whole, so candidates are scored on the real network: by the training loss on fixed
  batches, or (with a validation loader) by mean validation metric after fine-tuning each
  candidate as the winner will be, ties to the lower loss. Accuracy, because the loss before
  fine-tuning misjudged which ranks fine-tune best (LeNet-5 at 0.7 of the MACs: 5% less loss,
  0.11 points behind on test). More selection seeds average out shuffles but not the
  validation images: five seeds did not choose better than one ("Selection by the mean of five
  fine-tuning runs").
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from deepshrink import distributed
from deepshrink.errors import ConfigError
from deepshrink.inputs import call_with, to_device
from deepshrink.lowrank import (
    LayerSpectrum,
    RankChoice,
    _check_budget,
    _dense_total,
    _normalized,
    _total,
    _unmatricize,
    factorize,
    select_cptv,
    select_pos,
)
from deepshrink.progress import progress_bar
from deepshrink.tasks import Task, classification
from deepshrink.train import TrainConfig, evaluate, fit, inputs_and_targets, one_tensor

# The relaxation's descents: one metric, or both with all their roundings as candidates.
PROJECTIONS = ("euclidean", "cost", "both")


@dataclass(frozen=True)
class Selection:
    """How the candidates are scored: with a `validation` loader, each distinct candidate is
    factorized, fine-tuned by `finetune` (default one epoch of SGD at 0.01) once per seed in
    `seeds` on `loaders(seed)` (default: the descent's loader, for one seed only) with the loss
    `criterion` (default the task's loss), and scored by its mean validation metric (the task's;
    ties go to the lower loss). Without one, by the training loss on fixed batches."""

    validation: Iterable | None = None
    finetune: TrainConfig | None = None
    loaders: Callable[[int], Iterable] | None = None
    seeds: tuple[int, ...] = (1,)
    criterion: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not self.seeds:
            raise ConfigError("selection seeds is empty; give at least one shuffling seed, e.g. (1,)")
        if self.loaders is None and len(self.seeds) > 1:
            raise ConfigError(
                f"selection seeds {list(self.seeds)} ask for {len(self.seeds)} fine-tuning runs per candidate, "
                "but loaders is not given; pass a function from a seed to a shuffled training loader"
            )


@dataclass(frozen=True)
class RelaxedOptions:
    """The descent: `steps` projected gradient steps at `learning_rate` (normalised steps),
    rounded at `rounding_points` evenly spaced steps, in the `projection` metric (PROJECTIONS);
    `evaluation_batches` fixed batches score by training loss; `selection` (see Selection);
    `task` gives the loss descended and the metric scored (default classification)."""

    steps: int = 300
    learning_rate: float = 0.05
    rounding_points: int = 6
    evaluation_batches: int = 8
    projection: str = "euclidean"
    selection: Selection = field(default_factory=Selection)
    task: Task = field(default_factory=classification)

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"projection={self.projection!r} should be one of {', '.join(PROJECTIONS)}")
        if self.steps < 1 or self.rounding_points < 1 or self.evaluation_batches < 1:
            raise ConfigError(
                f"steps={self.steps}, rounding_points={self.rounding_points} and "
                f"evaluation_batches={self.evaluation_batches} should all be at least 1"
            )


def select_relaxed(
    model: nn.Module,
    spectra: dict[str, LayerSpectrum],
    budget: float,
    loader: Iterable,
    options: RelaxedOptions | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> RankChoice:
    """Ranks for `model`'s layers in `spectra` within `budget` (a fraction of the dense MACs).

    Args:
        model: the network (not changed); its layers' spectra come from `layer_spectra`.
        spectra: each layer's SVD.
        budget: the MAC fraction, in (0, 1].
        loader: training batches for the descent (and the fixed scoring batches).
        options: the descent and the scoring (RelaxedOptions; default as documented there).
        device: where the descent and the fine-tuning run.
        progress: show progress bars.

    Returns:
        A RankChoice with method "relaxed": the winner's ranks and components, every candidate's
        scores in `candidates`, what was scored in `criterion`, and the `winner`'s label. Never
        worse on the score than POS or CPTV, which are among the candidates.

    Raises:
        ConfigError: for a budget outside (0, 1] or invalid options.
    """
    options = options or RelaxedOptions()
    _check_budget(budget)
    relaxation = _Relaxation(model, spectra, budget, device, options.task)
    # Taken before the descent, which (with a shuffling loader) draws its batches after these.
    batches = _fixed_batches(loader, options.evaluation_batches)
    candidates = [
        (pick.method, pick.ranks, None) for pick in (select_pos(spectra, budget), select_cptv(spectra, budget))
    ]
    # Euclidean first: a shuffling loader advances, so "both" then holds the Euclidean run's roundings.
    for metric in ("euclidean", "cost") if options.projection == "both" else (options.projection,):
        candidates += relaxation.descend(loader, metric, options, progress)
    selection = options.selection
    if selection.validation is None:
        criterion = "training loss"
        scored = [
            (None, relaxation.loss_on(batches, ranks, components), label, ranks, components, None)
            for label, ranks, components in candidates
        ]
    else:
        criterion = f"mean validation {options.task.metric.name} after fine-tuning with seeds {list(selection.seeds)}"
        scored = _finetuned_scores(model, spectra, candidates, selection, loader, device, progress, options.task)
    sign = -1.0 if options.task.metric.higher_is_better else 1.0
    _, _, label, ranks, components, _ = min(scored, key=lambda entry: (sign * (entry[0] or 0.0), entry[1]))
    return RankChoice(
        "relaxed",
        ranks,
        _total(spectra, ranks),
        _dense_total(spectra),
        components=components,
        candidates=[
            {"candidate": entry[2], "metric": entry[0], "loss": entry[1], "ranks": entry[3]}
            | ({"metric_per_seed": entry[5]} if entry[5] is not None else {})
            for entry in scored
        ],
        criterion=criterion,
        winner=label,
    )


class _Relaxation:
    """The masked network: its loss as a function of the masks, and the projected descent."""

    def __init__(self, model: nn.Module, spectra: dict[str, LayerSpectrum], budget: float, device, task: Task) -> None:
        self.model = model.to(device).eval()
        self.task = task
        self.spectra, self.device = spectra, device
        self.names = list(spectra)
        self.pieces = [spectra[name].full_rank for name in self.names]
        self.costs = torch.cat(
            [
                torch.full((spectra[name].full_rank,), float(spectra[name].factored_macs(1)), dtype=torch.float64)
                for name in self.names
            ]
        )
        # The linear budget counts every layer as factored; a layer later found cheaper dense only saves more.
        self.limit = budget * _dense_total(spectra)
        self.factors = {
            name: tuple(part.float().to(device) for part in (item.left, item.singular_values, item.right))
            for name, item in spectra.items()
        }

    def loss(self, masks: torch.Tensor, batch) -> torch.Tensor:
        inputs, targets = inputs_and_targets(batch)
        weights = {}
        for name, mask in zip(self.names, masks.float().to(self.device).split(self.pieces), strict=True):
            left, singular, right = self.factors[name]
            spectrum = self.spectra[name]
            weights[f"{name}.weight"] = _unmatricize(
                (left * (mask * singular)) @ right, spectrum.layer.weight.shape, spectrum.scheme
            )
        outputs = one_tensor(call_with(self.model, weights, to_device(inputs, self.device)))
        return self.task.loss(outputs, targets.to(self.device))

    def loss_on(self, batches: list, ranks: dict[str, int | None], components: dict | None) -> float:
        """The mean loss on `batches` of the network a candidate builds."""
        parts = []
        for name in self.names:
            part = torch.zeros(self.spectra[name].full_rank, dtype=torch.float64)
            if ranks[name] is None:
                part[:] = 1
            elif components is not None and name in components:
                part[torch.as_tensor(components[name], dtype=torch.long)] = 1
            else:
                part[: ranks[name]] = 1
            parts.append(part)
        masks = torch.cat(parts)
        with torch.no_grad():
            mean = sum(float(self.loss(masks, batch)) for batch in batches) / len(batches)
        # Under a process group each rank holds its own batches: every rank scores by the mean of all.
        return distributed.sum_values_over_ranks([mean])[0] / distributed.world_size()

    def descend(self, loader: Iterable, metric: str, options: RelaxedOptions, progress: bool) -> list[tuple]:
        """The projected descent in `metric`; returns its roundings as (label, ranks, components)."""

        steps = options.steps
        rounding_steps = {
            round(steps * (point + 1) / options.rounding_points) for point in range(options.rounding_points)
        }
        masks = _project(torch.ones(sum(self.pieces), dtype=torch.float64), self.costs, self.limit, metric)
        masks.requires_grad_(True)
        # In the cost metric the gradient is divided by each component's cost (the metric's inverse).
        scale = self.costs if metric == "cost" else torch.ones_like(self.costs)
        prefix = "relaxation step" if metric == "euclidean" else f"relaxation ({metric} metric) step"
        roundings = []
        iterator = iter(loader)
        bar = progress_bar(
            range(1, steps + 1), desc=f"relaxed rank selection ({metric})", enabled=progress, leave=False
        )
        for step in bar:
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(loader)
                batch = next(iterator)
            (gradient,) = torch.autograd.grad(self.loss(masks, batch), masks)
            # Each rank's batch is its shard of the global one: descend on their mean, as DDP would.
            gradient = distributed.sum_over_ranks(gradient) / distributed.world_size()
            with torch.no_grad():
                direction = gradient / scale
                direction /= direction.abs().max().clamp_min(1e-300)
                masks.copy_(_project(masks - options.learning_rate * direction, self.costs, self.limit, metric))
            if step in rounding_steps:
                ranks, components = _round_masks(masks.detach(), self.spectra, self.names, self.pieces, self.limit)
                roundings.append((f"{prefix} {step}", ranks, components))
        return roundings


def _fixed_batches(loader: Iterable, count: int) -> list:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def _finetuned_scores(model, spectra, candidates, selection: Selection, loader, device, progress, task) -> list[tuple]:
    """(mean metric, mean loss, label, ranks, components, metric per seed) per candidate; each
    distinct network is fine-tuned once per seed, with the same seeds for all (a paired comparison)."""

    loaders = selection.loaders or (lambda seed: loader)
    config = selection.finetune if selection.finetune is not None else TrainConfig(epochs=1, learning_rate=0.01)
    runs_of: dict[tuple, list[tuple[float, float]]] = {}
    scored = []
    for label, ranks, components in progress_bar(
        candidates, desc="fine-tune candidates", enabled=progress, leave=False
    ):
        key = candidate_key(ranks, components)
        if key not in runs_of:
            runs_of[key] = []
            for seed in selection.seeds:
                candidate = factorize(copy.deepcopy(model), spectra, ranks, components)
                fit(
                    candidate,
                    loaders(seed),
                    config,
                    device=device,
                    task=task,
                    criterion=selection.criterion,
                    progress=False,
                )
                result = evaluate(candidate, selection.validation, device, task)
                runs_of[key].append((result.metric, result.loss))
        runs = runs_of[key]
        metric = sum(run[0] for run in runs) / len(runs)
        loss = sum(run[1] for run in runs) / len(runs)
        scored.append((metric, loss, label, ranks, components, [run[0] for run in runs]))
    return scored


def candidate_key(ranks: dict[str, int | None], components: dict | None) -> tuple:
    """Candidates that build the same network get the same key (rounding often repeats one).

    Args:
        ranks: {layer name: rank or None}.
        components: {layer name: the singular triplets kept}, or None.

    Returns:
        A hashable key.
    """
    chosen = components or {}
    return tuple(
        (name, rank, tuple(int(index) for index in chosen[name]) if name in chosen else None)
        for name, rank in ranks.items()
    )


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
