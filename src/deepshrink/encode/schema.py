"""The .dcz header's schema: every field's type, range and consistency, checked at open.

docs/FORMAT.md ("What a reader checks") is the specification; this module is its one
implementation. `check_header` runs on the parsed JSON header and the buffers' lengths, before
any tensor is decoded or any array is allocated from a number in the file:

- every record's fields have the right type and range, every buffer it names exists, and every
  buffer's length is what its fields imply (raw bytes, codebook entries, fixed-width and Huffman
  streams);
- every buffer belongs to exactly one field, so nothing hides in a file;
- the decoded size of the whole file is within a limit that grows with the file's size (a small
  file cannot make a reader allocate gigabytes), overridable for very sparse large models;
- the metadata the loaders act on (model name, low-rank ranks) has the types they expect.

What only decoding can tell (a corrupt Huffman code word, gaps that run past a row) is checked
by the codec as it decodes, within the sizes validated here.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from deepshrink.encode import ans
from deepshrink.encode.sparse import as_matrix
from deepshrink.errors import FormatError

FORMAT_NAME = "deepshrink-dcz"
CODERS = ("huffman", "fixed", "ans")  # ans: since 2.2
LAYOUTS = ("dense", "csr", "csc")
ENCODINGS = ("raw", "zstd", "shared", "same")  # same: since 2.5
ITEM_SIZES = {
    "float32": 4,
    "float64": 8,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "uint8": 1,
    "int8": 1,  # since 2.4
    "bool": 1,
}
SCALED_DTYPES = ("int8",)  # a record of these may carry a `scale`: its values are float32 (since 2.4)
INT8_MAGNITUDE = 128  # the largest |level| an int8 can hold (-128), whichever levels a writer uses
FLOAT32_MAX = 3.4028234663852886e38
_FLOAT32 = struct.Struct("<f")
HUFFMAN_LANES = 4
MAX_ELEMENTS = 1 << 40  # per tensor; also bounds each side of a shape
MAX_DIMENSIONS = 16
MAX_NAME_LENGTH = 4096
# What a file may say about one input example (bench and predict allocate inputs from it).
MAX_INPUT_DIMENSIONS = 8
MAX_INPUT_ELEMENTS = 1 << 24
INPUT_DTYPES = ("float32", "float64", "int64", "int32")
MAX_CODE_WIDTH = 32  # fixed-width streams (the entry counts need up to 32 bits)

# The decoded-size limit of a file: DECODED_PER_FILE_BYTE times its size, at least
# DECODED_FLOOR and at most DECODED_CEILING. Real files stay far below the ratio (Deep
# Compression reaches 35-49x; an extreme 99.9%-pruned 1-bit layer about 1,000x), while a crafted
# 26 KB file declaring a 2^31-element tensor (8 GiB) is refused. `max_decoded_bytes` overrides it.
DECODED_PER_FILE_BYTE = 4096
DECODED_FLOOR = 256 << 20
DECODED_CEILING = 16 << 30


def decoded_limit(file_size: int, max_decoded_bytes: int | None = None) -> int:
    """The most bytes a file of `file_size` bytes may decode to (the tensors as dense arrays).

    Args:
        file_size: the file's size.
        max_decoded_bytes: the caller's limit, which replaces the default.

    Returns:
        The limit in bytes.
    """
    if max_decoded_bytes is not None:
        return max_decoded_bytes
    return min(DECODED_CEILING, max(DECODED_FLOOR, DECODED_PER_FILE_BYTE * file_size))


@dataclass(frozen=True)
class CheckedHeader:
    """A header that passed every check: its records, metadata and decoded size."""

    records: list[dict]
    metadata: dict
    decoded_bytes: int


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(value, what: str, low: int, high: int) -> int:
    if not _is_integer(value) or not low <= value <= high:
        raise FormatError(f"{what} is {_shown(value)}; expected an integer from {low} to {high}")
    return value


def _shown(value) -> str:
    """A value for a message, cut short: a hostile file must not make the message huge."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Buffers:
    """The buffer table as the records use it: each buffer belongs to exactly one field."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths
        self.owner: dict[int, str] = {}

    def claim(self, index, what: str) -> int:
        """The length of buffer `index`, which `what` now owns."""
        if not _is_integer(index) or not 0 <= index < len(self.lengths):
            raise FormatError(f"{what} refers to buffer {_shown(index)}, but there are {len(self.lengths)}")
        if index in self.owner:
            raise FormatError(f"{what} refers to buffer {index}, which {self.owner[index]} already uses")
        self.owner[index] = what
        return self.lengths[index]

    def check_all_claimed(self) -> None:
        unused = [index for index in range(len(self.lengths)) if index not in self.owner]
        if unused:
            raise FormatError(f"buffers {unused[:5]} belong to no tensor: the file holds data its header does not name")


def _check_stream(stream, buffers: _Buffers, coder: str, alphabet: int, symbols: int, what: str, width=None) -> None:
    """A coded stream of exactly `symbols` symbols below `alphabet`, its buffer's length exact."""
    if not isinstance(stream, dict):
        raise FormatError(f"{what} stream is {_shown(stream)}; expected an object")
    length = buffers.claim(stream.get("buffer"), f"{what} stream")
    declared = stream.get("symbols")
    if declared != symbols or not _is_integer(declared):
        raise FormatError(f"{what} stream declares {_shown(declared)} symbols; the record needs {symbols}")
    bits = _integer(stream.get("bits"), f"{what} bit count", 0, 8 * length)
    if coder == "fixed":
        stream_width = _integer(stream.get("width"), f"{what} width", 1, MAX_CODE_WIDTH)
        if width is not None and stream_width != width:
            raise FormatError(f"{what} stream is {stream_width} bits wide; the record needs {width}")
        if bits != symbols * stream_width or (bits + 7) // 8 != length:
            raise FormatError(
                f"{what} stream: {symbols} symbols of {stream_width} bits do not fill its {length} bytes exactly"
            )
        return
    if coder == "ans":
        _check_ans_stream(stream, length, bits, alphabet, symbols, what)
        return
    lanes = stream.get("lanes")
    if not isinstance(lanes, list) or len(lanes) != HUFFMAN_LANES or not all(_is_integer(lane) for lane in lanes):
        raise FormatError(f"{what} stream lanes are {_shown(lanes)}; expected {HUFFMAN_LANES} bit counts")
    if any(lane < 0 for lane in lanes) or sum(lanes) != bits:
        raise FormatError(f"{what} stream: the lanes {lanes} do not add up to the declared {bits} bits")
    if sum((lane + 7) // 8 for lane in lanes) != length:
        raise FormatError(f"{what} stream: the lanes {lanes} do not fill its {length} bytes exactly")
    per_lane = [len(range(lane, symbols, HUFFMAN_LANES)) for lane in range(HUFFMAN_LANES)]
    if any(count > lane for count, lane in zip(per_lane, lanes, strict=True)):
        raise FormatError(f"{what} stream: {symbols} symbols cannot fit in lanes of {lanes} bits (1 bit each at least)")
    lengths = buffers.claim(stream.get("lengths"), f"{what} code lengths")
    if 2 * lengths > alphabet + 1:
        raise FormatError(f"{what} code lengths: {2 * lengths} for an alphabet of {alphabet} symbols")


def _check_ans_stream(stream: dict, length: int, bits: int, alphabet: int, symbols: int, what: str) -> None:
    """An ANS stream: a known context model, and a buffer of the state and whole words, no longer
    than `symbols` symbols can make it (ans.max_stream_bytes), its `bits` exactly its bytes."""
    context = stream.get("context")
    if context not in ans.CONTEXTS:
        raise FormatError(f"{what} stream: unknown context {_shown(context)} (expected {' or '.join(ans.CONTEXTS)})")
    if length < ans.HEADER_BYTES or (length - ans.HEADER_BYTES) % 4:
        raise FormatError(f"{what} stream: {length} bytes are not an 8-byte state followed by 4-byte words")
    if length > ans.max_stream_bytes(symbols, alphabet):
        raise FormatError(f"{what} stream: {length} bytes, more than {symbols} symbols can take")
    if bits != 8 * length:
        raise FormatError(f"{what} stream declares {bits} bits in {length} bytes")


def _check_shared(record: dict, name: str, shape: list[int], elements: int, buffers: _Buffers) -> None:
    if record["dtype"] != "float32":
        raise FormatError(f"{name}: shared tensors are float32, not {_shown(record['dtype'])}")
    bits = _integer(record.get("bits"), f"{name}: bits", 1, 16)
    zero_code = record.get("zero_code")
    if not isinstance(zero_code, bool):
        raise FormatError(f"{name}: zero_code is {_shown(zero_code)}; expected true or false")
    codebook_bytes = buffers.claim(record.get("codebook"), f"{name} codebook")
    if codebook_bytes % 4 or codebook_bytes // 4 + zero_code > 1 << bits:
        raise FormatError(
            f"{name}: the codebook has {codebook_bytes} bytes; expected float32 values, at most "
            f"{(1 << bits) - zero_code} for {bits} bits"
        )
    coder = record.get("coder")
    if coder not in CODERS:
        raise FormatError(f"{name}: unknown coder {_shown(coder)} (expected {', '.join(CODERS)})")
    if record.get("matrix") != list(as_matrix(shape)):
        raise FormatError(f"{name}: matrix {_shown(record.get('matrix'))} does not match shape {shape}")
    streams = record.get("streams")
    if not isinstance(streams, dict):
        raise FormatError(f"{name}: streams is {_shown(streams)}; expected an object")
    layout = record.get("layout")
    nonzeros = record.get("nonzeros")
    if layout == "dense":
        if set(streams) != {"codes"}:
            raise FormatError(f"{name}: a dense layout has one stream, codes; found {sorted(streams)[:5]}")
        _integer(nonzeros, f"{name}: nonzeros", 0, elements)
        _check_stream(streams["codes"], buffers, coder, 1 << bits, elements, f"{name} codes", bits)
        return
    if layout not in ("csr", "csc"):
        raise FormatError(f"{name}: unknown layout {_shown(layout)} (expected {', '.join(LAYOUTS)})")
    if not zero_code:
        raise FormatError(f"{name}: a sparse layout needs zero_code for its filler entries")
    if set(streams) - {"used"} != {"codes", "gaps", "counts"}:
        raise FormatError(
            f"{name}: a sparse layout has streams codes, gaps and counts, and optionally used; "
            f"found {sorted(streams)[:5]}"
        )
    index_bits = _integer(record.get("index_bits"), f"{name}: index_bits", 1, 16)
    rows, columns = as_matrix(shape)
    stored_rows = columns if layout == "csc" else rows
    # Every entry places one position of the matrix (a weight or a filler zero).
    entries = _integer(record.get("entries"), f"{name}: entries", 0, elements)
    _integer(nonzeros, f"{name}: nonzeros", 0, entries)
    _check_stream(streams["codes"], buffers, coder, 1 << bits, entries, f"{name} codes", bits)
    _check_stream(streams["gaps"], buffers, coder, 1 << index_bits, entries, f"{name} gaps", index_bits)
    counts = streams["counts"]
    count_width = counts.get("width") if isinstance(counts, dict) else None
    # Fixed-width, or (since 2.6, in an ans record) rANS-coded over 2^width symbols: a stream with a
    # context is the latter.
    counts_coder = "ans" if isinstance(counts, dict) and "context" in counts else "fixed"
    if counts_coder == "ans" and coder != "ans":
        raise FormatError(f"{name}: its counts stream is ans-coded (it has a context) in a {coder} record")
    widest = ans.MAX_ALPHABET_BITS if counts_coder == "ans" else MAX_CODE_WIDTH
    _integer(count_width, f"{name} counts width", 1, widest)
    _check_stream(counts, buffers, counts_coder, 1 << count_width, stored_rows, f"{name} counts")
    if "used" in streams:  # since 2.7: one symbol (used or not) per stored column, the gaps counting used ones
        if coder != "ans":
            raise FormatError(f"{name}: a used-columns stream is only defined for the ans coder, not {coder}")
        _check_stream(streams["used"], buffers, "ans", 2, rows if layout == "csc" else columns, f"{name} used")


def _index_bytes(record: dict) -> int:
    """What a sparse record's per-row and per-column arrays take once decoded (8 bytes each, at
    most): the row counts, and since 2.7 the used columns. An empty tensor's 2-D view can have
    2^40 rows while it holds no element, and rANS codes a run of zeros in a few bytes per
    million, so these count against the decoded-size limit beside the elements."""
    if record.get("encoding") != "shared" or record.get("layout") not in LAYOUTS:
        return 0
    return 8 * sum(as_matrix(record["shape"]))


def _declared_size(record) -> int:
    """A record's name, shape and dtype checked; returns its decoded size in bytes."""
    if not isinstance(record, dict):
        raise FormatError(f"a tensor record is {_shown(record)}; expected an object")
    name = record.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
        raise FormatError(f"a tensor record's name is {_shown(name)}; expected a non-empty string")
    shape = record.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMENSIONS
        or not all(_is_integer(side) and 0 <= side <= MAX_ELEMENTS for side in shape)
    ):
        raise FormatError(
            f"{name}: shape {_shown(shape)} is not a list of at most {MAX_DIMENSIONS} non-negative integers"
        )
    elements = math.prod(shape)
    if elements > MAX_ELEMENTS or max(as_matrix(shape)) > MAX_ELEMENTS:
        raise FormatError(f"{name}: shape {shape} has more than {MAX_ELEMENTS} elements (or a 2-D view as large)")
    dtype = record.get("dtype")
    if not isinstance(dtype, str) or dtype not in ITEM_SIZES:
        raise FormatError(f"{name}: unknown dtype {_shown(dtype)} (expected one of {', '.join(ITEM_SIZES)})")
    if "scale" in record:
        _check_scale(record, name, dtype)
        return elements * ITEM_SIZES["float32"]  # decoded as float32
    return elements * ITEM_SIZES[dtype]


