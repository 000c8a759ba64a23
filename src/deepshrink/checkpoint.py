"""Checkpoints as safetensors files, with the model's name and config in the metadata.

Nothing is ever unpickled. A PyTorch .pt/.pth state_dict is accepted on input through
torch.load(weights_only=True), which refuses arbitrary objects.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deepshrink.errors import CheckpointError, ConfigError
from deepshrink.files import atomic_output
from deepshrink.loading import model_for

CHECKPOINT_KIND = "deepshrink-checkpoint-1"
METADATA_KEY = "deepshrink"


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    model_name: str | None = None
    model_config: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    model_name: str,
    model_config: dict | None = None,
    metadata: dict | None = None,
    protect: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Write `model`'s state_dict as a safetensors checkpoint, atomically.

    Args:
        path: the file to write (a temporary file beside it is renamed into place).
        model: its state_dict is saved, parametrizations (masks, codebooks) included.
        model_name: the registered name or package.module:factory that rebuilds it.
        model_config: keyword arguments for that factory.
        metadata: JSON-serialisable values stored with it.
        protect: input paths that must not be overwritten.

    Returns:
        The path written.

    Raises:
        ConfigError: `path` is one of `protect`.
        OutputError: the file cannot be written (a directory, no space, no permission).
    """
    return save_state_dict(
        path, model.state_dict(), model_name=model_name, model_config=model_config, metadata=metadata, protect=protect
    )


