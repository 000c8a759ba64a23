"""The one way a model is built to receive a file's tensors: from a checkpoint, a .dcz file or a
module the caller gives.

A file may record its model's name, but a user factory (package.module:factory) named only by
the file is never imported: importing runs code, so the caller must name it. The architecture a
file's model had when it was written is rebuilt before any tensor loads: low-rank factored layers
(`lowrank_structure`) and BatchNorm folded into the layers before it (`batchnorm_folded`
metadata), each pair once its layer exists.

The parameters of a model built here are left as allocated, not initialised: every caller loads
all of them from the file next (a file that lacks one is refused), and initialising VGG-16's
138M weights only to overwrite them took 1.9 s of a 2.7 s load.
"""

from __future__ import annotations

import contextlib
import functools
import os

from torch import nn

from deepshrink.errors import ConfigError, ModelError
from deepshrink.layers import unwrapped

# Metadata entry of a low-rank factored model: which layers became two, at which ranks.
STRUCTURE_KEY = "lowrank_structure"

# The torch.nn.init functions layers call from reset_parameters.
_INITIALISERS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
    "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip


@contextlib.contextmanager
def parameters_left_uninitialised():
    """Within this block, the torch.nn.init functions leave parameters as they are.

    Only nn.Parameter tensors are skipped: a buffer that a module fills with them (which a file
    may not hold, if it is not persistent) is initialised as usual. The functions are replaced
    on the module torch.nn.init for the duration of the block, as Hugging Face's
    `no_init_weights` does, so a model built in another thread meanwhile skips them too.

    Yields:
        None.
    """
    originals = {name: getattr(nn.init, name) for name in _INITIALISERS}

    def skipping(original):
        @functools.wraps(original)
        def initialise(tensor, *args, **kwargs):
            return tensor if isinstance(tensor, nn.Parameter) else original(tensor, *args, **kwargs)

        return initialise

    for name, original in originals.items():
        setattr(nn.init, name, skipping(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(nn.init, name, original)


def model_for(
    source: str | os.PathLike,
    model: nn.Module | str | None,
    stored_name: object,
    *,
    metadata: dict | None = None,
    config: dict | None = None,
    error: type[Exception] = ModelError,
) -> tuple[nn.Module, str]:
    """The module to load `source`'s tensors into, and its name.

    `model` is a module of the right architecture (used as given), a registered name or
    package.module:factory, or None for `stored_name`, the name the file records. The file's
    `metadata` rebuilds folded BatchNorm and factored layers; `config` is passed to the
    registry's factory. A malformed structure raises `error` (the caller's kind:
    CheckpointError for checkpoints, FormatError for files). A model built here has its
    parameters left uninitialised: the caller loads every one of them next.

    Args:
        source: the file or checkpoint the tensors come from, named in errors.
        model: a module, a registered name or package.module:factory, or None.
        stored_name: the model name the file records.
        metadata: the file's metadata (folded BatchNorm, factored layers).
        config: keyword arguments for the registry's factory.
        error: the exception class for a malformed structure.

    Returns:
        (module, name): the module ready for the tensors (the model inside a torch.compile or
        DataParallel wrapper), and its name.

    Raises:
        ModelError: `model` is neither a module, a name nor None, or a factory named by a file.
    """
    from deepshrink.batchnorm import FOLDED_KEY, apply_folding
    from deepshrink.lowrank import apply_structure
    from deepshrink.models import build_model, is_factory_path

    metadata = metadata or {}
    structure = metadata.get(STRUCTURE_KEY)

    if isinstance(model, nn.Module):
        model = unwrapped(model)  # a compiled or DataParallel model: its tensors are the model inside's
        name = stored_name if isinstance(stored_name, str) else type(model).__name__
        if _already_factored(model, structure):
            return apply_folding(model, metadata.get(FOLDED_KEY), error), name
    else:
        if model is not None and not isinstance(model, str):
            raise ModelError(
                f"model should be an nn.Module, a registered name or package.module:factory, not {model!r}"
            )
        name = model or stored_name
        if not isinstance(name, str):
            raise ModelError(
                f"{source}: the file does not name its model; pass model=NAME (a registered name or "
                "package.module:factory) or the nn.Module itself"
            )
        if model is None and is_factory_path(name):
            raise ModelError(
                f"{source}: made from the user factory {name!r}; pass model={name} to confirm that this code may be "
                "imported"
            )
        try:
            with parameters_left_uninitialised():  # the caller loads every one of them next
                model = build_model(name, **(config or {}))
        except ModelError as problem:
            if model is not None or is_factory_path(name):
                raise
            raise ModelError(
                f"{source}: the file was made from model {name!r}, which is not registered here; pass the "
                "nn.Module it was made from (model=...), a registered name or package.module:factory"
            ) from problem
    # A pair may name a layer the structure makes (the pipeline factors before it folds: a
    # ResNet's `conv1.1` folds its `bn1`), or one it factors (folded first, by the per-stage
    # commands): each pair is folded once its layer exists.
    pairs = metadata.get(FOLDED_KEY)
    before, after = _pairs_before_and_after_structure(model, pairs)
    apply_folding(model, before, error)
    try:
        apply_structure(model, structure)
    except ConfigError as problem:
        raise error(f"{source}: {problem}") from problem
    apply_folding(model, after, error)
    return model, name


def _pairs_before_and_after_structure(model: nn.Module, pairs: object) -> tuple[object, object]:
    """The folded pairs whose layer `model` has before its low-rank structure is rebuilt, and
    the rest (anything malformed among them: `apply_folding` names it)."""
    if not isinstance(pairs, list):
        return pairs, None
    modules = dict(model.named_modules())

    def exists(pair) -> bool:
        return isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and pair[0] in modules

    return [pair for pair in pairs if exists(pair)], [pair for pair in pairs if not exists(pair)]


def _already_factored(model: nn.Module, structure: dict | None) -> bool:
    """A given module that already has the factored pairs (LAYER.0 and LAYER.1) the structure names."""
    if not structure or not isinstance(structure.get("ranks"), dict):
        return False
    modules = dict(model.named_modules())
    return all(f"{name}.0" in modules and f"{name}.1" in modules for name in structure["ranks"])


def check_tensors_fit(declared: dict[str, tuple[int, ...]], model: nn.Module, source, error: type[Exception]) -> None:
    """Every tensor a file declares (name -> shape) is one of `model`'s, with its shape, and none
    is missing: checked before anything is decoded, so a file cannot make us build tensors the
    model would refuse, or run kernels on a shape that is not the layer's.

    Args:
        declared: the file's tensors, name -> shape.
        model: the module they are to be loaded into.
        source: the file, named in the error.
        error: the exception class to raise.

    Raises:
        error: a tensor is missing, unexpected or of another shape.
    """
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    unexpected = sorted(set(declared) - set(expected))
    missing = sorted(set(expected) - set(declared))
    wrong = [name for name in declared if name in expected and tuple(declared[name]) != expected[name]]
    if unexpected or missing or wrong:
        problems = [f"{name} is {list(declared[name])}, the model's is {list(expected[name])}" for name in wrong[:3]]
        problems += [f"missing {missing[:5]}"] if missing else []
        problems += [f"unexpected {unexpected[:5]}"] if unexpected else []
        raise error(
            f"{source}: the file's tensors do not fit {type(model).__name__}: {'; '.join(problems)}; "
            "pass the model the file was made from (model=...)"
        )
