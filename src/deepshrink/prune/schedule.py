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
from deepshrink.layers import select_layers
from deepshrink.prune.masks import sparsity_mask, std_threshold_mask
from deepshrink.prune.module import apply_masks, current_masks
from deepshrink.train import TrainConfig, evaluate, fit


@dataclass
class RoundRecord:
    round: int
    targets: dict[str, float]
    kept_fraction: float
    accuracy_after_pruning: float
    accuracy_after_retraining: float
    seconds: float


@dataclass
class PruningHistory:
    reference_accuracy: float
    rounds: list[RoundRecord] = field(default_factory=list)


def round_sparsities(final: Mapping[str, float], rounds: int) -> list[dict[str, float]]:
    """Per-round targets that shrink the kept fraction geometrically: density_r = density^(r/R).

    Each round then removes the same share of what is left, which keeps the accuracy lost per
    round (and so the retraining needed) roughly even.
    """
    if rounds < 1:
        raise ConfigError(f"rounds={rounds} should be at least 1")
    return [
        {name: 1.0 - (1.0 - sparsity) ** (step / rounds) for name, sparsity in final.items()}
        for step in range(1, rounds + 1)
    ]


def magnitude_masks(
    model: nn.Module, sparsities: Mapping[str, float] | None = None, qualities: Mapping[str, float] | None = None
) -> dict[str, torch.Tensor]:
    """Masks for the named layers by target sparsity or by Han's std rule, tightening current masks."""
    layers = select_layers(model, list((sparsities or {}) | (qualities or {})))
    existing = current_masks(model)
    masks = {}
    for name, layer in layers.items():
        weight = layer.weight.detach()
        if sparsities and name in sparsities:
            masks[name] = sparsity_mask(weight, sparsities[name], existing.get(name))
        else:
            masks[name] = std_threshold_mask(weight, qualities[name], existing.get(name))
    return masks


def kept_fraction(model: nn.Module, names) -> float:
    layers = select_layers(model, names)
    kept = sum(int((layer.weight != 0).sum()) for layer in layers.values())
    return kept / sum(layer.weight.numel() for layer in layers.values())


def iterative_pruning(
    model: nn.Module,
    train_loader: DataLoader,
    validation_loader: DataLoader,
    final_sparsities: Mapping[str, float],
    *,
    rounds: int,
    retrain: TrainConfig,
    device: str | torch.device = "cpu",
    criterion: Callable | None = None,
    progress: bool = True,
) -> PruningHistory:
    """Prune `model` in place to `final_sparsities` ({layer: sparsity}) over `rounds` rounds.

    Each round prunes by magnitude to that round's target, then retrains with the masks held
    for `retrain.epochs` epochs. Validation accuracy is logged after pruning and after
    retraining, round by round.
    """
    history = PruningHistory(reference_accuracy=evaluate(model, validation_loader, device).accuracy)
    names = list(final_sparsities)
    for index, targets in enumerate(round_sparsities(final_sparsities, rounds), start=1):
        started = time.perf_counter()
        apply_masks(model, magnitude_masks(model, sparsities=targets))
        after_pruning = evaluate(model, validation_loader, device).accuracy
        if retrain.epochs:
            fit(model, train_loader, retrain, device=device, criterion=criterion, progress=progress,
                description=f"prune round {index}/{rounds}")
        after_retraining = evaluate(model, validation_loader, device).accuracy
        record = RoundRecord(index, targets, kept_fraction(model, names), after_pruning, after_retraining,
                             time.perf_counter() - started)
        history.rounds.append(record)
        if progress:
            tqdm.write(
                f"round {index}/{rounds}: kept {100 * record.kept_fraction:.2f}% of weights, "
                f"val acc {after_pruning:.4f} after pruning, {after_retraining:.4f} after retraining"
            )
    return history
