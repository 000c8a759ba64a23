"""Saving a compressed model as a .dcz file, loading it back, and where every bit went.

Every size here is counted from the real encoded bytes: the buffers each tensor record owns,
plus the file's header and padding in the totals.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from deepshrink import __version__
from deepshrink.encode import container
from deepshrink.encode.codec import decode_into, decode_state_dict, encode_model, verify
from deepshrink.encode.schema import CheckedHeader, check_header
from deepshrink.encode.sizes import parameter_bytes
from deepshrink.errors import FormatError, ModelError
from deepshrink.layers import unwrapped
from deepshrink.loading import check_tensors_fit, model_for


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    model_name: str,
    metadata: dict | None = None,
    index_bits: dict[str, int] | None = None,
    layout: str = "csr",
    coder: str = "huffman",
    protect: tuple = (),
    unshared: str = "lossless",
) -> Path:
    """Encode `model` (pruned and weight-shared layers compressed, the rest raw) into a .dcz file.

    Args:
        model: pruned and/or weight-shared layers (as the prune and quantize stages leave them)
            are stored as codebooks and entropy-coded indices; every other tensor raw. A model
            in a torch.compile or DataParallel wrapper is stored as the model inside.
        path: the file to write, atomically.
        model_name: the name (or package.module:factory) that rebuilds the architecture.
        metadata: JSON values stored in the header beside the name, library and fp32 size.
        index_bits: {layer glob: gap width}; default the paper's 8 (conv) / 5 (fc).
        layout: "csr", "csc" (relative-index sparse) or "dense" codes.
        coder: "huffman", "ans" (adaptive rANS, experimental: see docs/FORMAT.md) or "fixed"
            (P+Q without entropy coding).
        protect: input paths that must not be overwritten.
        unshared: the tensors that are not weight-shared: "lossless", "float16" (their float32
            values rounded to half precision) or "int8" (levels -127..127 times a per-tensor
            scale); the model loads them back as float32.

    Returns:
        The path written.

    Raises:
        ConfigError: an unknown layout or coder, a dtype the format does not store, or `path`
            in `protect`.
        OutputError: the file cannot be written.
    """
    model = unwrapped(model)  # the file holds the model's own keys, and loads into the plain model
    header, buffers = encode_model(
        model,
        index_bits=index_bits,
        layout=layout,
        coder=coder,
        unshared=unshared,
        metadata={
            "model": model_name,
            "library": f"deepshrink {__version__}",
            "fp32_parameter_bytes": parameter_bytes(model),
            **(metadata or {}),
        },
    )
    return container.write(path, header, buffers, protect=protect)


def open_compressed(
    path: str | os.PathLike, max_decoded_bytes: int | None = None
) -> tuple[container.Container, CheckedHeader]:
    """Read a .dcz file and check every field (docs/FORMAT.md) before anything is decoded.

    Every reader goes through here.

    Args:
        path: the .dcz file.
        max_decoded_bytes: replaces the limit on the tensors' decoded size (by default
            DECODED_PER_FILE_BYTE times the file's size, within a floor and a ceiling: see
            encode/schema.py).

    Returns:
        (the container: header and buffers, the CheckedHeader: records and metadata).

    Raises:
        FormatError: a field, checksum or size that is wrong, named.
    """
    loaded = container.read(path)
    lengths = [len(buffer) for buffer in loaded.buffers]
    size = Path(path).stat().st_size
    try:
        return loaded, check_header(loaded.header, lengths, size, max_decoded_bytes)
    except FormatError as error:
        raise FormatError(f"{path}: {error}") from error


def inspect_header(
    path: str | os.PathLike, max_decoded_bytes: int | None = None, *, header_only: bool = True
) -> tuple[dict, CheckedHeader]:
    """The header with its buffer table, every field checked.

    Args:
        path: the .dcz file.
        max_decoded_bytes: see `open_compressed`.
        header_only: read only the preamble and header (the buffers' checksums and streams are
            not verified: for listing a large file quickly). False verifies the whole file as a
            loader would and decodes every stream (but builds no tensor), so the numbers it
            declares (such as each layer's non-zero count) are known to be true.

    Returns:
        (the header as a dict, the CheckedHeader).

    Raises:
        FormatError: a malformed header, or (without `header_only`) malformed buffers.
    """
    header = container.read_header(path)
    lengths = container.buffer_lengths(header)
    try:
        checked = check_header(header, lengths, Path(path).stat().st_size, max_decoded_bytes)
    except FormatError as error:
        raise FormatError(f"{path}: {error}") from error
    if not header_only:
        loaded, checked = open_compressed(path, max_decoded_bytes)
        try:
            verify(loaded.buffers, checked)
        except FormatError as error:
            raise FormatError(f"{path}: {error}") from error
    return header, checked


def file_sizes(path: str | os.PathLike) -> tuple[list, dict]:
    """The per-tensor size table of a written .dcz file and its totals, the file's real size among them.

    Args:
        path: the .dcz file.

    Returns:
        (rows, totals) as `encode.sizes.size_report` gives them.

    Raises:
        FormatError: a malformed header.
    """
    from deepshrink.encode.sizes import size_report

    return size_report(inspect_header(path)[0], file_bytes=Path(path).stat().st_size)


def read_state_dict(path: str | os.PathLike, max_decoded_bytes: int | None = None):
    """The decoded plain state_dict and the file's metadata, without a model.

    Args:
        path: the .dcz file.
        max_decoded_bytes: see `open_compressed`.

    Returns:
        (the state_dict, bit-exact, with tensors as stored: a float16 record stays float16;
        the metadata).

    Raises:
        FormatError: a malformed file.
    """
    loaded, checked = open_compressed(path, max_decoded_bytes)
    try:
        return decode_state_dict(loaded.header, loaded.buffers, checked), checked.metadata
    except FormatError as error:
        raise FormatError(f"{path}: {error}") from error


def load_compressed(
    path: str | os.PathLike, model: nn.Module | str | None = None, *, max_decoded_bytes: int | None = None
) -> tuple[nn.Module, dict]:
    """The model of a .dcz file with its decoded weights (bit-exact), and the file's metadata.

    Every field is checked before anything is decoded (docs/FORMAT.md, "What a reader checks"),
    and every tensor against the model's.

    Args:
        path: the .dcz file.
        model: the module to load into, a registered name or package.module:factory, or None for
            the name the file records (a user factory the file names is imported only when passed
            here: a file must not choose what code we run).
        max_decoded_bytes: the most bytes the tensors may decode to; default 4,096 times the
            file's size, within 256 MiB and 16 GiB (see encode/schema.py).

    Returns:
        (model, metadata): the dense model with plain weights, and the file's metadata.

    Raises:
        FormatError: a malformed file, one over the decoded-size limit, or tensors that do not
            fit the model.
        ModelError: no model can be built, or your module's load_state_dict (its own load
            hooks) refuses tensors that fit it.
    """
    loaded, checked = open_compressed(path, max_decoded_bytes)
    metadata = checked.metadata
    built, name = model_for(path, model, metadata.get("model"), metadata=metadata, error=FormatError)
    check_tensors_fit({record["name"]: record["shape"] for record in checked.records}, built, path, FormatError)
    try:
        if isinstance(model, nn.Module):
            # Your module: decoded aside first, so that a corrupt file leaves it as it was.
            state = decode_state_dict(loaded.header, loaded.buffers, checked)
            try:
                built.load_state_dict(state)
            except RuntimeError as error:  # the keys and shapes fit (checked): the module's own load hooks refused
                raise ModelError(
                    f"{path}: {type(built).__name__}.load_state_dict refused the file's tensors, whose names and "
                    f"shapes fit it: {' '.join(str(error).split())}"
                ) from error
        else:
            # A model built here: each tensor decoded straight into its parameter, so the
            # weights exist once (VGG-16: no second 553 MB state_dict, no int64 indices).
            targets = built.state_dict(keep_vars=True)
            for record in checked.records:
                target = targets[record["name"]]
                if record["encoding"] != "same":
                    decode_into(record, loaded.buffers, target)
                elif target.data_ptr() != targets[record["as"]].data_ptr():  # a model that is not tied
                    with torch.no_grad():
                        target.copy_(targets[record["as"]])
    except FormatError as error:
        raise FormatError(f"{path}: {error}") from error
    return built, metadata