def save_state_dict(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    *,
    model_name: str | None,
    model_config: dict | None = None,
    metadata: dict | None = None,
    protect: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Write a state_dict as a deepshrink checkpoint (safetensors), atomically.

    Args:
        path: the file to write.
        state_dict: the tensors, by name.
        model_name: the registered name or package.module:factory that rebuilds the model.
        model_config: keyword arguments for that factory.
        metadata: JSON values kept beside them.
        protect: input paths that must not be overwritten.

    Returns:
        The path written.

    Raises:
        ConfigError: `path` is one of `protect`. OutputError: the file cannot be written.
    """
    tensors = _unshared({name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()})
    # One metadata key only: safetensors keeps metadata in a hash map whose order varies from
    # run to run, and the same model must always give the same bytes.
    header = json.dumps(
        {"kind": CHECKPOINT_KIND, "model": model_name, "model_config": model_config or {}, "metadata": metadata or {}},
        sort_keys=True,
    )
    with atomic_output(path, protect=protect) as temporary:
        save_file(tensors, str(temporary), metadata={METADATA_KEY: header})
    return Path(path)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors with each one that shares memory with an earlier one copied. A tied model's
    state_dict names one tensor twice, which safetensors refuses to write; each name then holds
    its own copy of the same values, and loading into the tied model fills the tensor twice."""
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        result[name] = tensor
    return result


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a safetensors checkpoint (ours or anyone's) or a .pt/.pth state_dict, safely.

    Nothing is unpickled: .pt/.pth files go through torch.load(weights_only=True).

    Args:
        path: a .safetensors file, or a .pt/.pth/.bin state_dict of plain tensors.

    Returns:
        Checkpoint(state_dict, model_name, model_config, metadata); a foreign safetensors file
        has no name, config or metadata.

    Raises:
        CheckpointError: the file is missing, unreadable, not a state_dict, or its metadata is
            malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path")
    if path.suffix in (".pt", ".pth", ".bin"):
        return _load_torch_state_dict(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({error}); deepshrink reads .safetensors, "
            "or a .pt/.pth state_dict of plain tensors"
        ) from error
    if METADATA_KEY not in header:
        return Checkpoint(state_dict)  # someone else's safetensors file: tensors only
    try:
        fields = json.loads(header[METADATA_KEY])
        model_name, model_config, metadata = fields["model"], fields["model_config"], fields["metadata"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: checkpoint metadata is malformed ({error}); re-save the checkpoint") from error
    if not isinstance(model_config, dict) or not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is malformed: config and metadata must be objects")
    if model_name is not None and not isinstance(model_name, str):
        raise CheckpointError(f"{path}: checkpoint metadata is malformed: model name {model_name!r} is not a string")
    return Checkpoint(state_dict, model_name, model_config, metadata)


def _load_torch_state_dict(path: Path) -> Checkpoint:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types here: UnpicklingError, RuntimeError, ...
        raise CheckpointError(
            f"{path}: cannot load as a plain state_dict with weights_only=True ({type(error).__name__}); "
            "deepshrink never unpickles arbitrary objects: save model.state_dict() instead"
        ) from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict); save model.state_dict()")
    return Checkpoint(dict(loaded))


def load_model(path: str | os.PathLike, model: nn.Module | str | None = None) -> tuple[nn.Module, Checkpoint]:
    """Build the model a checkpoint was saved from and load it, pruning masks and codebooks included.

    Args:
        path: the checkpoint (see `load_checkpoint`).
        model: the module to load into, or a registered name / package.module:factory that
            overrides the one stored in the file; None for the stored name (a user factory the
            file names is imported only when passed here: a file must not choose what code runs).

    Returns:
        (model, checkpoint): the loaded module, pruned or weight-shared as saved, and the
        Checkpoint it came from.

    Raises:
        CheckpointError: the file is unreadable or does not fit the model.
        ModelError: no model can be built from the names given.
    """
    checkpoint = load_checkpoint(path)
    built, _ = model_for(path, model, checkpoint.model_name, config=checkpoint.model_config, error=CheckpointError)
    return load_state_into(built, checkpoint, path), checkpoint


def load_state_into(model: nn.Module, checkpoint: Checkpoint, source: str | os.PathLike) -> nn.Module:
    """Load the checkpoint's tensors into `model`, strictly, with a readable error on mismatch.

    A low-rank factored architecture named in the metadata is rebuilt first; pruning masks and
    shared-weight codebooks in the state_dict are registered next, so a pruned or weight-shared
    checkpoint loads as such, and keeps its constraints in training.

    Args:
        model: a module of the checkpoint's architecture (changed in place, or rebuilt when
            the metadata names a factored structure).
        checkpoint: what `load_checkpoint` read.
        source: the checkpoint's path, for messages.

    Returns:
        The model with the checkpoint's tensors.

    Raises:
        CheckpointError: tensors that do not fit the model, or parametrizations out of order.
    """
    from deepshrink.layers import parametrization_entries
    from deepshrink.prune.module import restore_pruning
    from deepshrink.quantize.shared import restore_sharing

    model, _ = model_for(source, model, None, metadata=checkpoint.metadata, error=CheckpointError)
    # Place by place, every kind at each, so each layer's parametrizations come back in their saved order.
    places = [
        place for field in ("mask", "codebook") for _, place, _ in parametrization_entries(checkpoint.state_dict, field)
    ]
    try:
        for position in range(max(places, default=-1) + 1):
            restore_pruning(model, checkpoint.state_dict, position)
            restore_sharing(model, checkpoint.state_dict, position)
    except ConfigError as error:
        raise CheckpointError(f"{source}: {error}") from error
    try:
        result = model.load_state_dict(checkpoint.state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches raise even with strict=False
        mismatches = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        raise CheckpointError(
            f"{source}: checkpoint does not fit model {type(model).__name__}: {'; '.join(mismatches[:3]) or error}; "
            "pass the model the checkpoint was trained with (model=...)"
        ) from error
    problems = []
    if result.missing_keys:
        problems.append(f"missing {sorted(result.missing_keys)[:5]}")
    if result.unexpected_keys:
        problems.append(f"unexpected {sorted(result.unexpected_keys)[:5]}")
    if problems:
        raise CheckpointError(
            f"{source}: checkpoint does not fit model {type(model).__name__}: {'; '.join(problems)}; "
            "pass the model the checkpoint was trained with (model=...)"
        )
    return model
