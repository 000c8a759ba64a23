"""Iterative pruning: raise the sparsity over several rounds, retraining after each (Han et al. 2015)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from deepshrink.errors import ConfigError
from deepshrink.layers import match_per_layer, select_weights
from deepshrink.prune.masks import global_sparsity_masks, sparsity_mask, std_threshold_mask
from deepshrink.prune.module import apply_masks, current_masks
from deepshrink.tasks import Task
from deepshrink.train import TrainConfig, evaluate, fit


@dataclass
class RoundRecord:
    round: int
    targets: dict[str, float]
    kept_fraction: float
    metric_after_pruning: float
    metric_after_retraining: float
    seconds: float


@dataclass
class PruningHistory:
    reference_metric: float
    rounds: list[RoundRecord] = field(default_factory=list)


def round_sparsities(final: Mapping[str, float], rounds: int) -> list[dict[str, float]]:
    """Per-round targets that shrink the kept fraction geometrically: density_r = density^(r/R).

    Each round then removes the same share of what is left, which keeps the accuracy lost per
    round (and so the retraining needed) roughly even.

    Args:
        final: {name: final sparsity}.
        rounds: how many rounds.

    Returns:
        One {name: sparsity} per round, the last equal to `final`.

    Raises:
        ConfigError: `rounds` is below 1.
    """
    if rounds < 1:
        raise ConfigError(f"rounds={rounds} should be at least 1")
    return [
        {name: 1.0 - (1.0 - sparsity) ** (step / rounds) for name, sparsity in final.items()}
        for step in range(1, rounds + 1)
    ]


MaskRule = Callable[[nn.Module, int, int], dict[str, torch.Tensor]]
"""A mask rule gives the masks for round r of R (1-based) from the model's current weights."""


def per_layer_sparsity_rule(final: Mapping[str, float]) -> MaskRule:
    """Magnitude pruning per layer, the sparsity of each round from round_sparsities.

    Args:
        final: {layer glob: final sparsity}.

    Returns:
        A MaskRule: rule(model, round, rounds) -> {weight name: keep-mask}.
    """

    def rule(model: nn.Module, round_index: int, rounds: int) -> dict[str, torch.Tensor]:
        layers = select_weights(model, list(final))
        targets = round_sparsities(match_per_layer(layers, final, "sparsity"), rounds)[round_index - 1]
        existing = current_masks(model)
        return {name: sparsity_mask(layer.value, targets[name], existing.get(name)) for name, layer in layers.items()}

    return rule


def std_quality_rule(qualities: Mapping[str, float]) -> MaskRule:
    """Han's rule each round: keep |w| > quality x std of the weights that remain.

    The rule is applied afresh each round to what is left, so more rounds prune more.

    Args:
        qualities: {layer glob: quality}.

    Returns:
        A MaskRule: rule(model, round, rounds) -> {weight name: keep-mask}.
    """

    def rule(model: nn.Module, round_index: int, rounds: int) -> dict[str, torch.Tensor]:
        layers = select_weights(model, list(qualities))
        values = match_per_layer(layers, qualities, "quality")
        existing = current_masks(model)
        return {
            name: std_threshold_mask(layer.value, values[name], existing.get(name)) for name, layer in layers.items()
        }

    return rule


def global_sparsity_rule(sparsity: float, layer_patterns: list[str] | None = None) -> MaskRule:
    """One magnitude threshold across the chosen layers, sparsity rising geometrically per round.

    Args:
        sparsity: the final fraction of the chosen weights pruned.
        layer_patterns: globs of the layers (default: all).

    Returns:
        A MaskRule: rule(model, round, rounds) -> {weight name: keep-mask}.
    """

    def rule(model: nn.Module, round_index: int, rounds: int) -> dict[str, torch.Tensor]:
        layers = select_weights(model, layer_patterns)
        target = round_sparsities({"all": sparsity}, rounds)[round_index - 1]["all"]
        weights = {name: layer.value for name, layer in layers.items()}
        return global_sparsity_masks(weights, target, current_masks(model))

    return rule


def kept_fraction(model: nn.Module, names) -> float:
    """The fraction of the named layers' weights that are not zero.

    Args:
        model: the model.
        names: layer globs (None: all).

    Returns:
        The fraction.
    """
    layers = select_weights(model, names)
    kept = sum(int((layer.value != 0).sum()) for layer in layers.values())
    return kept / sum(layer.value.numel() for layer in layers.values())


def iterative_pruning(
    model: nn.Module,
    train_loader: DataLoader,
    validation_loader: DataLoader,
    rule: MaskRule,
    *,
    rounds: int,
    retrain: TrainConfig,
    device: str | torch.device = "cpu",
    task: Task | str | None = None,
    criterion: Callable | None = None,
    progress: bool = True,
) -> PruningHistory:
    """Prune `model` in place over `rounds` rounds, each pruning by `rule` then retraining.

    Retraining holds the masks for `retrain.epochs` epochs with the task's loss (or
    `criterion`). The task's validation metric (default classification's top-1) is logged after
    pruning and after retraining, round by round, with the kept fraction of the pruned layers.

    Args:
        model: the model, changed in place.
        train_loader: the retraining batches.
        validation_loader: the batches the metric is logged on.
        rule: the masks of each round.
        rounds: how many rounds.
        retrain: the retraining of each round.
        device: where to train.
        task: the task (default classification).
        criterion: a loss in place of the task's.
        progress: progress bars.

    Returns:
        The PruningHistory: the reference metric and each round's record.

    Raises:
        ConfigError: `rounds` is below 1.
    """
    if rounds < 1:
        raise ConfigError(f"rounds={rounds} should be at least 1")
    history = PruningHistory(reference_metric=evaluate(model, validation_loader, device, task).metric)
    for index in range(1, rounds + 1):
        started = time.perf_counter()
        masks = rule(model, index, rounds)
        apply_masks(model, masks)
        after_pruning = evaluate(model, validation_loader, device, task).metric
        if retrain.epochs:
            fit(
                model,
                train_loader,
                retrain,
                device=device,
                task=task,
                criterion=criterion,
                progress=progress,
                description=f"prune round {index}/{rounds}",
            )
        after_retraining = evaluate(model, validation_loader, device, task).metric
        targets = {name: 1.0 - mask.float().mean().item() for name, mask in masks.items()}
        record = RoundRecord(
            index,
            targets,
            kept_fraction(model, list(masks)),
            after_pruning,
            after_retraining,
            time.perf_counter() - started,
        )
        history.rounds.append(record)
        if progress:
            tqdm.write(
                f"round {index}/{rounds}: kept {100 * record.kept_fraction:.2f}% of weights, "
                f"validation metric {after_pruning:.4f} after pruning, {after_retraining:.4f} after retraining"
            )
    return history
