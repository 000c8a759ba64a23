"""Load a .dcz file into a model whose Linear and Conv2d layers run from the compressed form.

Each weight-shared Linear / Conv2d goes from its entropy-coded streams straight to codebook CSR; in
"sparse" mode the dense float weights are never built. In "auto" mode each candidate Linear
layer is timed at load and runs, per range of batch sizes, whichever of the compressed form,
torch's CSR product and the dense product was fastest (runtime/choice.py); a layer where dense
wins everywhere stays a plain nn.Linear. Modes can be set per layer by glob.

Every other weight-shared tensor (recurrent and attention matrices, Conv1d/3d, transposed
convolutions, embeddings, and the Linear layers inside attention and transformer modules, which
torch reads as tensors rather than calling) is decoded to its dense values and runs in torch.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

# Imported here, not first inside load_runtime (through model_for): a module's first import
# allocates, and the memory test traces load_runtime to count the compressed form alone.
from deepshrink import lowrank, models  # noqa: E402, F401
from deepshrink.compressed import open_compressed
from deepshrink.encode.codec import SharedParts, decode_record_parts
from deepshrink.encode.sparse import as_matrix
from deepshrink.errors import ConfigError, FormatError
from deepshrink.layers import called_by_its_parents, matching
from deepshrink.loading import check_tensors_fit, model_for
from deepshrink.runtime.bench import example_inputs
from deepshrink.runtime.choice import LayerChoice, choice_like, measure_conv, measure_linear, measurement_key
from deepshrink.runtime.forms import CodebookWeight
from deepshrink.runtime.kernels import csr_from_layout
from deepshrink.runtime.modules import SPARSE_DENSITY_LIMIT, CompressedConv2d, CompressedLinear

MODES = ("auto", "sparse", "dense")


def _codebook_weight(parts: SharedParts, nonzeros: int) -> CodebookWeight:
    rows, columns = as_matrix(parts.shape)
    if parts.sparse is not None:
        indptr, indices, codes = csr_from_layout(parts.sparse, nonzeros)
    else:  # a dense layout: its codes (not float weights) are already in memory
        matrix = parts.codes.reshape(rows, columns).astype(np.int64)
        row_index, indices = np.nonzero(parts.codebook[matrix] != 0)
        codes = matrix[row_index, indices]
        if len(codes) != nonzeros:
            raise FormatError(f"{len(codes)} non-zero weights, {nonzeros} declared")
        indptr = np.concatenate(([0], np.cumsum(np.bincount(row_index, minlength=rows))))
        indices = indices.astype(np.uint16 if columns <= 1 << 16 else np.int32)
        codes = codes.astype(np.uint8 if len(parts.codebook) <= 256 else np.uint16)
    return CodebookWeight(indptr, indices, codes, parts.codebook, (rows, columns))


def replaceable_modules(model: nn.Module) -> set[str]:
    """Names of the Linear / Conv2d modules that the runtime may swap for compressed ones: those
    that no ancestor reads as tensors.

    Args:
        model: the model.

    Returns:
        The module names.
    """
    return {
        name
        for name, module in model.named_modules()
        if name and isinstance(module, nn.Linear | nn.Conv2d) and called_by_its_parents(model, name)
    }


def _mode_for(name: str, modes: dict[str, str]) -> str:
    """The mode of the last glob that matches `name` (later entries win), "auto" when none does."""
    chosen = "auto"
    for pattern, mode in modes.items():
        if matching(pattern, [name]):
            chosen = mode
    return chosen


def _may_run_compressed(
    weight: CodebookWeight, layer: nn.Module, density_limit: float, input_sizes: dict[nn.Module, tuple] | None = None
) -> bool:
    """Auto mode: whether a layer is worth measuring compressed at all.

    - A Linear layer: sparse enough (density at most `density_limit`) and its compressed form
      smaller than the dense float32 weight (index overhead can outgrow a small layer). Which
      product it then runs for each batch range is measured at load (runtime/choice.py).
    - A convolution (groups 1) likewise, but only when its input size is known (`input_sizes`,
      from load_runtime's `input_shape`): im2col turns a batch-1 convolution into a product
      with one column per output position, where oneDNN's direct convolution is mostly faster
      (benchmarks/conv_speed.py: LeNet-5's conv2 0.72-0.90x, 64->128 3x3 on 14x14 0.49-0.53x;
      ahead only for deep layers on few positions at 10% density, 1.17-1.28x), and which it is
      depends on that size. Without it convolutions run dense; mode="sparse" still runs them
      from the compressed form, for the memory.
    """
    if isinstance(layer, nn.Conv2d):
        if input_sizes is None or layer not in input_sizes or layer.groups != 1 or isinstance(layer.padding, str):
            return False
    elif not isinstance(layer, nn.Linear):
        return False
    return weight.density <= density_limit and weight.nbytes < weight.shape[0] * weight.shape[1] * 4


def _convolution_input_sizes(
    model: nn.Module, input_shape: tuple[int, ...], input_dtype: str = "float32"
) -> dict[nn.Module, tuple]:
    """Each Conv2d layer's input size (channels, height, width) in a forward pass of one example
    of `input_shape` (shapes only: the weights need not be loaded yet)."""
    sizes: dict[nn.Module, tuple] = {}

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:  # None: the output stays
        sizes.setdefault(module, tuple(inputs[0].shape[1:]))

    hooks = [module.register_forward_hook(record) for module in model.modules() if isinstance(module, nn.Conv2d)]
    try:
        with torch.no_grad():
            model.eval()(example_inputs(1, input_shape, input_dtype).zero_())
    except (RuntimeError, ValueError, IndexError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"input shape {' '.join(map(str, input_shape))} does not fit {type(model).__name__} ({first}); "
            "give one example's shape without the batch, e.g. 1 28 28"
        ) from error
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def load_runtime(
    path: str | os.PathLike,
    model: nn.Module | str | None = None,
    *,
    mode: str | dict[str, str] = "auto",
    density_limit: float = SPARSE_DENSITY_LIMIT,
    max_decoded_bytes: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    input_dtype: str | None = None,
) -> nn.Module:
    """The model of a .dcz file with its shared Linear / Conv2d layers computing from codebook indices.

    Every field of the file, and every tensor's shape against the model, is checked before
    anything is decoded.

    Args:
        path: the .dcz file.
        model: a module of the right architecture, a registered name or package.module:factory
            (default: the name the file records; a factory is imported only when passed here).
        mode: "auto": Linear layers whose density is at most `density_limit` and whose
            compressed form is smaller than the dense weight are timed at load, and each range
            of batch sizes runs the fastest of the compressed form, torch's CSR product and the
            dense product (runtime/choice.py); convolutions likewise (compressed or dense) when
            `input_shape` is given, else dense. "sparse": every shared
            layer compressed (the least memory). "dense". Or a {layer glob: mode} mapping.
        density_limit: the density up to which "auto" considers a Linear layer.
        max_decoded_bytes: see `load_compressed`.
        input_shape: one example's shape (no batch dimension), so that auto mode can time the
            convolutions on their real input sizes.
        input_dtype: the inputs' dtype name ("int64" for token ids); default the one the file
            records, else "float32".

    Returns:
        The model in eval mode on the CPU, with CompressedLinear / CompressedConv2d layers.

    Raises:
        ConfigError: an unknown mode, or an input shape the model does not take.
        FormatError: a malformed file, or tensors that do not fit the model.
        ModelError: no model can be built.
    """
    modes = {"*": mode} if isinstance(mode, str) else dict(mode)
    for pattern, value in modes.items():
        if value not in MODES:
            raise ConfigError(f"mode {value!r} for {pattern!r} should be one of {', '.join(MODES)}")
    loaded, checked = open_compressed(path, max_decoded_bytes)
    metadata = checked.metadata
    model, _ = model_for(path, model, metadata.get("model"), metadata=metadata, error=FormatError)
    check_tensors_fit({record["name"]: record["shape"] for record in checked.records}, model, path, FormatError)
    replaceable = replaceable_modules(model)
    input_dtype = input_dtype or metadata.get("input_dtype", "float32")
    if input_dtype not in ("float32", "float64", "int64", "int32"):
        raise ConfigError(f"input_dtype={input_dtype!r} should be float32, float64, int64 or int32")
    input_sizes = _convolution_input_sizes(model, tuple(input_shape), input_dtype) if input_shape is not None else None
    state: dict[str, torch.Tensor] = {}
    compressed: dict[str, CodebookWeight] = {}
    choices: dict[str, LayerChoice] = {}
    measured: dict[tuple, LayerChoice] = {}  # by measurement_key: layers alike are timed once
    # A "same" record (one tensor under two names) reuses the parts of the record it names; only
    # those are kept past their own record, so a large file's parts are not all held at once.
    by_name = {record["name"]: record for record in checked.records}
    named = {record["as"] for record in checked.records if record["encoding"] == "same"}
    # One tensor under several names (tied weights): where one holder must hold it dense (an
    # Embedding reads its rows), every holder runs dense on that one tensor, rather than a
    # Linear keeping a compressed copy beside it.
    holders: dict[str, list[str]] = {}
    for record in checked.records:
        if record["encoding"] == "same":
            holders.setdefault(record["as"], [record["as"]]).append(record["name"])
    dense_ties = {
        name
        for group in holders.values()
        if not all(member.endswith(".weight") and member.removesuffix(".weight") in replaceable for member in group)
        for name in group
    }
    kept: dict[str, torch.Tensor | SharedParts] = {}
    for record in checked.records:
        name = record["name"]
        source = by_name[record["as"]] if record["encoding"] == "same" else record
        try:
            parts = kept[source["name"]] if source is not record else decode_record_parts(source, loaded.buffers)
            if name in named:
                kept[name] = parts
            if not isinstance(parts, SharedParts):
                state[name] = parts
                continue
            weight = _codebook_weight(parts, source["nonzeros"])
        except (FormatError, ConfigError) as error:
            raise FormatError(f"{path}: {name}: {error}") from error
        owner = name.removesuffix(".weight")
        layer = model.get_submodule(owner) if name.endswith(".weight") and owner in replaceable else None
        layer_mode = _mode_for(owner, modes)
        runs_sparse = layer is not None and (
            layer_mode == "sparse"
            or (
                layer_mode == "auto"
                and name not in dense_ties
                and _may_run_compressed(weight, layer, density_limit, input_sizes)
            )
        )
        if runs_sparse and isinstance(layer, nn.Conv2d) and layer.groups != 1:
            runs_sparse = False  # grouped convolutions run dense
        if runs_sparse and layer_mode == "auto":  # which product each batch range runs
            convolution = isinstance(layer, nn.Conv2d)
            geometry = (input_sizes[layer], layer.stride, layer.padding, layer.dilation) if convolution else ()
            key = measurement_key(weight, *geometry)
            if key in measured:
                choices[owner] = choice_like(measured[key], weight, layer.weight.shape if convolution else None)
            else:
                if convolution:
                    choices[owner] = measure_conv(weight, layer, input_sizes[layer])
                else:
                    choices[owner] = measure_linear(weight)
                measured[key] = choices[owner]
            runs_sparse = not choices[owner].all_dense
        if runs_sparse:
            compressed[owner] = weight
        else:
            state[name] = weight.to_dense().reshape(parts.shape)
    # Load everything else (biases, dense layers) into the model, then swap the sparse layers in.
    model.load_state_dict(state, strict=False)
    for owner, weight in compressed.items():
        layer = model.get_submodule(owner)
        bias = layer.bias.detach() if layer.bias is not None else None
        if isinstance(layer, nn.Linear):
            replacement = CompressedLinear(weight, bias, choices.get(owner))
        else:
            replacement = CompressedConv2d(weight, bias, layer, choices.get(owner))
        parent_name, _, child = owner.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
    return model.eval()


def resident_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes each weight layer keeps in memory: compressed form or dense parameters.

    Args:
        model: a dense or runtime model.

    Returns:
        {layer name: bytes}.
    """
    from deepshrink.layers import compressible_weights

    result = {
        name: module.resident_bytes
        for name, module in model.named_modules()
        if isinstance(module, CompressedLinear | CompressedConv2d)
    }
    for name, weight in compressible_weights(model).items():
        result[name] = weight.value.numel() * weight.value.element_size()
    return result
