"""Model <-> .dcz records (docs/FORMAT.md, "Tensor records").

`encode_model` turns a model whose layers may be pruned and weight-shared into a header and
buffers for the container; `decode_state_dict` turns them back into a plain state_dict whose
weights are bit-identical to the model's effective weights (codebook[indices], exact zeros).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch
from torch import nn

from deepshrink.encode import ans, huffman, lossless
from deepshrink.encode.bitio import flush, put_bits
from deepshrink.encode.schema import CODERS, FORMAT_NAME, INT8_MAGNITUDE, CheckedHeader, check_header
from deepshrink.encode.sparse import SparseLayout, as_matrix, check_entries, to_sparse, values_from_sparse
from deepshrink.errors import ConfigError, FormatError
from deepshrink.layers import (
    Weight,
    compressible_weights,
    match_per_layer,
    paper_default_bits,
    plain_state_dict,
    weights_by_key,
)
from deepshrink.quantize.shared import sharing_of

MAX_CODE_LENGTH = 15  # so that code lengths pack two to a byte
DTYPES = {
    "float32": (torch.float32, np.float32),
    "float64": (torch.float64, np.float64),
    "float16": (torch.float16, np.float16),
    "bfloat16": (torch.bfloat16, np.int16),  # numpy has no bfloat16: its bits, viewed back in torch
    "int64": (torch.int64, np.int64),
    "int32": (torch.int32, np.int32),
    "uint8": (torch.uint8, np.uint8),
    "int8": (torch.int8, np.int8),  # since 2.4; with a `scale`, float32 values stored in 8 bits
    "bool": (torch.bool, np.bool_),
}
UNSHARED = ("lossless", "float16", "int8")
INT8_LEVELS = 127  # symmetric: -127..127, so that zero (a cleared bias) stays exactly zero
TORCH_NAMES = {torch_type: name for name, (torch_type, _) in DTYPES.items()}


@numba.njit(cache=True, nogil=True)
def _pack_fixed(symbols, width, out):
    buffer, filled, position = np.uint64(0), 0, 0
    for index in range(len(symbols)):
        buffer, filled, position = put_bits(buffer, filled, position, symbols[index], width, out)
    flush(buffer, filled, position, out)


@numba.njit(cache=True, nogil=True)
def _unpack_fixed(data, width, out):
    buffer = 0
    filled = 0
    position = 0
    mask = (1 << width) - 1
    for index in range(len(out)):
        while filled < width:
            buffer = ((buffer << 8) | data[position]) & 0xFFFFFFFFFFFF
            position += 1
            filled += 8
        filled -= width
        out[index] = (buffer >> filled) & mask


def _pack_lengths(lengths: np.ndarray) -> bytes:
    """Code lengths (each <= 15) two to a byte, high nibble first, after trimming unused symbols
    at the end: the side information is then a few dozen bytes per stream."""
    used = np.flatnonzero(lengths)
    trimmed = lengths[: int(used[-1]) + 1 if len(used) else 0].astype(np.uint8)
    if len(trimmed) % 2:
        trimmed = np.append(trimmed, np.uint8(0))
    return ((trimmed[0::2] << 4) | trimmed[1::2]).astype(np.uint8).tobytes()


def _unpack_lengths(data: bytes, alphabet: int, what: str) -> np.ndarray:
    packed = np.frombuffer(data, dtype=np.uint8)
    unpacked = np.empty(2 * len(packed), dtype=np.uint8)
    unpacked[0::2], unpacked[1::2] = packed >> 4, packed & 15
    if len(unpacked) > alphabet and unpacked[alphabet:].any():
        raise FormatError(f"{what} code lengths name a symbol outside the alphabet of {alphabet}")
    lengths = np.zeros(alphabet, dtype=np.uint8)
    lengths[: min(alphabet, len(unpacked))] = unpacked[:alphabet]
    return lengths


def _encode_stream(symbols: np.ndarray, alphabet: int, coder: str, width: int, buffers: list[bytes]) -> dict:
    symbols = np.ascontiguousarray(symbols)
    if coder == "fixed":
        out = np.zeros((len(symbols) * width + 7) // 8, dtype=np.uint8)
        _pack_fixed(symbols.astype(np.int64), width, out)
        buffers.append(out.tobytes())
        return {"buffer": len(buffers) - 1, "symbols": len(symbols), "bits": len(symbols) * width, "width": width}
    if coder == "ans":
        context, data = ans.encode_smallest(symbols, alphabet)
        buffers.append(data)
        return {"buffer": len(buffers) - 1, "symbols": len(symbols), "bits": 8 * len(data), "context": context}
    lengths = huffman.code_lengths(np.bincount(symbols.astype(np.int64), minlength=alphabet), MAX_CODE_LENGTH)
    data, lanes = huffman.encode_lanes(symbols, lengths)
    buffers += [data, _pack_lengths(lengths)]
    return {
        "buffer": len(buffers) - 2,
        "symbols": len(symbols),
        "bits": sum(lanes),
        "lanes": lanes,
        "lengths": len(buffers) - 1,
    }


# Row counts are rANS-coded only where that saves at least this many bytes: the stream's context
# field costs the deflated header a few, and buffers are padded to 8 (LeNet-300-100's fc2: 88
# bytes fixed, 84 coded, and the file was 8 bytes larger for it).
CODED_COUNTS_MIN_SAVING = 16


def _encode_counts(counts: np.ndarray, width: int, coder: str, buffers: list[bytes]) -> dict:
    """The entries per row (or column): fixed-width, or under the ans coder adaptive rANS over
    the alphabet 2^width where that is smaller (since 2.6). A layer with many empty rows (a
    pruned network's dead units) has counts that are mostly zero: 500 of LeNet-5's fc1 rows take
    438 bytes at 7 bits each and 196 coded."""
    fixed = _encode_stream(counts, 1 << width, "fixed", width, buffers)
    if coder != "ans" or width > ans.MAX_ALPHABET_BITS:
        return fixed
    context, data = ans.encode_smallest(counts, 1 << width)
    if len(data) + CODED_COUNTS_MIN_SAVING > len(buffers[fixed["buffer"]]):
        return fixed
    buffers[fixed["buffer"]] = data
    return {**fixed, "bits": 8 * len(data), "context": context}


# The used-columns stream (2.7) is added only where the record's streams then take at least this
# many bytes less: like the coded counts, it costs the deflated header a few, and padding up to 8.
USED_COLUMNS_MIN_SAVING = 16


def _encode_sparse(sparse: SparseLayout, bits: int, coder: str) -> tuple[dict, list[bytes]]:
    """The streams of one sparse layout, their buffers numbered from 0."""
    buffers: list[bytes] = []
    count_width = max(1, int(sparse.counts.max(initial=0)).bit_length())
    streams = {
        "codes": _encode_stream(sparse.codes, 1 << bits, coder, bits, buffers),
        "gaps": _encode_stream(sparse.gaps, 1 << sparse.index_bits, coder, sparse.index_bits, buffers),
        "counts": _encode_counts(sparse.counts, count_width, coder, buffers),
    }
    if sparse.used is not None:
        marks = np.zeros(sparse.stored_shape[1], dtype=np.uint8)
        marks[sparse.used] = 1
        streams["used"] = _encode_stream(marks, 2, "ans", 1, buffers)
    return streams, buffers


def _padded_size(buffers: list[bytes]) -> int:
    return sum(len(buffer) + (-len(buffer) % 8) for buffer in buffers)


def _sparse_streams(codes: np.ndarray, bits: int, index_bits: int, layout: str, coder: str):
    """(layout, streams, buffers) of a pruned layer: the gaps over every column, or under the ans
    coder over the used columns only where that is at least USED_COLUMNS_MIN_SAVING bytes smaller
    (format 2.7): pruning leaves inputs that no weight of the layer reads."""
    sparse = to_sparse(codes, index_bits, layout)
    streams, buffers = _encode_sparse(sparse, bits, coder)
    if coder != "ans":
        return sparse, streams, buffers
    narrowed = to_sparse(codes, index_bits, layout, used_only=True)
    if narrowed.counted_columns == sparse.counted_columns:
        return sparse, streams, buffers
    narrowed_streams, narrowed_buffers = _encode_sparse(narrowed, bits, coder)
    if _padded_size(narrowed_buffers) + USED_COLUMNS_MIN_SAVING > _padded_size(buffers):
        return sparse, streams, buffers
    return narrowed, narrowed_streams, narrowed_buffers


def _shared_record(name: str, layer: Weight, index_bits: int, layout: str, coder: str, buffers: list[bytes]):
    sharing = sharing_of(layer)
    bits = int(np.ceil(np.log2(max(len(sharing.full_codebook()), 2))))
    bits = max(bits, 1)
    zero_code = bool(sharing.zero_code)
    codes = sharing.indices.detach().cpu().numpy().astype(np.uint16 if bits > 8 else np.uint8, copy=False)
    codebook = sharing.codebook.detach().cpu().float().numpy()
    shape = list(sharing.indices.shape)
    buffers.append(codebook.astype("<f4").tobytes())
    record = {
        "name": name,
        "shape": shape,
        "dtype": "float32",
        "encoding": "shared",
        "bits": bits,
        "zero_code": zero_code,
        "codebook": len(buffers) - 1,
        "coder": coder,
        "matrix": list(as_matrix(tuple(shape))),
    }
    if zero_code and layout != "dense":
        sparse, streams, stream_buffers = _sparse_streams(codes, bits, index_bits, layout, coder)
        record.update(
            layout=layout, index_bits=index_bits, entries=len(sparse.gaps), nonzeros=int(np.count_nonzero(codes))
        )
        for stream in streams.values():  # numbered from 0 in the layer's own list
            for key in ("buffer", "lengths"):
                if key in stream:
                    stream[key] += len(buffers)
        buffers += stream_buffers
        record["streams"] = streams
    else:
        full = sharing.full_codebook().detach().cpu().numpy()
        nonzeros = int(np.bincount(codes.reshape(-1), minlength=len(full))[: len(full)][full != 0].sum())
        record.update(layout="dense", entries=int(codes.size), nonzeros=nonzeros)
        record["streams"] = {"codes": _encode_stream(codes.reshape(-1), 1 << bits, coder, bits, buffers)}
    return record


def index_widths(layers: dict[str, Weight], index_bits: dict[str, int] | None) -> dict[str, int]:
    """Each layer's gap width: the paper's default (8 conv / 5 fc), then the globs in order (later wins).

    Args:
        layers: {name: Weight}.
        index_bits: {layer glob: width}, or None.

    Returns:
        {name: width in bits}.
    """
    widths = {name: paper_default_bits(layer) for name, layer in layers.items()}
    widths.update(match_per_layer(layers, index_bits or {}, "index_bits"))
    return widths


def encode_model(
    model: nn.Module,
    *,
    index_bits: dict[str, int] | None = None,
    layout: str = "csr",
    coder: str = "huffman",
    metadata: dict | None = None,
    unshared: str = "lossless",
) -> tuple[dict, list[bytes]]:
    """Header and buffers for `model`: shared layers compressed; every other tensor as byte planes
    under zstd (`lossless.py`), or raw where that is not smaller.

    `index_bits` maps layer-name globs to gap widths (default 8 conv / 5 fc). Layers that are
    pruned but not weight-shared are stored losslessly: the sparse layout needs code 0 for its
    fillers. `unshared="float16"` stores the float32 tensors that are not shared as float16;
    `unshared="int8"` stores float32 parameters as 8-bit levels times a per-tensor scale
    (docs/FORMAT.md, since 2.4) and float32 buffers (running statistics) as float16.

    Args:
        model: the model (pruned and weight-shared layers, and any others).
        index_bits: {layer glob: gap width}.
        layout: "csr", "csc" or "dense" (codes without gaps).
        coder: the entropy coder of the codes and gaps (see CODERS).
        metadata: JSON-ready metadata to store.
        unshared: "lossless", "float16" or "int8", for the float32 tensors that are not shared.

    Returns:
        (header, buffers), as `container.to_bytes` takes them.

    Raises:
        ConfigError: an unknown option, or a tensor whose dtype the format does not store.
    """
    if unshared not in UNSHARED:
        raise ConfigError(f"unshared={unshared!r} should be one of {', '.join(UNSHARED)}")
    if coder not in CODERS:
        raise ConfigError(f"coder={coder!r} should be one of {', '.join(CODERS)}")
    if layout not in ("csr", "csc", "dense"):
        raise ConfigError(f"layout={layout!r} should be csr, csc or dense")
    layers = compressible_weights(model)
    widths = index_widths(layers, index_bits)
    # Every key a shared weight has: its own, a tied weight's other holders', and a module's
    # second name (model.b = model.a); each is given its original below, so all but the first
    # are "same" records.
    shared = {key: weight.name for key, weight in weights_by_key(model).items() if sharing_of(weight) is not None}
    # Buffers (BatchNorm's running statistics) are not parameters; under int8 they are float16.
    statistics = {name for name, _ in model.named_buffers()}
    buffers: list[bytes] = []
    records = []
    stored: dict[tuple, str] = {}  # a tensor's identity in memory -> the key it was stored under
    for key, tensor in plain_state_dict(model, stand_ins=set(shared)).items():  # shared: from their codes
        # One tensor under two keys (tied weights, or one module under two names) is stored once:
        # the second key is a "same" record (format 2.5). A shared weight's stand-in is its
        # original Parameter, which every holder of a tied weight has, with its parametrizations.
        identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and identity in stored:
            records.append(
                {
                    "name": key,
                    "shape": list(tensor.shape),
                    "dtype": next(record for record in records if record["name"] == stored[identity])["dtype"],
                    "encoding": "same",
                    "as": stored[identity],
                }
            )
            continue
        stored[identity] = key
        if key in shared:
            name = shared[key]
            records.append(_shared_record(key, layers[name], widths[name], layout, coder, buffers))
            continue
        if tensor.dtype not in TORCH_NAMES:
            raise ConfigError(f"tensor {key!r} has dtype {tensor.dtype}, which the .dcz format does not store")
        tensor = tensor.detach().cpu().contiguous()
        scale = None
        if unshared == "float16" and tensor.dtype == torch.float32:
            tensor = _as_float16(key, tensor)
        elif unshared == "int8" and tensor.dtype == torch.float32 and key in statistics:
            tensor = _as_float16(key, tensor)  # a running variance's small values need relative precision
        elif unshared == "int8" and tensor.dtype == torch.float32:
            tensor, scale = _as_int8(key, tensor)
        array = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        packed = lossless.compress(data, array.dtype.itemsize) if data else None
        buffers.append(data if packed is None else packed)
        record = {
            "name": key,
            "shape": list(tensor.shape),
            "dtype": TORCH_NAMES[tensor.dtype],
            "encoding": "raw" if packed is None else "zstd",
            "data": len(buffers) - 1,
        }
        records.append(record if scale is None else {**record, "scale": scale})
    return {"format": FORMAT_NAME, "metadata": metadata or {}, "tensors": records}, buffers


def _as_float16(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` rounded to float16, refusing values float16 cannot hold (past +-65504)."""
    half = tensor.to(torch.float16)
    if bool((torch.isinf(half) & torch.isfinite(tensor)).any()):
        largest = float(tensor[torch.isfinite(tensor)].abs().max())
        raise ConfigError(
            f"tensor {key!r} holds {largest:.6g}, beyond float16's range (65504); store it losslessly "
            "(unshared: lossless)"
        )
    return half


def _as_int8(key: str, tensor: torch.Tensor) -> tuple[torch.Tensor, float]:
    """`tensor` as int8 levels -127..127 and the scale they are multiplied by: the largest
    magnitude maps to 127, every value to its nearest level (error at most scale / 2), zero to
    exactly zero. The scale is a float32, given as the shortest decimal that reads back as it."""
    if not bool(torch.isfinite(tensor).all()):
        raise ConfigError(
            f"tensor {key!r} holds an infinite or NaN value, which 8-bit levels cannot hold; store it "
            "losslessly (unshared: lossless)"
        )
    largest = float(tensor.abs().max()) if tensor.numel() else 0.0
    scale = np.float32(largest / INT8_LEVELS) if largest > 0 else np.float32(1.0)
    if scale == 0:  # magnitudes near float32's smallest: no 8-bit level between them and zero
        scale = np.float32(largest)
    while float(scale) * INT8_MAGNITUDE > float(np.finfo(np.float32).max):  # as schema.py checks it
        scale = np.nextafter(scale, np.float32(0))
    levels = torch.clamp(torch.round(tensor.double() / float(scale)), -INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    shortest = float(str(scale))  # numpy prints a float32 as the shortest decimal that reads back as it
    return levels, shortest if np.float32(shortest) == scale else float(scale)


def int8_values(levels: np.ndarray, scale: float) -> np.ndarray:
    """The float32 values of a record's int8 levels: level x scale, the scale rounded to float32
    first (docs/FORMAT.md), in float32 arithmetic, so every reader gets the same bits.

    Args:
        levels: the stored int8 levels.
        scale: the record's scale.

    Returns:
        A float32 array of the levels' shape.
    """
    return levels.astype(np.float32) * np.float32(scale)


def _decode_stream(stream: dict, buffers: list[bytes], coder: str, alphabet: int, what: str) -> np.ndarray:
    """The symbols of a stream whose fields schema.check_header validated; corrupt bytes raise FormatError."""
    data = buffers[stream["buffer"]]
    if coder == "fixed":
        out = np.empty(stream["symbols"], dtype=np.int64)
        _unpack_fixed(np.frombuffer(data, dtype=np.uint8), stream["width"], out)
    elif coder == "ans":
        try:  # uint8 symbols for alphabets up to 256, else uint16
            out = ans.decode(data, stream["symbols"], alphabet, stream["context"])
        except FormatError as error:
            raise FormatError(f"{what} stream: {error}") from error
    else:
        lengths = _unpack_lengths(buffers[stream["lengths"]], alphabet, what)
        try:  # uint8 symbols for alphabets up to 256, else int32: never widened to int64
            out = huffman.decode_lanes(data, stream["lanes"], stream["symbols"], lengths, MAX_CODE_LENGTH)
        except FormatError as error:
            raise FormatError(f"{what} stream: {error}") from error
    if len(out) and int(out.max()) >= alphabet:
        raise FormatError(f"{what} stream holds symbol {int(out.max())}, outside its alphabet of {alphabet}")
    return out


@dataclass(frozen=True)
class SharedParts:
    """A shared tensor as stored: its full codebook (code 0 = zero when reserved) and either
    dense codes or the relative-index sparse layout. Nothing is expanded to float weights."""

    codebook: np.ndarray  # float32
    codes: np.ndarray | None  # dense layout: codes in the tensor's shape
    sparse: SparseLayout | None  # csr / csc layout
    shape: tuple[int, ...]


def decode_shared_parts(record: dict, buffers: list[bytes]) -> SharedParts:
    """Entropy-decode a checked `shared` record (schema.check_header) without building its weights.

    Args:
        record: the checked record.
        buffers: the file's buffers, in order.

    Returns:
        SharedParts: the codebook (zero first where the record has a zero code), and the codes
        dense or in the sparse layout.

    Raises:
        FormatError: a corrupt stream, a non-finite codebook value, a code past the codebook, or
            entries that do not fit.
    """
    name, shape, bits = record["name"], tuple(record["shape"]), record["bits"]
    codebook = np.frombuffer(buffers[record["codebook"]], dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(codebook)):
        raise FormatError(f"{name}: the codebook holds a non-finite value")
    full = np.concatenate(([np.float32(0)], codebook)) if record["zero_code"] else codebook
    coder, streams = record["coder"], record["streams"]
    codes = _decode_stream(streams["codes"], buffers, coder, 1 << bits, f"{name} codes")
    if len(codes) and int(codes.max()) >= len(full):
        raise FormatError(f"{name}: code {int(codes.max())} is past the codebook's {len(full)} entries")
    if record["layout"] == "dense":
        return SharedParts(full, codes.reshape(shape), None, shape)
    index_bits = record["index_bits"]
    gaps = _decode_stream(streams["gaps"], buffers, coder, 1 << index_bits, f"{name} gaps")
    counts_stream = streams["counts"]
    counts_coder = "ans" if "context" in counts_stream else "fixed"  # since 2.6 an ans record's may be either
    counts = _decode_stream(counts_stream, buffers, counts_coder, 1 << counts_stream["width"], f"{name} counts")
    counts = counts.astype(np.int64, copy=False)  # rANS decodes into uint8 or uint16; offsets are summed from these
    if int(counts.sum()) != len(codes):
        raise FormatError(f"{name}: the row counts add up to {int(counts.sum())}, not {len(codes)} entries")
    used = None
    if "used" in streams:  # since 2.7: the gaps count the marked columns only
        used = np.flatnonzero(_decode_stream(streams["used"], buffers, "ans", 2, f"{name} used")).astype(np.int64)
    layout = SparseLayout(
        gaps.astype(np.uint16, copy=False),
        codes.astype(np.uint16, copy=False),
        counts,
        as_matrix(shape),
        record["layout"],
        index_bits,
        used,
    )
    return SharedParts(full, None, layout, shape)


def decode_record_parts(record: dict, buffers: list[bytes]) -> torch.Tensor | SharedParts:
    """A checked record's raw tensor, or a shared tensor's parts (codebook + codes, never expanded).

    Args:
        record: the checked record.
        buffers: the file's buffers, in order.

    Returns:
        A tensor, or SharedParts.

    Raises:
        FormatError: corrupt data.
    """
    if record["encoding"] == "shared":
        return decode_shared_parts(record, buffers)
    shape, dtype = record["shape"], record["dtype"]
    torch_type, numpy_type = DTYPES[dtype]
    item = np.dtype(numpy_type).newbyteorder("<")
    data = buffers[record["data"]]
    if record["encoding"] == "zstd":
        data = lossless.decompress(data, math.prod(shape) * item.itemsize, item.itemsize, record["name"])
    array = np.frombuffer(data, dtype=item).reshape(shape)
    if "scale" in record:
        return torch.from_numpy(int8_values(array, record["scale"]))
    tensor = torch.from_numpy(array.astype(numpy_type, copy=True))
    return tensor.view(torch_type) if tensor.dtype != torch_type else tensor


def _decode_record(record: dict, buffers: list[bytes]) -> torch.Tensor:
    if record["encoding"] != "shared":
        return decode_record_parts(record, buffers)
    tensor = torch.empty(record["shape"], dtype=torch.float32)
    decode_into(record, buffers, tensor)
    return tensor


def decode_into(record: dict, buffers: list[bytes], target: torch.Tensor) -> None:
    """Decode a checked record into `target`, a tensor of its shape (a model's own parameter,
    say). A shared record's weights are written in place when `target` is a contiguous float32
    CPU tensor, with no dense codes or int64 indices in between; otherwise through one copy.
    Corrupt bytes raise FormatError, possibly after part of `target` was written.

    Args:
        record: the checked record.
        buffers: the file's buffers, in order.
        target: the tensor to write, of the record's shape.

    Raises:
        FormatError: corrupt data, or a count of non-zero weights other than the record's.
    """
    parts = decode_record_parts(record, buffers)
    with torch.no_grad():
        if isinstance(parts, torch.Tensor):
            target.copy_(parts)
            return
        direct = target.dtype == torch.float32 and target.device.type == "cpu" and target.is_contiguous()
        values = target.detach().numpy().reshape(-1) if direct else np.empty(math.prod(parts.shape), np.float32)
        if parts.sparse is not None:
            nonzeros = values_from_sparse(parts.sparse, parts.codebook, values)
        else:
            nonzeros = _look_up(np.ascontiguousarray(parts.codes).reshape(-1), parts.codebook, values)
        if record.get("nonzeros") != nonzeros:
            raise FormatError(
                f"{record['name']}: {nonzeros} non-zero weights decoded, the record declares {record.get('nonzeros')!r}"
            )
        if not direct:
            target.copy_(torch.from_numpy(values).view(parts.shape))


@numba.njit(cache=True, nogil=True)
def _look_up(codes, codebook, out):
    """out[i] = codebook[codes[i]] (codes already checked against the codebook), and how many
    are non-zero: one pass, no int64 or float copies (numpy's gather widened the codes to
    int64 and copied the floats, 1.5 s of VGG-16's 4 s load)."""
    nonzeros = 0
    for index in range(len(codes)):
        value = codebook[codes[index]]
        out[index] = value
        if value != 0:
            nonzeros += 1
    return nonzeros


def check(header: dict, buffers: list[bytes], max_decoded_bytes: int | None = None) -> CheckedHeader:
    """schema.check_header for a header and buffers held in memory (the file's size: their sum).

    Args:
        header: the parsed header.
        buffers: the file's buffers, in order.
        max_decoded_bytes: the most bytes the tensors may decode to (default: by the size).

    Returns:
        The CheckedHeader.

    Raises:
        FormatError: a field is missing, mistyped, inconsistent or over a limit.
    """
    lengths = [len(buffer) for buffer in buffers]
    return check_header(header, lengths, sum(lengths), max_decoded_bytes)


def decode_state_dict(
    header: dict, buffers: list[bytes], checked: CheckedHeader | None = None
) -> dict[str, torch.Tensor]:
    """The plain state_dict a .dcz header and its buffers describe, every field validated
    (by `checked`, the result of checking them, or here).

    Args:
        header: the parsed header.
        buffers: the file's buffers, in order.
        checked: the header already checked, or None to check it here.

    Returns:
        {key: tensor}.

    Raises:
        FormatError: an invalid header or corrupt data.
    """
    checked = checked or check(header, buffers)
    state: dict[str, torch.Tensor] = {}
    for record in checked.records:
        # A "same" record is the earlier record's tensor itself, as in the model that was saved.
        same = record["encoding"] == "same"
        state[record["name"]] = state[record["as"]] if same else _decode_record(record, buffers)
    return state


def verify(buffers: list[bytes], checked: CheckedHeader) -> None:
    """Decode every shared record's streams (never its weights) and check what the header
    declares about them: the entries fit their rows, and the count of non-zero weights; and
    decompress every zstd record to its exact size.

    For a full check of a file without building its tensors (`inspect`).

    Args:
        buffers: the file's buffers, in order.
        checked: the checked header.

    Raises:
        FormatError: a stream is corrupt, or does not match what the header declares.
    """
    for record in checked.records:  # a "same" record has nothing of its own to decode
        if record["encoding"] == "zstd":
            decode_record_parts(record, buffers)
        if record["encoding"] != "shared":
            continue
        parts = decode_shared_parts(record, buffers)
        if parts.sparse is not None:
            check_entries(parts.sparse)
            nonzeros = int(np.count_nonzero(parts.codebook[parts.sparse.codes]))
        else:
            nonzeros = int(np.count_nonzero(parts.codebook[parts.codes]))
        if nonzeros != record["nonzeros"]:
            raise FormatError(
                f"{record['name']}: {nonzeros} non-zero weights decoded, the record declares {record['nonzeros']}"
            )


def stream_histograms(header: dict, buffers: list[bytes]) -> dict[str, dict[str, np.ndarray]]:
    """Per shared tensor, the symbol counts of its code and gap streams (the paper's Figure 5).

    Args:
        header: the parsed header.
        buffers: the file's buffers, in order.

    Returns:
        {tensor name: {"codes": counts, "gaps": counts (sparse layouts only)}}.

    Raises:
        FormatError: an invalid header or a corrupt stream.
    """
    histograms = {}
    for record in check(header, buffers).records:
        if record["encoding"] != "shared":
            continue
        streams, coder, name = record["streams"], record["coder"], record["name"]
        codes = _decode_stream(streams["codes"], buffers, coder, 1 << record["bits"], name)
        result = {"codes": np.bincount(codes, minlength=1 << record["bits"])}
        if "gaps" in streams:
            gaps = _decode_stream(streams["gaps"], buffers, coder, 1 << record["index_bits"], name)
            result["gaps"] = np.bincount(gaps, minlength=1 << record["index_bits"])
        histograms[name] = result
    return histograms
