"""Bit I/O, MSB first: the byte-by-byte writer of the fixed-width coder, and the 64-bit
big-endian loads and stores the Huffman coder reads and writes its lanes with."""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

MAX_WIDTH = 56  # bits per value that the 64-bit buffer takes with up to 7 bits already waiting


@numba.njit(cache=True, nogil=True, inline="always")
def put_bits(buffer, filled, position, value, width, out):
    """Append the low `width` bits of `value`; returns the new (buffer, filled, position).

    Args:
        buffer: the bits not yet written (uint64).
        filled: how many of them there are.
        position: the next byte of `out` to write.
        value: the bits to append.
        width: how many bits of `value`.
        out: the output bytes.

    Returns:
        (buffer, filled, position) after the write.
    """
    buffer = (buffer << np.uint64(width)) | np.uint64(value)
    filled += width
    while filled >= 8:
        filled -= 8
        out[position] = np.uint8((buffer >> np.uint64(filled)) & np.uint64(0xFF))
        position += 1
    return buffer, filled, position


@numba.njit(cache=True, nogil=True, inline="always")
def flush(buffer, filled, position, out):
    """Write the last partial byte, zero-padded; returns the number of bytes written.

    Args:
        buffer: the bits not yet written.
        filled: how many of them there are (< 8).
        position: the next byte of `out` to write.
        out: the output bytes.

    Returns:
        The new position: the bytes written in all.
    """
    if filled > 0:
        out[position] = np.uint8((buffer << np.uint64(8 - filled)) & np.uint64(0xFF))
        position += 1
    return position


def _is_byte_array(value) -> bool:
    return isinstance(value, types.Array) and value.ndim == 1 and value.layout == "C" and value.dtype == types.uint8


def _byte_address(context, builder, signature, arguments):
    """An i64 pointer to array[index], for one unaligned 8-byte access."""
    view = context.make_array(signature.args[0])(context, builder, arguments[0])
    offset = context.cast(builder, arguments[1], signature.args[1], types.intp)
    return builder.bitcast(builder.gep(view.data, [offset]), ir.IntType(64).as_pointer())


def _byte_swap(builder, value):
    word = ir.IntType(64)
    function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(word, [word]), "llvm.bswap.i64")
    return builder.call(function, [value])


@intrinsic
def load_big_endian(typing_context, data, index):
    """The 8 bytes data[index : index + 8] as one big-endian uint64: one unaligned load and a
    byte swap. numba's own byte-by-byte form stayed eight loads (LLVM did not merge them), which
    held the Huffman decoder at half its speed. The caller keeps index + 8 inside `data`.

    Args:
        typing_context: numba's typing context (the intrinsic protocol).
        data: a uint8 array.
        index: the first byte's index.

    Returns:
        The signature and code generator (numba's intrinsic protocol), or None for other types.
    """
    if not (_is_byte_array(data) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, arguments):
        address = _byte_address(context, builder, signature, arguments)
        return _byte_swap(builder, builder.load(address, align=1))

    return types.uint64(data, index), codegen


@intrinsic
def store_big_endian(typing_context, out, index, value):
    """Write `value` (uint64) to out[index : index + 8], most significant byte first: one byte
    swap and one unaligned store where numba's form was eight byte stores. The caller keeps
    index + 8 inside `out`.

    Args:
        typing_context: numba's typing context (the intrinsic protocol).
        out: a uint8 array.
        index: the first byte's index.
        value: the uint64 to write.

    Returns:
        The signature and code generator (numba's intrinsic protocol), or None for other types.
    """
    if not (_is_byte_array(out) and isinstance(index, types.Integer) and value == types.uint64):
        return None

    def codegen(context, builder, signature, arguments):
        address = _byte_address(context, builder, signature, arguments)
        builder.store(_byte_swap(builder, arguments[2]), address, align=1)
        return context.get_dummy_value()

    return types.void(out, index, value), codegen
