"""Lossless storage of the tensors that are not weight-shared (biases, BatchNorm parameters,
layers left unpruned): byte planes, then zstd.

A float's bytes vary at different rates: the sign and exponent byte repeats across a tensor
while the low mantissa bytes look random. Writing byte 0 of every value, then byte 1, and so on
(as blosc's shuffle does) puts the repetitive bytes together, and zstd at level 19 then stores
them in fewer bytes than it does the plain tensor (BENCHMARKS.md, "What the other tensors cost").
A tensor is stored so only when that is smaller than its raw bytes, so the file never grows.

Decoding is told the exact output size by the header (checked by the schema first), and refuses a
frame that would produce more or fewer bytes: a file cannot make us allocate beyond its tensors.
"""

from __future__ import annotations

import numpy as np
import zstandard

from deepshrink.errors import FormatError

LEVEL = 19


def to_planes(data: bytes, item_size: int) -> bytes:
    """Byte k of every item, for k = 0 .. item_size - 1 (the identity for 1-byte items).

    Args:
        data: whole items.
        item_size: bytes per item.

    Returns:
        The planes, concatenated.
    """
    if item_size == 1:
        return data
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, item_size).T.tobytes()


def from_planes(data: bytes, item_size: int) -> bytes:
    """The inverse of `to_planes`.

    Args:
        data: the planes.
        item_size: bytes per item.

    Returns:
        The items.
    """
    if item_size == 1:
        return data
    return np.frombuffer(data, dtype=np.uint8).reshape(item_size, -1).T.tobytes()


def compress(data: bytes, item_size: int) -> bytes | None:
    """The zstd-compressed byte planes of `data`, or None when that is not smaller than `data`.

    Args:
        data: whole items.
        item_size: bytes per item.

    Returns:
        The zstd frame, or None.
    """
    packed = zstandard.ZstdCompressor(level=LEVEL).compress(to_planes(data, item_size))
    return packed if len(packed) < len(data) else None


def decompress(packed: bytes, size: int, item_size: int, what: str) -> bytes:
    """`size` bytes from `compress`'s output; FormatError for a corrupt frame or another size.

    Args:
        packed: the zstd frame.
        size: the bytes the record's shape needs.
        item_size: bytes per item.
        what: the record, for errors.

    Returns:
        The items.

    Raises:
        FormatError: a corrupt frame, or one of another size.
    """
    try:
        # A frame that declares its size is decompressed into a buffer of that size, whatever
        # max_output_size says: a declared size other than the record's is refused before that.
        declared = zstandard.frame_content_size(packed)
        if declared != -1 and declared != size:
            raise FormatError(f"{what}: the zstd frame declares {declared} bytes; the record's shape needs {size}")
        data = zstandard.ZstdDecompressor().decompress(packed, max_output_size=size)
    except zstandard.ZstdError as error:
        raise FormatError(f"{what}: the zstd data is corrupt ({error})") from error
    if len(data) != size:
        raise FormatError(f"{what}: the zstd data holds {len(data)} bytes; the record's shape needs {size}")
    return from_planes(data, item_size)
