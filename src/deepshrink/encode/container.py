"""The .dcz container framing (docs/FORMAT.md, "Layout" and the buffer checks).

This module knows bytes, not tensors: a JSON header and a list of buffers go in, the same come
out, every field validated. The tensor records inside the header are interpreted by the codec
on top of it.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from deepshrink.errors import FormatError
from deepshrink.files import atomic_output

MAGIC = b"\x89DCZ\r\n\x1a\n"
MAJOR_VERSION = 2
# 2.1: tensors as zstd byte planes (encoding "zstd"); 2.2: the "ans" coder; 2.3: the header
# deflated against HEADER_DICTIONARY; 2.4: int8 records (with a scale: float32 in 8 bits); 2.5: "same" records;
# 2.6: an ans record's row counts rANS-coded; 2.7: the used-columns stream and the compact buffer table
MINOR_VERSION = 7
# The first whose buffer table is the lengths and one checksum of the body (and that reads a
# sparse record's `used` stream): every file written since is 2.7.
COMPACT_TABLE_MINOR_VERSION = 7
MAX_CRC32 = (1 << 32) - 1
READABLE_MAJOR_VERSIONS = (1, 2)  # 1.x: plain JSON header; 2.x: zlib-compressed JSON header
PREAMBLE = struct.Struct("<8sHHIQ")  # magic, major, minor, header CRC-32, header length
VERSIONS = struct.Struct("<HH")  # covered by the header checksum, so a flipped minor version is caught
ALIGNMENT = 8
MAX_HEADER_BYTES = 64 << 20
# The header's JSON is parsed into Python objects, which take tens of times its size: it may be
# at most MAX_HEADER_JSON_BYTES, and at most HEADER_INFLATION times its deflated size (real
# headers deflate about 3x; a crafted 65 KB stream inflating to 63 MiB took 2 GB to parse).
MAX_HEADER_JSON_BYTES = 8 << 20
HEADER_INFLATION = 64
HEADER_INFLATION_FLOOR = 1 << 20
# Our headers nest 6 levels deep (header, tensors, record, streams, stream, lanes); metadata
# adds a few. Deeper JSON is refused (Python's parser stops at about 1,000 with RecursionError).
MAX_JSON_DEPTH = 32
# Since 2.3 the header is deflated against a preset dictionary (RFC 1950's FDICT): real headers,
# of models that are not the LeNets, with their checksums and stage keys removed, and the fields
# of the newer records. A small model's header is then half its deflated size (1,112 to 537 bytes
# on a LeNet-300-100 file: 4% of it). The bytes are part of the format and never change; another
# dictionary would be another minor version, and a reader knows each by its Adler-32.
HEADER_DICTIONARY = resources.files("deepshrink.encode").joinpath("header-dictionary-1.txt").read_bytes()
HEADER_DICTIONARY_ID = zlib.adler32(HEADER_DICTIONARY)
ZLIB_PRESET_DICTIONARY_FLAG = 0x20  # bit 5 of a zlib stream's second byte (RFC 1950, section 2.2)


def _padding(length: int) -> int:
    return -length % ALIGNMENT


@dataclass(frozen=True)
class Container:
    header: dict  # the JSON header without its buffer table ("buffers", and "buffers_crc32" since 2.7)
    buffers: list[bytes]


def to_bytes(header: dict, buffers: list[bytes]) -> bytes:
    """Serialise deterministically: sorted JSON keys, fixed padding, buffers in order.

    Every file is written as 2.7: its buffer table is the buffers' lengths and one CRC-32 of
    everything after the header (docs/FORMAT.md, "Header"), which a 2.6 reader refuses.

    Args:
        header: the header, without its buffer table.
        buffers: the buffers.

    Returns:
        The whole file.

    Raises:
        ValueError: the header already holds a buffer table.
    """
    if "buffers" in header or "buffers_crc32" in header:
        raise ValueError("the header's 'buffers' and 'buffers_crc32' are written by the container itself")
    body = b"".join(bytes(buffer) + b"\0" * _padding(len(buffer)) for buffer in buffers)
    table = {"buffers": [len(buffer) for buffer in buffers], "buffers_crc32": zlib.crc32(body)}
    encoded = encode_header({**header, **table})
    checksum = zlib.crc32(encoded, zlib.crc32(VERSIONS.pack(MAJOR_VERSION, MINOR_VERSION)))
    return PREAMBLE.pack(MAGIC, MAJOR_VERSION, MINOR_VERSION, checksum, len(encoded)) + encoded + body


def buffer_lengths(header: dict) -> list[int]:
    """The buffers' lengths from a header's checked table, of either form (2.7's lengths, or the
    objects of earlier files).

    Args:
        header: a header with its buffer table, as read_header returns it.

    Returns:
        The lengths in bytes, in file order.
    """
    return [entry["length"] if isinstance(entry, dict) else entry for entry in header["buffers"]]


def encode_header(header: dict) -> bytes:
    """The stored header (with its buffer table): sorted compact JSON, deflated against
    HEADER_DICTIONARY into a zlib stream, zero-padded.

    Compressed because on small models the header is a tenth of the file: its JSON is
    repetitive (field names, CRCs, lane sizes), and deflate takes it to about a third; the
    dictionary, which holds the field names before the first header does, to about a sixth.

    Args:
        header: the header with its buffer table.

    Returns:
        The stored bytes.
    """
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    deflater = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_DEFAULT_STRATEGY, HEADER_DICTIONARY)
    encoded = deflater.compress(text) + deflater.flush()
    return encoded + b"\0" * _padding(len(encoded))


def _decode_header(encoded: bytes, major: int, source: str) -> bytes:
    """The header's JSON bytes: as stored for 1.x, inflated (bounded, exact padding) for 2.x."""
    if major == 1:
        if len(encoded) > MAX_HEADER_JSON_BYTES:
            raise FormatError(f"{source}: header is {len(encoded)} bytes, more than {MAX_HEADER_JSON_BYTES}")
        return encoded
    limit = min(MAX_HEADER_JSON_BYTES, max(HEADER_INFLATION_FLOOR, HEADER_INFLATION * len(encoded)))
    inflater = _inflater(encoded, source)
    try:
        text = inflater.decompress(encoded, limit)
    except zlib.error as error:
        raise FormatError(f"{source}: header is not a valid zlib stream: {error}") from error
    if inflater.unconsumed_tail:
        raise FormatError(
            f"{source}: header inflates to more than {limit} bytes (at most {HEADER_INFLATION} times its "
            f"{len(encoded)} stored bytes, and {MAX_HEADER_JSON_BYTES} in all)"
        )
    if not inflater.eof:
        raise FormatError(f"{source}: header zlib stream is truncated")
    if len(inflater.unused_data) >= ALIGNMENT or inflater.unused_data.strip(b"\0"):
        raise FormatError(f"{source}: {len(inflater.unused_data)} unexpected bytes after the header's zlib stream")
    return text


