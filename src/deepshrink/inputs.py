"""A batch's inputs, and how a model is called on them.

Most models take one tensor. A transformer encoder takes token ids and an attention mask, a
siamese network two images: their inputs are a dict of tensors, passed as keyword arguments
(`model(**inputs)`, the way Hugging Face models are called), or a tuple of tensors, passed as
positional arguments (`model(*inputs)`). Every tensor of one batch holds the same examples along
its first axis. Everything that runs a model on data (training, evaluation, the stages' probes,
the label-free targets, the distillation teacher) goes through `call`, so no other module asks
which form a batch's inputs have.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from deepshrink.errors import DataError, ModelError

# One tensor, a tuple of tensors (positional arguments) or a dict of tensors (keyword arguments).
Inputs = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


def is_several(inputs: Inputs) -> bool:
    """Whether `inputs` are several tensors (a tuple or a dict) rather than one.

    Args:
        inputs: a batch's inputs.

    Returns:
        True for a tuple, list or dict.
    """
    return not isinstance(inputs, torch.Tensor)


def tensors(inputs: Inputs) -> list[tuple[str, torch.Tensor]]:
    """The tensors of `inputs` with their names: the keyword, the position, or "x" for one tensor.

    Args:
        inputs: a batch's inputs.

    Returns:
        [(name, tensor)] in the order the model receives them.

    Raises:
        DataError: `inputs` are not a tensor, or a tuple or dict of tensors.
    """
    if isinstance(inputs, torch.Tensor):
        return [("x", inputs)]
    if isinstance(inputs, Mapping):
        named = list(inputs.items())
    elif isinstance(inputs, (tuple, list)):
        named = [(str(position), value) for position, value in enumerate(inputs)]
    else:
        raise DataError(
            f"a batch's inputs should be a tensor, a tuple of tensors (positional arguments) or a dict of tensors "
            f"(keyword arguments), not {type(inputs).__name__}"
        )
    if not named:
        raise DataError(f"a batch's inputs are an empty {type(inputs).__name__}; give at least one tensor")
    for name, value in named:
        if not isinstance(value, torch.Tensor):
            raise DataError(
                f"input {name!r} of a batch is a {type(value).__name__}, not a tensor: every input the model "
                "takes from the data should be a tensor with one row per example"
            )
    return named


def _rebuilt(inputs: Inputs, parts: list[torch.Tensor]) -> Inputs:
    """`parts` in the form of `inputs` (the same keys or positions)."""
    if isinstance(inputs, torch.Tensor):
        return parts[0]
    if isinstance(inputs, Mapping):
        return dict(zip(inputs.keys(), parts, strict=True))
    return tuple(parts)


def apply(inputs: Inputs, function) -> Inputs:
    """`function` applied to each tensor of `inputs`, in the same form.

    Args:
        inputs: a batch's inputs.
        function: tensor -> tensor.

    Returns:
        The new inputs.
    """
    return _rebuilt(inputs, [function(tensor) for _, tensor in tensors(inputs)])


def call(model: nn.Module, inputs: Inputs):
    """`model` run on `inputs`: one tensor as the argument, a tuple as positional arguments, a
    dict as keyword arguments.

    Args:
        model: the model (or any callable module).
        inputs: a batch's inputs.

    Returns:
        Whatever the model's forward returns.
    """
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def call_with(model: nn.Module, parameters: dict[str, torch.Tensor], inputs: Inputs):
    """`call` with some of the model's parameters and buffers replaced (torch.func.functional_call).

    Args:
        model: the model.
        parameters: {state_dict key: tensor} to use in place of the model's own.
        inputs: a batch's inputs.

    Returns:
        What the forward returns.
    """
    from torch.func import functional_call

    if isinstance(inputs, torch.Tensor):
        return functional_call(model, parameters, (inputs,))
    if isinstance(inputs, Mapping):
        return functional_call(model, parameters, (), dict(inputs))
    return functional_call(model, parameters, tuple(inputs))


def to_device(inputs: Inputs, device: str | torch.device, non_blocking: bool = False) -> Inputs:
    """`inputs` on `device`, in the same form.

    Args:
        inputs: a batch's inputs.
        device: where they go.
        non_blocking: passed to `Tensor.to`.

    Returns:
        The moved inputs.
    """
    return apply(inputs, lambda tensor: tensor.to(device, non_blocking=non_blocking))


def count(inputs: Inputs) -> int:
    """How many examples `inputs` hold: the length of their first axis, which every tensor shares.

    Args:
        inputs: a batch's inputs.

    Returns:
        The number of examples.

    Raises:
        DataError: a tensor without an example axis, or tensors of different lengths.
    """
    named = tensors(inputs)
    lengths = {}
    for name, tensor in named:
        if tensor.dim() == 0:
            raise DataError(f"input {name!r} is a single number; every input needs one row per example")
        lengths[name] = tensor.shape[0]
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name} {length}" for name, length in lengths.items())
        raise DataError(
            f"the inputs of one batch hold different numbers of examples ({described}); each should have one "
            "row per example"
        )
    return next(iter(lengths.values()))


def take(inputs: Inputs, index) -> Inputs:
    """The examples `index` selects (a slice, a list or a tensor of positions) from every tensor.

    Args:
        inputs: a batch's inputs.
        index: what selects along the first axis.

    Returns:
        The selected inputs, in the same form.
    """
    return apply(inputs, lambda tensor: tensor[index])


def concatenate(parts: list[Inputs]) -> Inputs:
    """Inputs of the same form joined along the example axis.

    Args:
        parts: inputs with the same keys or positions.

    Returns:
        One set of inputs holding every part's examples in order.
    """
    columns = zip(*(tensors(part) for part in parts), strict=True)
    return _rebuilt(parts[0], [torch.cat([tensor for _, tensor in column]) for column in columns])


def describe(inputs: Inputs) -> str:
    """The inputs' shapes and dtypes, for messages: "inputs of shape [2, 20], float32" or
    "inputs input_ids [2, 16] int64, attention_mask [2, 16] int64".

    Args:
        inputs: a batch's inputs.

    Returns:
        The description.
    """
    if isinstance(inputs, torch.Tensor):
        return f"inputs of shape {list(inputs.shape)}, {_dtype_name(inputs)}"
    parts = [f"{name} {list(tensor.shape)} {_dtype_name(tensor)}" for name, tensor in tensors(inputs)]
    return "inputs " + ", ".join(parts)


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def check_arguments(model: nn.Module, inputs: Inputs) -> None:
    """The data's inputs against what the model's forward takes, named before anything runs,
    where they would fail inside the first batch: a forward that needs token ids and a mask given
    one tensor, a keyword it has no parameter for, a required argument the data lacks.

    Args:
        model: the model.
        inputs: the first batch's inputs.

    Raises:
        ModelError: the inputs cannot be the forward's arguments; the message says how to give
            several inputs (arrays named x.NAME, or batches of ((a, b), targets) or ({...}, targets)).
    """
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a forward without a signature to read: the first batch will tell
        return
    positional_kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [item for item in parameters if item.kind in positional_kinds]
    takes_any_keyword = any(item.kind is item.VAR_KEYWORD for item in parameters)
    takes_any_positional = any(item.kind is item.VAR_POSITIONAL for item in parameters)
    required = [item.name for item in parameters if item.default is item.empty and item.kind in positional_kinds]
    required += [item.name for item in parameters if item.default is item.empty and item.kind is item.KEYWORD_ONLY]
    name = type(model).__name__
    how = (
        "give the data one array per argument, named x.ARGUMENT (e.g. x.input_ids and x.attention_mask, and "
        "x_test.input_ids ... for the test split) in the .npz or .safetensors file or the dict of arrays, or "
        "DataLoader batches of ({'input_ids': ..., 'attention_mask': ...}, targets)"
    )
    if isinstance(inputs, torch.Tensor):
        if len(required) > 1:
            raise ModelError(
                f"{name}.forward needs {len(required)} arguments ({', '.join(required)}), and the data gives one "
                f"input tensor: {how}"
            )
        return
    if isinstance(inputs, Mapping):
        known = {item.name for item in parameters if item.kind is not item.POSITIONAL_ONLY}
        unknown = [key for key in inputs if key not in known]
        if unknown and not takes_any_keyword:
            raise ModelError(
                f"the data's inputs {', '.join(map(repr, unknown))} are not arguments of {name}.forward "
                f"(it takes {', '.join(item.name for item in parameters) or 'none'}): name each input array "
                "after the argument it fills (x.NAME)"
            )
        missing = [argument for argument in required if argument not in inputs]
        if missing:
            raise ModelError(
                f"{name}.forward needs {', '.join(map(repr, missing))}, which the data does not give (it gives "
                f"{', '.join(map(repr, inputs))}): add an array named x.{missing[0]}"
            )
        return
    given = len(inputs)
    if given > len(positional) and not takes_any_positional:
        raise ModelError(
            f"the data gives {given} inputs and {name}.forward takes at most {len(positional)} "
            f"({', '.join(item.name for item in positional) or 'none'}): give one input per argument"
        )
    missing = required[given:]
    if missing:
        raise ModelError(
            f"{name}.forward needs {len(required)} arguments ({', '.join(required)}), and the data gives {given}: {how}"
        )


class Examples(Dataset):
    """In-memory examples whose inputs are several tensors (a dict or a tuple), with targets or
    without: what `TensorDataset` is for one input tensor. Indexing with a list of positions
    gathers a whole batch at once, as `make_loader` does.

    Args:
        inputs: a dict or tuple of tensors, one row per example in each.
        targets: one target per example, or None for data without targets.

    Raises:
        DataError: the tensors hold different numbers of examples, or the targets another.
    """

    def __init__(self, inputs: Inputs, targets: torch.Tensor | None = None) -> None:
        self.inputs = _rebuilt(inputs, [tensor for _, tensor in tensors(inputs)])
        self.targets = targets
        self.length = count(self.inputs)
        if targets is not None and len(targets) != self.length:
            raise DataError(f"the inputs hold {self.length} examples and the targets {len(targets)}; give one each")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        selected = take(self.inputs, index)
        return (selected,) if self.targets is None else (selected, self.targets[index])


def inputs_of(examples) -> Inputs:
    """All the inputs of an in-memory data set: a TensorDataset's first tensor, or an Examples'
    inputs.

    Args:
        examples: a TensorDataset or Examples.

    Returns:
        The inputs.
    """
    return examples.inputs if isinstance(examples, Examples) else examples.tensors[0]


def targets_of(examples) -> torch.Tensor | None:
    """All the targets of an in-memory data set, or None when it holds inputs only.

    Args:
        examples: a TensorDataset or Examples.

    Returns:
        The targets, or None.
    """
    if isinstance(examples, Examples):
        return examples.targets
    return examples.tensors[1] if len(examples.tensors) > 1 else None


def in_memory(inputs: Inputs, targets: torch.Tensor | None = None):
    """The in-memory data set of `inputs` (and `targets`): a TensorDataset for one input tensor,
    Examples for several.

    Args:
        inputs: the inputs.
        targets: their targets, or None.

    Returns:
        A TensorDataset or Examples.
    """
    if isinstance(inputs, torch.Tensor):
        parts = (inputs,) if targets is None else (inputs, targets)
        return torch.utils.data.TensorDataset(*parts)
    return Examples(inputs, targets)


def first(examples, number: int):
    """The first `number` examples of an in-memory data set, as the same kind of data set.

    Args:
        examples: a TensorDataset or Examples.
        number: how many to keep.

    Returns:
        The shortened data set.
    """
    targets = targets_of(examples)
    return in_memory(take(inputs_of(examples), slice(0, number)), None if targets is None else targets[:number])