def _check_scale(record: dict, name: str, dtype: str) -> None:
    """An int8 record's scale: a number whose float32 is positive, and whose largest level
    (128 x scale, for the int8 level -128) is a finite float32, so that decoding yields only
    finite values."""
    scale, encoding = record["scale"], record.get("encoding")
    if dtype not in SCALED_DTYPES or encoding not in ("raw", "zstd"):
        raise FormatError(
            f"{name}: a scale belongs to a raw or zstd record of dtype int8, not to a "
            f"{_shown(encoding)} record of {_shown(dtype)}"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise FormatError(f"{name}: scale is {_shown(scale)}; expected a positive number")
    try:
        value = float(scale)
    except OverflowError:
        value = math.inf
    single = _float32(value) if value > 0 and math.isfinite(value) else 0.0
    if not (single > 0 and single * INT8_MAGNITUDE <= FLOAT32_MAX):  # exact in float64: 24 + 8 bits
        raise FormatError(
            f"{name}: scale is {_shown(scale)}; expected a positive number whose float32 times 128 is finite"
        )


def _float32(value: float) -> float:
    """`value` rounded to the nearest float32 (infinity past its range), as a Python float."""
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(value))[0]
    except OverflowError:
        return math.inf


def _check_same(record: dict, earlier: dict[str, dict]) -> None:
    """A "same" record names an earlier record that holds data, of its own shape and dtype."""
    name, source = record["name"], record.get("as")
    if not isinstance(source, str) or source not in earlier:
        raise FormatError(f"{name}: 'as' is {_shown(source)}; expected the name of an earlier record")
    target = earlier[source]
    if target.get("encoding") == "same":
        raise FormatError(f"{name}: 'as' names {source!r}, itself a 'same' record; name the record that holds the data")
    if target["shape"] != record["shape"] or target["dtype"] != record["dtype"]:
        raise FormatError(
            f"{name}: shape {record['shape']} and dtype {record['dtype']} differ from {source!r}'s "
            f"({target['shape']}, {target['dtype']}), which it says it is"
        )