def _inflater(encoded: bytes, source: str):
    """A zlib inflater for the stored header: with HEADER_DICTIONARY where the stream names a
    preset dictionary (2.3 and later), without one where it does not (2.0-2.2)."""
    is_zlib = len(encoded) >= 2 and encoded[0] & 0x0F == 8 and (encoded[0] << 8 | encoded[1]) % 31 == 0
    if not is_zlib or not encoded[1] & ZLIB_PRESET_DICTIONARY_FLAG:
        return zlib.decompressobj()  # which refuses what is not a zlib stream
    dictionary_id = int.from_bytes(encoded[2:6], "big") if len(encoded) >= 6 else None
    if dictionary_id != HEADER_DICTIONARY_ID:
        raise FormatError(
            f"{source}: the header was deflated against preset dictionary {dictionary_id or 0:#010x}; this version "
            f"of deepshrink knows only {HEADER_DICTIONARY_ID:#010x} (format 2.3): read it with a newer deepshrink"
        )
    return zlib.decompressobj(zdict=HEADER_DICTIONARY)


def write(path: str | os.PathLike, header: dict, buffers: list[bytes], protect=()) -> Path:
    """Write atomically: a temporary file beside `path`, renamed into place when complete.

    Args:
        path: the file to write.
        header: the header, without its buffer table.
        buffers: the buffers.
        protect: input paths that `path` must not be.

    Returns:
        `path` as a Path.

    Raises:
        ConfigError: `path` is one of `protect`.
        OutputError: `path` cannot be written.
    """
    data = to_bytes(header, buffers)
    with atomic_output(path, protect=protect) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def parse_header(data: bytes, source: str = "<bytes>") -> tuple[dict, int]:
    """Check the preamble and header at the start of `data`; returns (header, data start).

    Args:
        data: the file's first bytes (at least the preamble and header).
        source: the file's name, for errors.

    Returns:
        (header, the offset where the buffers start).

    Raises:
        FormatError: a wrong magic or version, a bad checksum, or a malformed header.
    """
    if len(data) < PREAMBLE.size:
        raise FormatError(f"{source}: {len(data)} bytes is too short for a .dcz file ({PREAMBLE.size}-byte preamble)")
    magic, major, minor, header_crc, header_length = PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise FormatError(f"{source}: not a .dcz file (magic {magic!r}, expected {MAGIC!r})")
    if major not in READABLE_MAJOR_VERSIONS:
        raise FormatError(
            f"{source}: format version {major}.{minor} is not readable here "
            f"(this reads {', '.join(f'{version}.x' for version in READABLE_MAJOR_VERSIONS)})"
        )
    if header_length > MAX_HEADER_BYTES or header_length % ALIGNMENT:
        raise FormatError(
            f"{source}: header length {header_length} is invalid (a multiple of 8, at most {MAX_HEADER_BYTES})"
        )
    data_start = PREAMBLE.size + header_length
    if data_start > len(data):
        raise FormatError(
            f"{source}: truncated: the header needs {header_length} bytes, the file has {len(data) - PREAMBLE.size}"
        )
    encoded = data[PREAMBLE.size : data_start]
    if zlib.crc32(encoded, zlib.crc32(VERSIONS.pack(major, minor))) != header_crc:
        raise FormatError(f"{source}: header checksum mismatch: the file is corrupt")
    try:
        header = json.loads(_decode_header(encoded, major, source).decode("utf-8"))
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, or an integer of over 4,300 digits
        raise FormatError(f"{source}: header is not valid UTF-8 JSON: {error}") from error
    except RecursionError as error:
        raise FormatError(f"{source}: header JSON nests more than {MAX_JSON_DEPTH} levels deep") from error
    depth = json_depth(header)
    if depth > MAX_JSON_DEPTH:
        raise FormatError(f"{source}: header JSON nests {depth} levels deep; at most {MAX_JSON_DEPTH} are allowed")
    if not isinstance(header, dict) or not isinstance(header.get("buffers"), list):
        raise FormatError(f"{source}: header must be a JSON object with a 'buffers' list")
    return header, data_start


