"""CSR products computed straight from codebook indices (EIE-style), compiled by numba.

These are the forms for codebooks the tiled and blocked forms cannot hold, for batches on AVX2
machines (blocked_avx2.py runs single samples only) and for CPUs with neither AVX-512 nor AVX2;
where the AVX-512 tiled form (tiled.py) applies, it is several times faster.

A layer is held as CSR: row pointers, column indices (uint16 when the row is short enough) and
one small code per non-zero weight (uint8 for up to 8 bits), plus the float32 codebook. At 9%
density that is 3 bytes per kept weight, about 15x fewer bytes than the dense float32 matrix,
and a batch-1 product is bound by how fast those bytes arrive, so it runs faster than a dense
matrix-vector product that has to stream every weight.

Rows are split across threads (numba prange). For codebooks of up to 256 entries the grouped
form sorts each row's entries by code and keeps per-row code counts instead of the codes: a row
is then sum_k codebook[k] * (sum of the inputs its code-k weights touch), one multiply per code
and a pure gather-and-add inner loop: each 16-entry block is one vector gather that we emit
ourselves (intrinsics.gathered_sum; numba's own loop compiled to a gather built from 16
one-entry inserts: 1.3x slower on AlexNet's fc7, 1.8x on fc8). Batched products add whole input
rows in vector registers instead (intrinsics.add_rows). Results differ from a sequential sum by
rounding only. That form is also smaller: 2 bytes per kept weight plus 2 bytes per (row, code).

Every kernel prefetches its index stream PREFETCH_AHEAD entries ahead (intrinsics.prefetch).
Without it the kernels waited on memory whenever the weights were not in cache: AlexNet's fc7
ran 1.9x faster than dense cold and 4.7-4.9x with the hint (benchmarks/inference_speed.py).
"""

from __future__ import annotations

import numba
import numpy as np

from deepshrink.encode.sparse import SparseLayout
from deepshrink.errors import FormatError
from deepshrink.runtime.intrinsics import (
    GATHER_WIDTH,
    add_rows,
    add_weighted_rows,
    float32_at,
    gathered_sum,
    prefetch,
)


@numba.njit(cache=True, nogil=True)
def _relative_to_csr(gaps, codes, counts, column_map, out_indptr, out_columns, out_codes):
    """Walk the relative-index entries row by row, dropping fillers (code 0); `column_map` takes
    a position among the counted columns to its column.

    Returns the number of non-zeros, -1 when there are more than the outputs hold (a file that
    lies about its count), or -2 when a row's gaps run past its end.
    """
    entry = 0
    kept = 0
    columns_total = len(column_map)
    for row in range(len(counts)):
        position = -1
        for _ in range(counts[row]):
            position += int(gaps[entry]) + 1
            code = codes[entry]
            entry += 1
            if position >= columns_total:
                return -2
            if code != 0:
                if kept >= len(out_columns):
                    return -1
                out_columns[kept] = column_map[position]
                out_codes[kept] = code
                kept += 1
        out_indptr[row + 1] = kept
    return kept


@numba.njit(cache=True, nogil=True)
def _transpose_csr(indptr, columns, codes, columns_total, out_indptr, out_columns, out_codes):
    """CSR of the transpose (a counting sort by column), used to turn a CSC layout into CSR."""
    for index in range(len(columns)):
        out_indptr[columns[index] + 1] += 1
    for column in range(columns_total):
        out_indptr[column + 1] += out_indptr[column]
    cursor = out_indptr[:-1].copy()
    for row in range(len(indptr) - 1):
        for index in range(indptr[row], indptr[row + 1]):
            column = columns[index]
            out_columns[cursor[column]] = row
            out_codes[cursor[column]] = codes[index]
            cursor[column] += 1