def _check_record(record: dict, buffers: _Buffers, earlier: dict[str, dict]) -> None:
    """Check the encoding of a record whose name, shape and dtype `_declared_size` checked;
    `earlier` holds the records before it, by name."""
    name, shape, dtype = record["name"], record["shape"], record["dtype"]
    elements = math.prod(shape)
    encoding = record.get("encoding")
    if encoding == "same":
        _check_same(record, earlier)
    elif encoding == "raw":
        length = buffers.claim(record.get("data"), name)
        if length != elements * ITEM_SIZES[dtype]:
            raise FormatError(
                f"{name}: raw data has {length} bytes; shape {shape} of {dtype} needs {elements * ITEM_SIZES[dtype]}"
            )
    elif encoding == "zstd":
        # Compressed data is checked for its exact decoded size when it is decoded; here it only
        # has to exist, belong to this record, and not be larger than the raw bytes it replaces.
        length = buffers.claim(record.get("data"), name)
        if not 0 < length < max(elements * ITEM_SIZES[dtype], 1):
            raw = elements * ITEM_SIZES[dtype]
            raise FormatError(f"{name}: zstd data has {length} bytes; it should be smaller than the {raw} raw bytes")
    elif encoding == "shared":
        _check_shared(record, name, shape, elements, buffers)
    else:
        raise FormatError(f"{name}: unknown encoding {_shown(encoding)} (expected {' or '.join(ENCODINGS)})")