def json_depth(value) -> int:
    """How deep parsed JSON nests its arrays and objects, walked without recursion.

    Args:
        value: parsed JSON.

    Returns:
        The depth (0 for a scalar).
    """
    # Only containers go on the stack: a header is mostly numbers and strings, and pushing each
    # of them made this walk a third of the time it takes to read a header.
    deepest, pending = 0, [(value, 1)] if isinstance(value, (dict, list)) else []
    while pending:
        item, depth = pending.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _has_compact_table(data: bytes) -> bool:
    """Whether a file's preamble (checked by parse_header) says 2.7 or later: lengths and one checksum."""
    _, major, minor, _, _ = PREAMBLE.unpack_from(data)
    return major == 2 and minor >= COMPACT_TABLE_MINOR_VERSION


def _check_table(header: dict, compact: bool, data_start: int, file_size: int, source: str) -> list[tuple]:
    """Validate the buffer table against the file size; returns (start, end, crc32) per buffer,
    the checksum None in a compact (2.7) table, whose one checksum covers every byte after the header."""
    table = header["buffers"]
    if compact and not (_is_count(header.get("buffers_crc32")) and header["buffers_crc32"] <= MAX_CRC32):
        raise FormatError(
            f"{source}: buffers_crc32 is {str(header.get('buffers_crc32'))[:40]}; a 2.7 file needs the "
            "CRC-32 of its buffers, an integer from 0 to 2^32 - 1"
        )
    spans, expected_offset = [], 0
    for index, entry in enumerate(table):
        if compact:
            if not _is_count(entry):
                raise FormatError(
                    f"{source}: buffer {index} is {str(entry)[:40]}; a 2.7 file lists each buffer's length, "
                    "a non-negative integer"
                )
            offset, length, crc = expected_offset, entry, None
        else:
            if not isinstance(entry, dict) or set(entry) != {"offset", "length", "crc32"}:
                raise FormatError(f"{source}: buffer {index} must have exactly offset, length and crc32")
            offset, length, crc = entry["offset"], entry["length"], entry["crc32"]
            if not all(_is_count(value) for value in (offset, length, crc)):
                raise FormatError(f"{source}: buffer {index} has a non-integer or negative field")
            if offset != expected_offset:
                raise FormatError(
                    f"{source}: buffer {index} starts at {offset}, expected {expected_offset} (buffers are contiguous)"
                )
        end = data_start + offset + length
        if end > file_size:
            raise FormatError(f"{source}: truncated: buffer {index} ends at byte {end}, the file has {file_size}")
        spans.append((data_start + offset, end, crc))
        expected_offset = offset + length + _padding(length)
    if data_start + expected_offset != file_size:
        raise FormatError(
            f"{source}: {file_size - data_start - expected_offset} unexpected bytes after the last buffer"
        )
    return spans


