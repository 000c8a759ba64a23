"""Sensitivity analysis: validation accuracy against sparsity for each layer alone, no retraining.

Han et al. (2015, Figure 5) chose each layer's pruning threshold from such curves by hand. Here
the curves also answer the question directly: for an allowed accuracy drop, the largest
sparsity of each layer that stays within it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from deepshrink.errors import ConfigError
from deepshrink.files import atomic_output
from deepshrink.layers import select_layers
from deepshrink.progress import progress_bar
from deepshrink.prune.masks import sparsity_mask
from deepshrink.prune.module import original_weight, pruning_mask_of
from deepshrink.tables import render_table
from deepshrink.train import evaluate

DEFAULT_SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)


@dataclass
class SensitivityResult:
    baseline_accuracy: float
    sparsities: list[float]
    accuracy: dict[str, list[float]] = field(default_factory=dict)  # layer -> accuracy per sparsity

    def suggest(self, max_drop: float) -> dict[str, float]:
        """Per layer, the largest measured sparsity whose accuracy drop is at most `max_drop`.

        The drops of layers pruned together roughly add up, so a total budget is best split
        among the layers (pass max_drop = budget / number of layers) and then retrained.
        """
        if not 0 <= max_drop < 1:
            raise ConfigError(f"max_drop={max_drop!r} should be a fraction of accuracy in [0, 1), e.g. 0.005")
        suggestion = {}
        for name, accuracies in self.accuracy.items():
            allowed = [
                s for s, a in zip(self.sparsities, accuracies, strict=True) if self.baseline_accuracy - a <= max_drop
            ]
            suggestion[name] = max(allowed, default=0.0)
        return suggestion

    def to_dict(self) -> dict:
        return {"baseline_accuracy": self.baseline_accuracy, "sparsities": self.sparsities, "accuracy": self.accuracy}


def sensitivity_analysis(
    model: nn.Module,
    loader: DataLoader,
    layer_names: list[str] | None = None,
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> SensitivityResult:
    """Prune each layer alone by magnitude at each sparsity and measure accuracy on `loader`.

    The model is restored after each measurement; a layer that is already pruned keeps its
    mask and is pruned further from there.
    """
    layers = select_layers(model, layer_names)
    result = SensitivityResult(evaluate(model, loader, device).accuracy, list(sparsities))
    total = len(layers) * len(sparsities)
    bar = progress_bar(total=total, desc="sensitivity", leave=False, enabled=progress)
    for name, layer in layers.items():
        weight = original_weight(layer)
        existing = pruning_mask_of(layer)
        current = existing.mask if existing is not None else None
        saved = weight.detach().clone()
        accuracies = []
        for sparsity in sparsities:
            with torch.no_grad():
                weight.mul_(sparsity_mask(saved, sparsity, current))
            accuracies.append(evaluate(model, loader, device).accuracy)
            with torch.no_grad():
                weight.copy_(saved)
            bar.update(1)
        result.accuracy[name] = accuracies
    bar.close()
    return result


def format_sensitivity(result: SensitivityResult, markdown: bool = False) -> str:
    header = ["sparsity", *result.accuracy]
    rows = [
        [f"{100 * s:.0f}%", *(f"{100 * result.accuracy[n][i]:.2f}" for n in result.accuracy)]
        for i, s in enumerate(result.sparsities)
    ]
    return render_table(header, rows, markdown)


def write_sensitivity_json(result: SensitivityResult, path: str | Path) -> Path:
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(result.to_dict(), indent=2))
    return Path(path)
