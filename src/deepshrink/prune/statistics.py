"""Per-layer pruning statistics: weights, weights% kept and FLOPs% kept (Han et al. 2015, Tables 1-2)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from deepshrink.inputs import Inputs, call, count, to_device
from deepshrink.layers import READS_CHILD_WEIGHTS, Weight, compressible_weights
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
        """The fraction of the weights not zero."""
        return self.kept / self.weights if self.weights else 0.0

    @property
    def kept_multiply_accumulates(self) -> float:
        # A multiply-accumulate is skipped exactly when its weight is zero, so the kept share of
        # the work equals the kept share of the weights for Linear and Conv layers alike.
        """The multiply-accumulates of the weights not zero."""
        return self.multiply_accumulates * self.kept_fraction


def _vectors(tensor, width: int) -> int:
    """How many vectors of `width` features `tensor` (or a PackedSequence's data) holds."""
    data = tensor.data if isinstance(tensor, nn.utils.rnn.PackedSequence) else tensor
    return data.numel() // max(width, 1)


def _weight_macs(weight: Weight, inputs: tuple, output) -> int:
    """Multiply-accumulates of one forward pass through `weight`, for the whole batch."""
    module, value = weight.module, weight.value
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return 0  # a lookup, not arithmetic
    if isinstance(module, nn.Linear):
        return value.numel() * _vectors(output, module.out_features)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # each input element meets (out / groups) x kernel
        return inputs[0].numel() * value[0].numel()
    if isinstance(module, nn.modules.conv._ConvNd):  # each output element costs (in / groups) x kernel
        return output.numel() * value[0].numel()
    if isinstance(module, nn.RNNBase | nn.RNNCellBase):  # each matrix once per time step of each sequence
        return value.numel() * _vectors(inputs[0], module.input_size)
    if isinstance(module, nn.MultiheadAttention):  # the projections apply once per query / key position
        return value.numel() * _vectors(inputs[0], module.embed_dim)
    # A module of a type we do not know (GPT-2's Conv1D, a Bilinear, a user's layer): counted as a
    # dense map, every weight once per output vector, where the output's last axis is one of the
    # weight's sides; otherwise its arithmetic is not counted, rather than guessed.
    if isinstance(output, torch.Tensor) and output.dim() >= 1 and value.dim() >= 2:
        width = output.shape[-1]
        if width in (value.shape[0], value.shape[-1]):
            return value.numel() * _vectors(output, width)
    return 0


def _multiply_accumulates(model: nn.Module, example_input: Inputs) -> dict[str, int]:
    counts: dict[str, int] = {}
    handles = []
    # Each module that holds a weight, with the weights it holds there: a tied weight's
    # arithmetic is counted in every holder (an output layer reading an embedding's matrix).
    by_module: dict[int, tuple[nn.Module, list[tuple[str, Weight]]]] = {}
    for weight in compressible_weights(model).values():
        holders = [weight] + [Weight(alias.module_name, alias.module, alias.tensor) for alias in weight.aliases]
        for holder in holders:
            by_module.setdefault(id(holder.module), (holder.module, []))[1].append((weight.name, holder))

    fired: set[int] = set()

    def record(module, inputs, output):
        fired.add(id(module))
        output = output[0] if isinstance(output, tuple) else output
        for name, holder in by_module[id(module)][1]:
            macs = _weight_macs(holder, inputs, output) // max(examples, 1)
            counts[name] = counts.get(name, 0) + macs

    # Attention and Transformer layers read their children's weights as tensors (and, on their
    # fast path, their own): a holder whose forward never ran is counted at the innermost such
    # module around it, each weight once per vector of that module's first input.
    positions: dict[str, int] = {}
    readers = {name: module for name, module in model.named_modules() if isinstance(module, READS_CHILD_WEIGHTS)}

    def record_positions(name):
        def hook(module, inputs, output):
            if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() >= 1:
                positions[name] = positions.get(name, 0) + _vectors(inputs[0], inputs[0].shape[-1])

        return hook

    examples = count(example_input)
    for module, _ in by_module.values():
        handles.append(module.register_forward_hook(record))
    for name, module in readers.items():
        handles.append(module.register_forward_hook(record_positions(name)))
    training = model.training
    try:  # in eval mode: a forward pass in training mode would move BatchNorm's statistics
        with torch.no_grad():
            call(model.eval(), example_input)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    for module, holders in by_module.values():
        if id(module) in fired:
            continue
        for name, holder in holders:
            around = [reader for reader in positions if reader == "" or holder.module_name.startswith(f"{reader}.")]
            if around and isinstance(module, nn.Linear | nn.MultiheadAttention):
                innermost = max(around, key=len)
                counts[name] = counts.get(name, 0) + holder.value.numel() * positions[innermost] // max(examples, 1)
    return counts


def layer_statistics(model: nn.Module, example_input: Inputs | None) -> list[LayerStatistics]:
    """Counts for each supported layer; `example_input` is one batch, used to size the outputs
    (None: no multiply-accumulates are counted).

    Args:
        model: the model.
        example_input: one batch's inputs (a tensor, or a tuple or dict of them), or None.

    Returns:
        One LayerStatistics per compressible weight.
    """
    device = next(model.parameters()).device
    macs = _multiply_accumulates(model, to_device(example_input, device)) if example_input is not None else {}
    rows = []
    for name, layer in compressible_weights(model).items():
        weight = layer.value.detach()
        rows.append(
            LayerStatistics(
                name=name,
                kind=layer.kind,
                weights=weight.numel(),
                kept=int((weight != 0).sum()),
                multiply_accumulates=macs.get(name, 0),
            )
        )
    return rows


def totals(rows: list[LayerStatistics]) -> dict[str, float]:
    """The whole model's counts from its rows.

    Args:
        rows: from layer_statistics.

    Returns:
        {"weights", "kept", "kept_fraction", "compression", "multiply_accumulates",
        "kept_multiply_accumulates_fraction"}.
    """
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
    """The Han et al. (2015) table: layer, weights, weights% kept, FLOPs% kept, and a total row.

    Args:
        rows: from layer_statistics.
        markdown: a Markdown table.

    Returns:
        The table.
    """
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
    """The rows as JSON-ready dicts (with the kept fraction), for a stage's log.

    Args:
        rows: from layer_statistics.

    Returns:
        One dict per row.
    """
    return [{**asdict(row), "kept_fraction": row.kept_fraction} for row in rows]


def from_dicts(rows: list[dict]) -> list[LayerStatistics]:
    """The rows `as_dicts` wrote (into a stage's log) back as LayerStatistics.

    Args:
        rows: the dicts.

    Returns:
        The LayerStatistics.
    """
    names = {item for item in LayerStatistics.__dataclass_fields__}
    return [LayerStatistics(**{key: value for key, value in row.items() if key in names}) for row in rows]
