"""Sensitivity analysis: the task's validation metric against sparsity for each layer alone, no
retraining.

Han et al. (2015, Figure 5) chose each layer's pruning threshold from such curves by hand. Here
the curves also answer the question directly: for an allowed drop of the metric, the largest
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
from deepshrink.layers import select_weights
from deepshrink.progress import progress_bar
from deepshrink.prune.masks import sparsity_mask
from deepshrink.prune.module import pruning_mask_of
from deepshrink.tables import render_table
from deepshrink.tasks import Task, resolve_task
from deepshrink.train import evaluate

DEFAULT_SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)


@dataclass
class SensitivityResult:
    """The metric with no layer pruned (`baseline`), the sparsities tried, and per layer the
    metric at each sparsity; `metric_name` and `higher_is_better` come from the task."""

    baseline: float
    sparsities: list[float]
    metric: dict[str, list[float]] = field(default_factory=dict)  # layer -> metric per sparsity
    metric_name: str = "top-1 accuracy"
    higher_is_better: bool = True

    def suggest(self, max_drop: float) -> dict[str, float]:
        """Per layer, the largest measured sparsity whose metric is at most `max_drop` worse than
        the baseline (in the metric's units: 0.005 is half a point of accuracy).

        The drops of layers pruned together roughly add up, so a total budget is best split
        among the layers (pass max_drop = budget / number of layers) and then retrained.

        Args:
            max_drop: the largest drop allowed per layer.

        Returns:
            {layer name: sparsity} (0.0 where none is within the drop).

        Raises:
            ConfigError: `max_drop` is negative.
        """
        if not max_drop >= 0:
            raise ConfigError(f"max_drop={max_drop!r} should be a non-negative change of the metric, e.g. 0.005")
        sign = 1.0 if self.higher_is_better else -1.0
        suggestion = {}
        for name, values in self.metric.items():
            allowed = [
                sparsity
                for sparsity, value in zip(self.sparsities, values, strict=True)
                if sign * (self.baseline - value) <= max_drop
            ]
            suggestion[name] = max(allowed, default=0.0)
        return suggestion

    def to_dict(self) -> dict:
        """The result as JSON-ready data (sensitivity.json).

        Returns:
            {"metric_name", "higher_is_better", "baseline", "sparsities", "metric"}.
        """
        return {
            "metric_name": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "baseline": self.baseline,
            "sparsities": self.sparsities,
            "metric": self.metric,
        }


def sensitivity_analysis(
    model: nn.Module,
    loader: DataLoader,
    layer_names: list[str] | None = None,
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES,
    *,
    device: str | torch.device = "cpu",
    task: Task | str | None = None,
    progress: bool = True,
) -> SensitivityResult:
    """Prune each layer alone by magnitude at each sparsity and measure the task's metric
    (default classification's top-1 accuracy) on `loader`.

    The model is restored after each measurement; a layer that is already pruned keeps its
    mask and is pruned further from there.

    Args:
        model: the model; restored after each measurement.
        loader: the batches to measure on.
        layer_names: globs of the layers (default: all).
        sparsities: the sparsities to try.
        device: where to evaluate.
        task: the task (default classification).
        progress: a progress bar.

    Returns:
        The SensitivityResult.
    """
    task = resolve_task(task)
    layers = select_weights(model, layer_names)
    result = SensitivityResult(
        evaluate(model, loader, device, task).metric,
        list(sparsities),
        metric_name=task.metric.name,
        higher_is_better=task.metric.higher_is_better,
    )
    total = len(layers) * len(sparsities)
    bar = progress_bar(total=total, desc="sensitivity", leave=False, enabled=progress)
    for name, layer in layers.items():
        weight = layer.original()
        existing = pruning_mask_of(layer)
        current = existing.mask if existing is not None else None
        saved = weight.detach().clone()
        values = []
        for sparsity in sparsities:
            with torch.no_grad():
                weight.mul_(sparsity_mask(saved, sparsity, current))
            values.append(evaluate(model, loader, device, task).metric)
            with torch.no_grad():
                weight.copy_(saved)
            bar.update(1)
        result.metric[name] = values
    bar.close()
    return result


def format_sensitivity(result: SensitivityResult, markdown: bool = False) -> str:
    """The metric per sparsity (rows) and layer (columns).

    Args:
        result: the analysis.
        markdown: a Markdown table.

    Returns:
        The table.
    """
    header = [f"sparsity ({result.metric_name})", *result.metric]
    rows = [
        [f"{100 * sparsity:.0f}%", *(f"{result.metric[name][index]:.4f}" for name in result.metric)]
        for index, sparsity in enumerate(result.sparsities)
    ]
    return render_table(header, rows, markdown)


def write_sensitivity_json(result: SensitivityResult, path: str | Path) -> Path:
    """Write the analysis as JSON, atomically.

    Args:
        result: the analysis.
        path: the file.

    Returns:
        `path` as a Path.

    Raises:
        OutputError: `path` cannot be written.
    """
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(result.to_dict(), indent=2))
    return Path(path)