def from_bytes(data: bytes, source: str = "<bytes>") -> Container:
    """Parse and validate a whole container held in memory.

    Args:
        data: the whole file.
        source: the file's name, for errors.

    Returns:
        The Container: header and buffers.

    Raises:
        FormatError: anything malformed or corrupt.
    """
    header, data_start = parse_header(data, source)
    compact = _has_compact_table(data)
    spans = _check_table(header, compact, data_start, len(data), source)
    header.pop("buffers")
    if compact and zlib.crc32(data[data_start:]) != header.pop("buffers_crc32"):
        raise FormatError(f"{source}: the buffers' checksum does not match: the file is corrupt")
    buffers = []
    for index, (start, end, crc) in enumerate(spans):
        buffer = data[start:end]
        if crc is not None and zlib.crc32(buffer) != crc:
            raise FormatError(f"{source}: buffer {index} checksum mismatch: the file is corrupt")
        padding_end = spans[index + 1][0] if index + 1 < len(spans) else len(data)
        if data[end:padding_end].strip(b"\0"):
            raise FormatError(f"{source}: the padding after buffer {index} is not zero bytes: the file is corrupt")
        buffers.append(buffer)
    return Container(header, buffers)


def read_header(path: str | os.PathLike) -> dict:
    """The header with its buffer table, reading and checking only the preamble and header.

    For listing a file's contents without decoding it; the buffers' checksums are not verified.

    Args:
        path: the .dcz file.

    Returns:
        The header, its buffer table included.

    Raises:
        FormatError: the file cannot be read, or its preamble or header is malformed.
    """
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            start = stream.read(PREAMBLE.size)
            if len(start) == PREAMBLE.size and PREAMBLE.unpack(start)[4] <= MAX_HEADER_BYTES:
                start += stream.read(PREAMBLE.unpack(start)[4])
        size = path.stat().st_size
    except OSError as error:
        raise FormatError(f"{path}: cannot read: {error.strerror}") from error
    header, data_start = parse_header(start, str(path))
    _check_table(header, _has_compact_table(start), data_start, size, str(path))
    return header


def read(path: str | os.PathLike) -> Container:
    """Read and validate a whole .dcz file: preamble, header, and every buffer's checksum.

    Args:
        path: the .dcz file.

    Returns:
        The Container: header and buffers.

    Raises:
        FormatError: the file cannot be read, or is malformed or corrupt.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise FormatError(f"{path}: cannot read: {error.strerror}") from error
    return from_bytes(data, str(path))
