"""The model's dataflow, where torch.fx can trace it: what rewrites that must be exact (BatchNorm
folding, clearing dead units) check before they touch a layer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class Traced:
    """A model's traced graph and how often it calls each submodule."""

    graph: object  # torch.fx.Graph
    calls: dict[str, int]  # module name -> call sites: a module called twice shares its weights


def trace(model: nn.Module) -> Traced | None:
    """The traced graph of `model`, or None when torch.fx cannot trace it (control flow on
    tensor values, unsupported calls).

    Args:
        model: the model.

    Returns:
        The Traced graph and call counts, or None.
    """
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any tracing failure means the same: no graph to check against
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return Traced(graph, calls)
