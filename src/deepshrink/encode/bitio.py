"""The bit writer shared by the Huffman coder and the fixed-width coder: MSB first, byte by byte."""

from __future__ import annotations

import numba
import numpy as np

MAX_WIDTH = 56  # bits per value that the 64-bit buffer takes with up to 7 bits already waiting


@numba.njit(cache=True, nogil=True, inline="always")
def put_bits(buffer, filled, position, value, width, out):
    """Append the low `width` bits of `value`; returns the new (buffer, filled, position)."""
    buffer = (buffer << np.uint64(width)) | np.uint64(value)
    filled += width
    while filled >= 8:
        filled -= 8
        out[position] = np.uint8((buffer >> np.uint64(filled)) & np.uint64(0xFF))
        position += 1
    return buffer, filled, position


@numba.njit(cache=True, nogil=True, inline="always")
def flush(buffer, filled, position, out):
    """Write the last partial byte, zero-padded; returns the number of bytes written."""
    if filled > 0:
        out[position] = np.uint8((buffer << np.uint64(8 - filled)) & np.uint64(0xFF))
        position += 1
    return position