def csr_from_layout(sparse: SparseLayout, nonzeros: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr int64, column indices uint16/int32, codes uint8/uint16) of the matrix, no dense step.

    Args:
        sparse: the decoded relative-index entries.
        nonzeros: the count of non-zero weights the record declares.

    Returns:
        (indptr, columns, codes).

    Raises:
        FormatError: the entries overrun a row, or their count is not the declared one.
    """
    major, minor = (sparse.shape[1], sparse.shape[0]) if sparse.layout == "csc" else sparse.shape
    index_type = np.uint16 if minor <= 1 << 16 else np.int32
    code_type = np.uint8 if int(sparse.codes.max(initial=0)) < 256 else np.uint16
    indptr = np.zeros(major + 1, dtype=np.int64)
    columns = np.empty(nonzeros, dtype=index_type)
    codes = np.empty(nonzeros, dtype=code_type)
    kept = _relative_to_csr(sparse.gaps, sparse.codes, sparse.counts, sparse.column_map(), indptr, columns, codes)
    if kept == -2:
        raise FormatError("the gaps of a row run past its end")
    if kept != nonzeros:
        raise FormatError(f"{'more' if kept < 0 else kept} non-zero weights, {nonzeros} declared")
    if sparse.layout == "csc":
        rows = sparse.shape[0]
        row_indptr = np.zeros(rows + 1, dtype=np.int64)
        row_columns = np.empty(nonzeros, dtype=np.uint16 if sparse.shape[1] <= 1 << 16 else np.int32)
        row_codes = np.empty(nonzeros, dtype=code_type)
        _transpose_csr(indptr, columns, codes, rows, row_indptr, row_columns, row_codes)
        return row_indptr, row_columns, row_codes
    return indptr, columns, codes


def compiled(function, parallel: bool):
    """`function` compiled with or without threads. Small layers run serial: waking a second
    thread costs more than their whole product. The distinct name keeps numba's on-disk
    caches of the two variants apart.

    Args:
        function: the Python kernel.
        parallel: compile with numba's prange threads.

    Returns:
        The compiled dispatcher.
    """
    function.__qualname__ = f"{function.__name__}_{'parallel' if parallel else 'serial'}"
    return numba.njit(parallel=parallel, fastmath=True, cache=True, nogil=True)(function)


# Below this many kept weights a layer's product runs on one thread (benchmarks/inference_speed.py).
PARALLEL_MINIMUM_NONZEROS = 100_000

# How many entries ahead of the one being read the kernels prefetch their index (and code)
# streams: 4 KB of uint16 columns. 1,024-8,192 measured alike on AlexNet's FC shapes; 512 was
# too short to hide memory latency with the weights out of cache.
PREFETCH_AHEAD = 2048


def _codebook_matvec(indptr, columns, codes, codebook, vector, out):
    """out[r] = sum_j codebook[codes[j]] * vector[columns[j]] over row r's entries.

    Four partial sums per row: with one, every multiply-add waited for the previous one's
    result (its latency, not the loads, set the pace), and four chains ran 1.2-1.4x faster on
    AlexNet's FC shapes and LeNet-300-100's fc1 (AVX2 code, one thread).
    """
    last = len(columns) - 1
    for row in numba.prange(len(indptr) - 1):
        first = np.float32(0.0)
        second = np.float32(0.0)
        third = np.float32(0.0)
        fourth = np.float32(0.0)
        end = indptr[row + 1]
        index = indptr[row]
        while index + 4 <= end:
            if index % 32 < 4:  # once per 32 entries (a cache line of uint16 columns)
                prefetch(columns, min(index + PREFETCH_AHEAD, last))
                prefetch(codes, min(index + PREFETCH_AHEAD, last))
            first += codebook[codes[index]] * vector[columns[index]]
            second += codebook[codes[index + 1]] * vector[columns[index + 1]]
            third += codebook[codes[index + 2]] * vector[columns[index + 2]]
            fourth += codebook[codes[index + 3]] * vector[columns[index + 3]]
            index += 4
        while index < end:
            first += codebook[codes[index]] * vector[columns[index]]
            index += 1
        out[row] = (first + second) + (third + fourth)


def _codebook_matmul(indptr, columns, codes, codebook, inputs, out):
    """out[r, :] = sum_j codebook[codes[j]] * inputs[columns[j], :]: inputs is (in, batch) row-major."""
    batch = inputs.shape[1]
    last = len(columns) - 1
    for row in numba.prange(len(indptr) - 1):
        accumulator = np.zeros(batch, dtype=np.float32)
        begin = indptr[row]
        for ahead in range(begin, indptr[row + 1], 32):  # a cache line of uint16 columns each
            prefetch(columns, min(ahead + PREFETCH_AHEAD, last))
            prefetch(codes, min(ahead + PREFETCH_AHEAD, last))
        add_weighted_rows(accumulator, inputs, columns, codes, codebook, begin, indptr[row + 1] - begin)
        out[row, :] = accumulator


# Each (row, code) run of the grouped form is padded to a multiple of this many entries, so the
# inner loop always runs whole blocks of one vector gather each (intrinsics.gathered_sum).
BLOCK = GATHER_WIDTH


def _grouped_matvec(indptr, blocks, columns, codebook, vector, out):
    """The product with each row's entries grouped by code: blocks[r, k] blocks of BLOCK entries
    use codebook[k], so a row is sum_k codebook[k] * (sum of the inputs its code-k weights
    touch): one multiply per code and a pure gather-and-add inner loop. Padding entries point at
    the zero that the caller appends to `vector`."""
    groups = blocks.shape[1]
    last = len(columns) - 1
    for row in numba.prange(len(indptr) - 1):
        index = indptr[row]
        total = np.float32(0.0)
        for code in range(groups):
            count = np.int64(blocks[row, code])
            if count:
                prefetch(columns, min(index + PREFETCH_AHEAD, last))
                total += codebook[code] * gathered_sum(vector, columns, index, count)
                index += count * BLOCK
        out[row] = total


def _grouped_matmul(indptr, blocks, columns, codebook, inputs, out):
    """Batched `_grouped_matvec`: inputs is (in + 1, batch) row-major with a zero last row."""
    groups = blocks.shape[1]
    batch = inputs.shape[1]
    last = len(columns) - 1
    for row in numba.prange(len(indptr) - 1):
        accumulator = np.zeros(batch, dtype=np.float32)
        partial = np.empty(batch, dtype=np.float32)
        index = indptr[row]
        for code in range(groups):
            count = np.int64(blocks[row, code]) * BLOCK
            if count == 0:
                continue
            for ahead in range(index, index + count, 32):
                prefetch(columns, min(ahead + PREFETCH_AHEAD, last))
            partial[:] = 0.0
            add_rows(partial, inputs, columns, index, count)
            index += count
            weight = codebook[code]
            for column in range(batch):
                accumulator[column] += weight * partial[column]
        out[row, :] = accumulator


@numba.njit(cache=True, nogil=True)
def _group_rows(indptr, columns, codes, blocks, out_indptr, out_columns, padding):
    """Sort each row's entries by code (stably), each code's run padded to whole blocks."""
    groups = blocks.shape[1]
    counts = np.zeros(groups, dtype=np.int64)
    cursor = np.empty(groups, dtype=np.int64)
    for row in range(len(indptr) - 1):
        counts[:] = 0
        for index in range(indptr[row], indptr[row + 1]):
            counts[codes[index]] += 1
        position = out_indptr[row]
        for code in range(groups):
            whole = (counts[code] + BLOCK - 1) // BLOCK
            blocks[row, code] = whole
            cursor[code] = position
            for slot in range(position + counts[code], position + whole * BLOCK):
                out_columns[slot] = padding
            position += whole * BLOCK
        out_indptr[row + 1] = position
        for index in range(indptr[row], indptr[row + 1]):
            code = codes[index]
            out_columns[cursor[code]] = columns[index]
            cursor[code] += 1


@numba.njit(cache=True, nogil=True)
def _padded_length(indptr, codes, groups):
    counts = np.zeros(groups, dtype=np.int64)
    total = 0
    for row in range(len(indptr) - 1):
        counts[:] = 0
        for index in range(indptr[row], indptr[row + 1]):
            counts[codes[index]] += 1
        for code in range(groups):
            total += (counts[code] + BLOCK - 1) // BLOCK * BLOCK
    return total


# Above this many codes the per-row block counts would outgrow the codes themselves.
GROUPED_MAXIMUM_CODES = 256


def _grouped_types(indptr, columns, padding: int) -> tuple[np.dtype, np.dtype]:
    """(column index type, block count type) of the grouped form."""
    index_type = columns.dtype if padding < np.iinfo(columns.dtype).max else np.dtype(np.int32)
    widest = int(np.diff(indptr).max(initial=0)) // BLOCK + 1
    return index_type, np.dtype(np.uint16 if widest < 1 << 16 else np.uint32)


def grouped_nbytes(indptr, columns, codes, groups: int, padding: int) -> int:
    """Bytes of the padded columns and block counts that group_by_code would build.

    Args:
        indptr: the row pointers.
        columns: the column indices.
        codes: each entry's code.
        codebook: code -> value.
        groups: the codebook's entries.
        padding: the padding entries' column index.

    Returns:
        The bytes.
    """
    index_type, block_type = _grouped_types(indptr, columns, padding)
    length = _padded_length(indptr, codes, groups)
    return length * index_type.itemsize + (len(indptr) - 1) * groups * block_type.itemsize


def group_by_code(indptr, columns, codes, groups: int, padding: int):
    """(row pointers, blocks rows x groups, padded columns) of the grouped form.

    `padding` is the column index padding entries use: one past the last real column, where the
    product appends a zero.

    Args:
        indptr: the row pointers.
        columns: the column indices.
        codes: each entry's code.
        codebook: code -> value.
        groups: the codebook's entries.
        padding: the padding entries' column index.

    Returns:
        (indptr, blocks, columns).
    """
    index_type, block_type = _grouped_types(indptr, columns, padding)
    out_columns = np.empty(_padded_length(indptr, codes, groups), dtype=index_type)
    out_indptr = np.zeros(len(indptr), dtype=np.int64)
    blocks = np.zeros((len(indptr) - 1, groups), dtype=block_type)
    _group_rows(indptr, columns, codes, blocks, out_indptr, out_columns, padding)
    return out_indptr, blocks, out_columns


MATVEC = {parallel: compiled(_codebook_matvec, parallel) for parallel in (False, True)}
MATMUL = {parallel: compiled(_codebook_matmul, parallel) for parallel in (False, True)}
GROUPED_MATVEC = {parallel: compiled(_grouped_matvec, parallel) for parallel in (False, True)}
GROUPED_MATMUL = {parallel: compiled(_grouped_matmul, parallel) for parallel in (False, True)}


# Batch-1 entry points, one numba call per layer: the input is read from a tensor's address
# and the bias added in place, so the module's call converts nothing and allocates only its
# output (CompressedLinear.forward's first branch). Each takes (result (1, rows), input address,
# bias (rows or 0 floats), parallel, the form's arrays..., columns).
_MATVEC_SERIAL, _MATVEC_PARALLEL = MATVEC[False], MATVEC[True]
_GROUPED_MATVEC_SERIAL, _GROUPED_MATVEC_PARALLEL = GROUPED_MATVEC[False], GROUPED_MATVEC[True]


@numba.njit(cache=True, nogil=True)
def add_bias(result, bias):
    """result += bias, where the layer has one (an empty `bias` adds nothing).

    Args:
        result: float32 (rows,), updated.
        bias: float32 (rows,) or (0,).
    """
    for row in range(len(bias)):
        result[row] += bias[row]


@numba.njit(cache=True, nogil=True)
def per_entry_vector(result, address, bias, parallel, indptr, columns, codes, codebook, width):
    """result[0] = W @ x + bias for the per-entry form, x the `width` floats at `address`.

    Args:
        result: float32 (1, rows), written.
        address: the input's address (intrinsics.float32_at).
        bias: float32 (rows,) or (0,).
        parallel: run the threaded kernel.
        indptr: the row pointers.
        columns: the column indices.
        codes: each entry's code.
        codebook: code -> value.
        width: the input's floats.
    """
    vector = numba.carray(float32_at(address), width)
    if parallel:
        _MATVEC_PARALLEL(indptr, columns, codes, codebook, vector, result[0])
    else:
        _MATVEC_SERIAL(indptr, columns, codes, codebook, vector, result[0])
    add_bias(result[0], bias)


@numba.njit(cache=True, nogil=True)
def grouped_vector(result, address, bias, parallel, indptr, counts, columns, codebook, width):
    """result[0] = W @ x + bias for the grouped form, x the `width` floats at `address`.

    Args:
        result: float32 (1, rows), written.
        address: the input's address (intrinsics.float32_at).
        bias: float32 (rows,) or (0,).
        parallel: run the threaded kernel.
        indptr: the row pointers.
        counts: blocks[row, code].
        columns: the padded column indices.
        codebook: code -> value.
        width: the input's floats.
    """
    inputs = numba.carray(float32_at(address), width)
    vector = np.empty(width + 1, dtype=np.float32)  # a zero last, for the padding entries
    for column in range(width):
        vector[column] = inputs[column]
    vector[width] = 0.0
    if parallel:
        _GROUPED_MATVEC_PARALLEL(indptr, counts, columns, codebook, vector, result[0])
    else:
        _GROUPED_MATVEC_SERIAL(indptr, counts, columns, codebook, vector, result[0])
    add_bias(result[0], bias)


def codebook_matvec(indptr, columns, codes, codebook, vector, out) -> None:
    """out = W @ vector for the per-entry form, threaded when the layer is large enough to gain.

    Args:
        indptr: the row pointers.
        columns: the column indices.
        codes: each entry's code.
        codebook: code -> value.
        vector: float32 (columns,).
        out: float32 (rows,), written.
    """
    MATVEC[len(codes) >= PARALLEL_MINIMUM_NONZEROS](indptr, columns, codes, codebook, vector, out)


def codebook_matmul(indptr, columns, codes, codebook, inputs, out) -> None:
    """out = W @ inputs for the per-entry form, threaded when the work is large enough to gain.

    Args:
        indptr: the row pointers.
        columns: the column indices.
        codes: each entry's code.
        codebook: code -> value.
        inputs: float32 (columns, batch).
        out: float32 (rows, batch), written.
    """
    work = len(codes) * inputs.shape[1]
    MATMUL[work >= PARALLEL_MINIMUM_NONZEROS](indptr, columns, codes, codebook, inputs, out)


def grouped_matvec(indptr, counts, columns, codebook, vector, out) -> None:
    """out = W @ vector for the grouped form, threaded when the layer is large enough to gain.

    Args:
        indptr: the row pointers.
        counts: blocks[row, code], each row's blocks of BLOCK entries per code.
        columns: the padded column indices.
        codebook: code -> value.
        vector: float32 (columns + 1,), a zero last for the padding.
        out: float32 (rows,), written.
    """
    GROUPED_MATVEC[len(columns) >= PARALLEL_MINIMUM_NONZEROS](indptr, counts, columns, codebook, vector, out)


def grouped_matmul(indptr, counts, columns, codebook, inputs, out) -> None:
    """out = W @ inputs for the grouped form, threaded when the work is large enough to gain.

    Args:
        indptr: the row pointers.
        counts: blocks[row, code], each row's blocks of BLOCK entries per code.
        columns: the padded column indices.
        codebook: code -> value.
        inputs: float32 (columns + 1, batch), a zero row last for the padding.
        out: float32 (rows, batch), written.
    """
    work = len(columns) * inputs.shape[1]
    GROUPED_MATMUL[work >= PARALLEL_MINIMUM_NONZEROS](indptr, counts, columns, codebook, inputs, out)
