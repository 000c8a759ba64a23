"""Dead units: after pruning, clear the biases of the units nothing reads or nothing feeds.

Sparse variational dropout, and heavy magnitude pruning, leave whole units of a Linear layer
dead: no weight of the next layer reads them (an empty column), or no weight feeds them (an
empty row). Their weights cost nothing in the sparse layout, but their biases are stored in
full. On LeNet-300-100 after variational dropout, 183 of fc1's 300 units are both, and their
biases are a tenth of the file. Two rewrites remove them without changing what the network
computes:

- a unit that the next layer does not read: its row of weights and its bias are set to zero;
- a unit that reads no input outputs a constant, f(bias) with f the elementwise functions
  between the two layers (ReLU, GELU, dropout, ...). That constant times the next layer's
  column is added to the next layer's bias, and the column is pruned, so the unit becomes one
  that is not read, and the first rule applies.

Both are exact only where the first layer's output reaches the second through elementwise
functions alone and goes nowhere else, so the pairs are found in the traced graph (torch.fx):
a model that cannot be traced is left as it is. Only Linear layers are paired: a convolution's
constant channel is not constant at a zero-padded border.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch import nn

from deepshrink.prune.module import only_pruned, prune_weight, pruning_mask_of

# Functions of one tensor that act on each element alone: a unit's constant output stays one
# constant through them. Dropout is the identity in eval mode, where the constant is taken.
ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
)
ELEMENTWISE_FUNCTIONS = {
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    F.softplus,
    F.dropout,
}
ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid"}


@dataclass
class DeadUnits:
    """What `clear_dead_units` did to one pair of layers."""

    layer: str  # the layer whose units died
    reader: str  # the layer that reads them
    unread: int  # units the reader does not read: row and bias cleared
    folded: int  # units that read nothing and were read: their constant moved into the reader's bias


@dataclass
class _Pair:
    layer: str
    reader: str
    chain: list  # the fx nodes between them, elementwise


def _elementwise(node, source, modules: dict[str, nn.Module]) -> bool:
    """Whether `node` applies an elementwise function to `source` and to nothing else."""
    import torch.fx

    tensor_arguments = [value for value in (*node.args, *node.kwargs.values()) if isinstance(value, torch.fx.Node)]
    if tensor_arguments != [source] or not node.args or node.args[0] is not source:
        return False
    if node.op == "call_module":
        return isinstance(modules.get(node.target), ELEMENTWISE_MODULES)
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in ELEMENTWISE_METHODS
    return False


def _pairs(model: nn.Module) -> list[_Pair]:
    """Linear layers whose output reaches another Linear layer through elementwise functions
    only and nowhere else, each layer called once, neither holding a tied weight (clearing a
    row or a column of one would change the tensor's other holders)."""
    from deepshrink.graph import trace
    from deepshrink.layers import tied_modules

    traced = trace(model)
    if traced is None:
        return []  # a model fx cannot trace keeps its biases
    modules, calls = dict(model.named_modules()), traced.calls
    tied = tied_modules(model)
    pairs = []
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Linear):
            continue
        chain, current = [], node
        while len(current.users) == 1:
            user = next(iter(current.users))
            if user.op == "call_module" and isinstance(modules.get(user.target), nn.Linear):
                once = calls[node.target] == calls[user.target] == 1
                untied = node.target not in tied and user.target not in tied
                if user.args == (current,) and not user.kwargs and once and untied:
                    pairs.append(_Pair(node.target, user.target, chain))
                break
            if not _elementwise(user, current, modules):
                break
            chain.append(user)
            current = user
    return pairs


def _apply_chain(chain: list, modules: dict[str, nn.Module], values: torch.Tensor) -> torch.Tensor:
    """The elementwise functions of `chain` applied to `values`, as the network would in eval mode."""
    for node in chain:
        rest = node.args[1:]
        if node.op == "call_module":
            module = modules[node.target]
            values = values if isinstance(module, nn.Dropout) else module(values)
        elif node.op == "call_function":
            kwargs = {key: value for key, value in node.kwargs.items() if key not in ("training", "inplace")}
            values = values if node.target is F.dropout else node.target(values, *rest, **kwargs)
        else:
            values = getattr(values, node.target)(*rest, **node.kwargs)
    return values


def _keep_mask(layer: nn.Linear) -> torch.Tensor:
    mask = pruning_mask_of(layer)
    return mask.mask.clone() if mask is not None else torch.ones_like(layer.weight, dtype=torch.bool)


@torch.no_grad()
def clear_dead_units(model: nn.Module) -> list[DeadUnits]:
    """Clear the biases (and rows) of the units that nothing reads, after folding the constant
    output of each unit that reads nothing into the next layer's bias. In place; outputs in eval
    mode stay the same within float rounding.

    Only pairs of Linear layers joined by elementwise functions in the traced graph are touched,
    and only where both layers' weights are plain or pruned (not yet shared), since rows and
    columns are pruned by tightening their masks.

    Args:
        model: the model, changed in place.

    Returns:
        One DeadUnits per pair of layers that had dead units.
    """
    modules = dict(model.named_modules())
    done = []
    for pair in _pairs(model):
        layer, reader = modules[pair.layer], modules[pair.reader]
        if layer.bias is None or not only_pruned(layer) or not only_pruned(reader):
            continue
        layer_keep, reader_keep = _keep_mask(layer), _keep_mask(reader)
        # The weights as the layers compute with them: a pruned entry is already zero.
        inputless = ~(layer.weight != 0).any(dim=1)
        read = (reader.weight != 0).any(dim=0)
        folded = inputless & read
        if reader.bias is None:
            folded[:] = False  # nowhere to put the constant: those units stay as they are
        if folded.any():
            # _apply_chain skips dropout; no other elementwise function depends on the mode.
            constant = _apply_chain(pair.chain, modules, layer.bias.detach().clone()[None])[0]
            reader.bias += reader.weight[:, folded] @ constant[folded]
            reader_keep[:, folded] = False
            prune_weight(reader, reader_keep)
        unread = ~read | folded
        if not unread.any():
            continue
        layer_keep[unread] = False
        prune_weight(layer, layer_keep)
        layer.bias[unread] = 0.0
        done.append(DeadUnits(pair.layer, pair.reader, int((~read).sum()), int(folded.sum())))
    return done
