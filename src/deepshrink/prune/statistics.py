"""Per-layer pruning statistics: weights, weights% kept and FLOPs% kept (Han et al. 2015, Tables 1-2)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from deepshrink.layers import compressible_layers
from deepshrink.tables import render_table


@dataclass(frozen=True)
class LayerStatistics:
    name: str
    kind: str
    weights: int
    kept: int
    multiply_accumulates: int  # per example, for the dense layer

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.weights if self.weights else 0.0

    @property
    def kept_multiply_accumulates(self) -> float:
        # A multiply-accumulate is skipped exactly when its weight is zero, so the kept share of
        # the work equals the kept share of the weights for Linear and Conv layers alike.
        return self.multiply_accumulates * self.kept_fraction


def _multiply_accumulates(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    counts: dict[str, int] = {}
    handles = []

    def hook(name):
        def record(module, inputs, output):
            if isinstance(module, nn.Embedding):
                counts[name] = 0  # a lookup, not arithmetic
            elif isinstance(module, nn.Linear):
                counts[name] = module.in_features * module.out_features * (output.numel() // output.shape[-1])
            else:  # Conv1d / Conv2d: each output element costs (in_channels / groups) x kernel size
                weight = module.weight
                per_output = weight.shape[1] * int(torch.tensor(weight.shape[2:]).prod())
                counts[name] = per_output * output.numel()
            counts[name] //= max(example_input.shape[0], 1)

        return record

    for name, layer in compressible_layers(model).items():
        handles.append(layer.register_forward_hook(hook(name)))
    training = model.training
    try:  # in eval mode: a forward pass in training mode would move BatchNorm's statistics
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return counts


def layer_statistics(model: nn.Module, example_input: torch.Tensor) -> list[LayerStatistics]:
    """Counts for each supported layer; `example_input` is one batch, used to size the outputs."""
    device = next(model.parameters()).device
    macs = _multiply_accumulates(model, example_input.to(device))
    rows = []
    for name, layer in compressible_layers(model).items():
        weight = layer.weight.detach()
        rows.append(
            LayerStatistics(
                name=name,
                kind=type(layer).__name__,
                weights=weight.numel(),
                kept=int((weight != 0).sum()),
                multiply_accumulates=macs.get(name, 0),
            )
        )
    return rows


def totals(rows: list[LayerStatistics]) -> dict[str, float]:
    weights = sum(row.weights for row in rows)
    kept = sum(row.kept for row in rows)
    macs = sum(row.multiply_accumulates for row in rows)
    kept_macs = sum(row.kept_multiply_accumulates for row in rows)
    return {
        "weights": weights,
        "kept": kept,
        "kept_fraction": kept / weights if weights else 0.0,
        "compression": weights / kept if kept else float("inf"),
        "multiply_accumulates": macs,
        "kept_multiply_accumulates_fraction": kept_macs / macs if macs else 0.0,
    }


def format_table(rows: list[LayerStatistics], markdown: bool = False) -> str:
    """The Han et al. (2015) table: layer, weights, weights% kept, FLOPs% kept, and a total row."""
    summary = totals(rows)
    header = ["layer", "weights", "weights% kept", "FLOPs% kept"]
    body = [
        [
            row.name,
            f"{row.weights:,}",
            f"{100 * row.kept_fraction:.2f}%",
            f"{100 * row.kept_fraction:.2f}%" if row.multiply_accumulates else "-",
        ]
        for row in rows
    ]
    body.append(
        [
            "total",
            f"{summary['weights']:,}",
            f"{100 * summary['kept_fraction']:.2f}%",
            f"{100 * summary['kept_multiply_accumulates_fraction']:.2f}%",
        ]
    )
    return render_table(header, body, markdown)


def as_dicts(rows: list[LayerStatistics]) -> list[dict]:
    return [{**asdict(row), "kept_fraction": row.kept_fraction} for row in rows]


def from_dicts(rows: list[dict]) -> list[LayerStatistics]:
    """The rows `as_dicts` wrote (into a stage's log) back as LayerStatistics."""
    names = {item for item in LayerStatistics.__dataclass_fields__}
    return [LayerStatistics(**{key: value for key, value in row.items() if key in names}) for row in rows]