def check_metadata(metadata) -> dict:
    """The metadata object, with the fields the loaders act on checked for type.

    Args:
        metadata: the header's metadata, or None.

    Returns:
        The metadata ({} for None).

    Raises:
        FormatError: a field the loaders act on has the wrong type or size.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise FormatError(f"metadata is {_shown(metadata)}; expected a JSON object")
    for key in ("model", "library", "output"):
        if metadata.get(key) is not None and not isinstance(metadata[key], str):
            raise FormatError(f"metadata {key} is {_shown(metadata[key])}; expected a string")
    shape = metadata.get("input_shape")
    if shape is not None:
        # bench and predict make example inputs of this shape: a file must not ask for terabytes.
        if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_INPUT_DIMENSIONS:
            raise FormatError(
                f"metadata input_shape is {_shown(shape)}; expected a list of 1 to {MAX_INPUT_DIMENSIONS} sizes"
            )
        for size in shape:
            _integer(size, "metadata input_shape size", 1, MAX_INPUT_ELEMENTS)
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise FormatError(
                f"metadata input_shape {_shown(shape)} is {math.prod(shape):,} values an example, over the "
                f"{MAX_INPUT_ELEMENTS:,} a file may ask for"
            )
    dtype = metadata.get("input_dtype")
    if dtype is not None and dtype not in INPUT_DTYPES:
        raise FormatError(f"metadata input_dtype is {_shown(dtype)}; expected one of {', '.join(INPUT_DTYPES)}")
    names = metadata.get("input_names")
    if names is not None and not (
        isinstance(names, list) and 0 < len(names) <= 64 and all(isinstance(name, str) for name in names)
    ):
        raise FormatError(f"metadata input_names is {_shown(names)}; expected a list of up to 64 input names")
    size = metadata.get("fp32_parameter_bytes")
    if size is not None:
        _integer(size, "metadata fp32_parameter_bytes", 0, ITEM_SIZES["float64"] * MAX_ELEMENTS)
    structure = metadata.get("lowrank_structure")
    if structure is not None:
        ranks = structure.get("ranks") if isinstance(structure, dict) else None
        if not isinstance(ranks, dict) or not isinstance(structure.get("scheme"), str):
            raise FormatError(f"metadata lowrank_structure is {_shown(structure)}; expected a scheme and ranks")
        for layer, rank in ranks.items():
            _integer(rank, f"metadata lowrank_structure rank of {layer!r}", 1, MAX_ELEMENTS)
    folded = metadata.get("batchnorm_folded")
    if folded is not None and not (
        isinstance(folded, list)
        and all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(name, str) for name in pair) for pair in folded
        )
    ):
        raise FormatError(f"metadata batchnorm_folded is {_shown(folded)}; expected a list of [layer, batchnorm] names")
    return metadata


def check_header(
    header: dict, lengths: list[int], file_size: int, max_decoded_bytes: int | None = None
) -> CheckedHeader:
    """Validate a parsed header against its buffers' lengths; raises FormatError naming the field.

    `file_size` sets the default decoded-size limit (see `decoded_limit`); `max_decoded_bytes`
    replaces it.

    Args:
        header: the parsed header.
        lengths: the buffers' lengths.
        file_size: the file's size.
        max_decoded_bytes: the most bytes the tensors may decode to.

    Returns:
        The CheckedHeader.

    Raises:
        FormatError: a field is missing, mistyped, inconsistent or over a limit.
    """
    if header.get("format") != FORMAT_NAME:
        raise FormatError(f"header format is {_shown(header.get('format'))}, expected {FORMAT_NAME!r}")
    metadata = check_metadata(header.get("metadata"))
    records = header.get("tensors")
    if not isinstance(records, list):
        raise FormatError(f"header tensors is {_shown(records)}; expected a list of records")
    # First every record's declared size against the limit, before any other field is looked at.
    limit = decoded_limit(file_size, max_decoded_bytes)
    sizes: dict[str, int] = {}
    decoded = allocated = 0
    for record in records:
        size = _declared_size(record)
        if record.get("encoding") == "same" and record.get("as") in sizes:
            size = sizes[record["as"]]  # what it decodes to (an int8 record's float32 values, say)
        decoded += size
        allocated += size + _index_bytes(record)
        if record["name"] in sizes:
            raise FormatError(f"tensor {record['name']!r} appears twice")
        sizes[record["name"]] = size
        if allocated > limit:
            raise FormatError(
                f"the tensors decode to more than {limit:,} bytes, the limit for a {file_size:,}-byte file "
                f"(at {record['name']!r}); if the file is trusted, raise max_decoded_bytes (--max-decoded-bytes)"
            )
    buffers = _Buffers(lengths)
    earlier: dict[str, dict] = {}
    for record in records:
        _check_record(record, buffers, earlier)
        earlier[record["name"]] = record
    buffers.check_all_claimed()
    return CheckedHeader(records, metadata, decoded)
