"""Model <-> .dcz records (docs/FORMAT.md, "Tensor records").

`encode_model` turns a model whose layers may be pruned and weight-shared into a header and
buffers for the container; `decode_state_dict` turns them back into a plain state_dict whose
weights are bit-identical to the model's effective weights (codebook[indices], exact zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
from torch import nn

from deepshrink.encode import huffman
from deepshrink.encode.bitio import flush, put_bits
from deepshrink.encode.sparse import SparseLayout, as_matrix, from_sparse, to_sparse
from deepshrink.errors import ConfigError, FormatError
from deepshrink.layers import compressible_layers, match_per_layer, paper_default_bits, plain_state_dict
from deepshrink.quantize.shared import sharing_of

FORMAT_NAME = "deepshrink-dcz"
CODERS = ("huffman", "fixed")
MAX_CODE_LENGTH = 15  # so that code lengths pack two to a byte
DTYPES = {
    "float32": (torch.float32, np.float32),
    "float64": (torch.float64, np.float64),
    "float16": (torch.float16, np.float16),
    "int64": (torch.int64, np.int64),
    "int32": (torch.int32, np.int32),
    "uint8": (torch.uint8, np.uint8),
    "bool": (torch.bool, np.bool_),
}
TORCH_NAMES = {torch_type: name for name, (torch_type, _) in DTYPES.items()}
MAX_ELEMENTS = 1 << 40


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


def _shared_record(name: str, layer: nn.Module, index_bits: int, layout: str, coder: str, buffers: list[bytes]):
    sharing = sharing_of(layer)
    bits = int(np.ceil(np.log2(max(len(sharing.full_codebook()), 2))))
    bits = max(bits, 1)
    zero_code = bool(sharing.zero_code)
    codes = sharing.indices.detach().cpu().numpy().astype(np.uint16 if bits > 8 else np.uint8)
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
        sparse = to_sparse(codes, index_bits, layout)
        count_width = max(1, int(sparse.counts.max(initial=0)).bit_length())
        record.update(
            layout=layout, index_bits=index_bits, entries=len(sparse.gaps), nonzeros=int(np.count_nonzero(codes))
        )
        record["streams"] = {
            "codes": _encode_stream(sparse.codes, 1 << bits, coder, bits, buffers),
            "gaps": _encode_stream(sparse.gaps, 1 << index_bits, coder, index_bits, buffers),
            "counts": _encode_stream(sparse.counts, 1 << count_width, "fixed", count_width, buffers),
        }
    else:
        record.update(layout="dense", entries=int(codes.size), nonzeros=int(np.count_nonzero(full_values(sharing))))
        record["streams"] = {"codes": _encode_stream(codes.reshape(-1), 1 << bits, coder, bits, buffers)}
    return record


def full_values(sharing) -> np.ndarray:
    return sharing.full_codebook().detach().cpu().numpy()[sharing.indices.long().cpu().numpy()]


def index_widths(layers: dict[str, nn.Module], index_bits: dict[str, int] | None) -> dict[str, int]:
    """Each layer's gap width: the paper's default (8 conv / 5 fc), then the globs in order (later wins)."""
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
) -> tuple[dict, list[bytes]]:
    """Header and buffers for `model`: shared layers compressed, every other tensor raw.

    `index_bits` maps layer-name globs to gap widths (default 8 conv / 5 fc). Layers that are
    pruned but not weight-shared are stored raw: the sparse layout needs code 0 for its fillers.
    """
    if coder not in CODERS:
        raise ConfigError(f"coder={coder!r} should be one of {', '.join(CODERS)}")
    if layout not in ("csr", "csc", "dense"):
        raise ConfigError(f"layout={layout!r} should be csr, csc or dense")
    layers = compressible_layers(model)
    widths = index_widths(layers, index_bits)
    shared = {f"{name}.weight": name for name, layer in layers.items() if sharing_of(layer) is not None}
    buffers: list[bytes] = []
    records = []
    for key, tensor in plain_state_dict(model).items():
        if key in shared:
            name = shared[key]
            records.append(_shared_record(key, layers[name], widths[name], layout, coder, buffers))
            continue
        if tensor.dtype not in TORCH_NAMES:
            raise ConfigError(f"tensor {key!r} has dtype {tensor.dtype}, which the .dcz format does not store")
        array = tensor.detach().cpu().contiguous().numpy()
        buffers.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
        records.append(
            {
                "name": key,
                "shape": list(tensor.shape),
                "dtype": TORCH_NAMES[tensor.dtype],
                "encoding": "raw",
                "data": len(buffers) - 1,
            }
        )
    return {"format": FORMAT_NAME, "metadata": metadata or {}, "tensors": records}, buffers


def _buffer(buffers: list[bytes], index, what: str) -> bytes:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(buffers):
        raise FormatError(f"{what} refers to buffer {index!r}, but there are {len(buffers)}")
    return buffers[index]


def _count(value, what: str, limit: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise FormatError(f"{what} is {value!r}; expected an integer from 0 to {limit}")
    return value


def _decode_stream(stream, buffers: list[bytes], coder: str, alphabet: int, limit: int, what: str) -> np.ndarray:
    if not isinstance(stream, dict):
        raise FormatError(f"{what} stream is missing or not an object")
    data = _buffer(buffers, stream.get("buffer"), f"{what} stream")
    symbols = _count(stream.get("symbols"), f"{what} symbol count", limit)
    bits = _count(stream.get("bits"), f"{what} bit count", 8 * len(data))
    if coder == "fixed":
        width = _count(stream.get("width"), f"{what} width", 32)
        if width == 0 or bits != symbols * width or (bits + 7) // 8 != len(data):
            raise FormatError(f"{what} stream: {symbols} symbols of {width} bits do not fill {len(data)} bytes")
        out = np.empty(symbols, dtype=np.int64)
        _unpack_fixed(np.frombuffer(data, dtype=np.uint8), width, out)
    else:
        lengths = _unpack_lengths(_buffer(buffers, stream.get("lengths"), f"{what} code lengths"), alphabet, what)
        try:
            lanes = stream.get("lanes")
            if not isinstance(lanes, list) or sum(lane for lane in lanes if isinstance(lane, int)) != bits:
                raise FormatError(f"the lanes {lanes!r} do not add up to the declared {bits} bits")
            out = huffman.decode_lanes(data, lanes, symbols, lengths, MAX_CODE_LENGTH).astype(np.int64)
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
    """Validate and entropy-decode a `shared` record without building its weights."""
    name = record["name"]
    shape = record["shape"]
    elements = int(np.prod(shape, dtype=np.float64))
    if record["dtype"] != "float32":
        raise FormatError(f"{name}: shared tensors are float32, not {record['dtype']}")
    bits = _count(record.get("bits"), f"{name}: bits", 16)
    if bits == 0:
        raise FormatError(f"{name}: bits must be at least 1")
    zero_code = record.get("zero_code")
    if not isinstance(zero_code, bool):
        raise FormatError(f"{name}: zero_code must be true or false")
    codebook = np.frombuffer(_buffer(buffers, record.get("codebook"), f"{name} codebook"), dtype="<f4")
    if len(codebook) + int(zero_code) > (1 << bits) or not np.all(np.isfinite(codebook)):
        raise FormatError(f"{name}: the codebook has {len(codebook)} entries for {bits} bits, or a non-finite value")
    full = np.concatenate(([np.float32(0)], codebook)) if zero_code else codebook
    coder = record.get("coder")
    if coder not in CODERS:
        raise FormatError(f"{name}: unknown coder {coder!r}")
    streams = record.get("streams")
    if not isinstance(streams, dict):
        raise FormatError(f"{name}: streams missing")
    matrix = as_matrix(tuple(shape))
    if record.get("matrix") != list(matrix):
        raise FormatError(f"{name}: matrix {record.get('matrix')!r} does not match shape {shape}")
    layout = record.get("layout")
    if layout == "dense":
        codes = _decode_stream(streams.get("codes"), buffers, coder, 1 << bits, elements, f"{name} codes")
        if len(codes) != elements:
            raise FormatError(f"{name}: {len(codes)} codes for {elements} weights")
    elif layout in ("csr", "csc"):
        if not zero_code:
            raise FormatError(f"{name}: a sparse layout needs zero_code for its filler entries")
        index_bits = _count(record.get("index_bits"), f"{name}: index_bits", 16)
        if index_bits == 0:
            raise FormatError(f"{name}: index_bits must be at least 1")
        rows = matrix[1] if layout == "csc" else matrix[0]
        entries = _count(record.get("entries"), f"{name}: entries", elements)
        entry_codes = _decode_stream(streams.get("codes"), buffers, coder, 1 << bits, entries, f"{name} codes")
        gaps = _decode_stream(streams.get("gaps"), buffers, coder, 1 << index_bits, entries, f"{name} gaps")
        counts_stream = streams.get("counts")
        width = counts_stream.get("width") if isinstance(counts_stream, dict) else None
        if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= 32:
            raise FormatError(f"{name}: the entry-count stream needs a width from 1 to 32")
        counts = _decode_stream(counts_stream, buffers, "fixed", 1 << width, rows, f"{name} counts")
        if len(entry_codes) != entries or len(gaps) != entries or len(counts) != rows:
            raise FormatError(
                f"{name}: {len(entry_codes)} codes, {len(gaps)} gaps and {len(counts)} row counts "
                f"for {entries} entries in {rows} rows"
            )
        layout_record = SparseLayout(
            gaps.astype(np.uint16), entry_codes.astype(np.uint16), counts, matrix, layout, index_bits
        )
        if int(counts.sum()) != entries:
            raise FormatError(f"{name}: the row counts add up to {int(counts.sum())}, not {entries} entries")
        if len(entry_codes) and int(entry_codes.max()) >= len(full):
            raise FormatError(f"{name}: a code exceeds the codebook's {len(full)} entries")
        return SharedParts(full.astype(np.float32), None, layout_record, tuple(shape))
    else:
        raise FormatError(f"{name}: unknown layout {layout!r}")
    if len(codes) and int(codes.max()) >= len(full):
        raise FormatError(f"{name}: a code exceeds the codebook's {len(full)} entries")
    return SharedParts(full.astype(np.float32), codes.reshape(shape), None, tuple(shape))


def decode_record_parts(record: dict, buffers: list[bytes]) -> torch.Tensor | SharedParts:
    """A raw tensor, or a shared tensor's parts (codebook + codes, never expanded), validated."""
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise FormatError("a tensor record is not an object with a name")
    name = record["name"]
    shape = record.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(side, int) and not isinstance(side, bool) and side >= 0 for side in shape
    ):
        raise FormatError(f"{name}: shape {shape!r} is not a list of non-negative integers")
    elements = int(np.prod(shape, dtype=np.float64))
    if elements > MAX_ELEMENTS:
        raise FormatError(f"{name}: shape {shape} has more than {MAX_ELEMENTS} elements")
    if record.get("dtype") not in DTYPES:
        raise FormatError(f"{name}: unknown dtype {record.get('dtype')!r}")
    torch_type, numpy_type = DTYPES[record["dtype"]]
    encoding = record.get("encoding")
    if encoding == "raw":
        data = _buffer(buffers, record.get("data"), name)
        expected = elements * np.dtype(numpy_type).itemsize
        if len(data) != expected:
            raise FormatError(f"{name}: raw data has {len(data)} bytes, shape {shape} needs {expected}")
        array = np.frombuffer(data, dtype=np.dtype(numpy_type).newbyteorder("<")).reshape(shape)
        return torch.from_numpy(array.astype(numpy_type, copy=True))
    if encoding != "shared":
        raise FormatError(f"{name}: unknown encoding {encoding!r}")
    return decode_shared_parts(record, buffers)


def _decode_record(record: dict, buffers: list[bytes]) -> torch.Tensor:
    parts = decode_record_parts(record, buffers)
    if isinstance(parts, torch.Tensor):
        return parts
    name, shape = record["name"], record["shape"]
    codes = from_sparse(parts.sparse, tuple(shape)) if parts.sparse is not None else parts.codes
    full = parts.codebook
    if len(codes.reshape(-1)) and int(codes.max()) >= len(full):
        raise FormatError(f"{name}: a code exceeds the codebook's {len(full)} entries")
    values = full[codes.reshape(shape).astype(np.int64)].astype(np.float32)
    if record.get("nonzeros") != int(np.count_nonzero(values)):
        raise FormatError(
            f"{name}: {int(np.count_nonzero(values))} non-zero weights decoded, "
            f"the record declares {record.get('nonzeros')!r}"
        )
    return torch.from_numpy(values)


def decode_state_dict(header: dict, buffers: list[bytes]) -> dict[str, torch.Tensor]:
    """The plain state_dict a .dcz header and its buffers describe, every field validated."""
    if header.get("format") != FORMAT_NAME:
        raise FormatError(f"header format is {header.get('format')!r}, expected {FORMAT_NAME!r}")
    tensors = header.get("tensors")
    if not isinstance(tensors, list):
        raise FormatError("header has no 'tensors' list")
    state = {}
    for record in tensors:
        tensor = _decode_record(record, buffers)
        if record["name"] in state:
            raise FormatError(f"tensor {record['name']!r} appears twice")
        state[record["name"]] = tensor
    return state


def stream_histograms(header: dict, buffers: list[bytes]) -> dict[str, dict[str, np.ndarray]]:
    """Per shared tensor, the symbol counts of its code and gap streams (the paper's Figure 5)."""
    histograms = {}
    for record in header.get("tensors", []):
        if record.get("encoding") != "shared":
            continue
        streams = record["streams"]
        coder = record["coder"]
        entries = record["entries"]
        result = {
            "codes": np.bincount(
                _decode_stream(streams["codes"], buffers, coder, 1 << record["bits"], entries, record["name"]),
                minlength=1 << record["bits"],
            )
        }
        if "gaps" in streams:
            gaps = _decode_stream(streams["gaps"], buffers, coder, 1 << record["index_bits"], entries, record["name"])
            result["gaps"] = np.bincount(gaps, minlength=1 << record["index_bits"])
        histograms[record["name"]] = result
    return histograms
