"""Sparse x dense products computed straight from codebook indices (EIE-style), compiled by numba.

A layer is held as CSR: row pointers, column indices (uint16 when the row is short enough) and
one small code per non-zero weight (uint8 for up to 8 bits), plus the float32 codebook. At 9%
density that is 3 bytes per kept weight, about 15x fewer bytes than the dense float32 matrix,
and a batch-1 product is bound by how fast those bytes arrive, so it runs faster than a dense
matrix-vector product that has to stream every weight.

Rows are split across threads (numba prange); each row's sum uses four accumulators so that
the compiler can keep several gathers in flight and vectorise them (fastmath allows the
reassociation; the results then differ from a sequential sum by rounding only).
"""

from __future__ import annotations

import numba
import numpy as np

from deepshrink.encode.sparse import SparseLayout


@numba.njit(cache=True, nogil=True)
def _relative_to_csr(gaps, codes, counts, columns_total, out_indptr, out_columns, out_codes):
    """Walk the relative-index entries row by row, dropping fillers (code 0).

    Returns the number of non-zeros, -1 when there are more than the outputs hold (a file that
    lies about its count), or -2 when a row's gaps run past its end.
    """
    entry = 0
    kept = 0
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
                out_columns[kept] = position
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
    """(indptr int64, column indices uint16/int32, codes uint8/uint16) of the matrix, no dense step."""
    major, minor = (sparse.shape[1], sparse.shape[0]) if sparse.layout == "csc" else sparse.shape
    index_type = np.uint16 if minor <= 1 << 16 else np.int32
    code_type = np.uint8 if int(sparse.codes.max(initial=0)) < 256 else np.uint16
    indptr = np.zeros(major + 1, dtype=np.int64)
    columns = np.empty(nonzeros, dtype=index_type)
    codes = np.empty(nonzeros, dtype=code_type)
    kept = _relative_to_csr(sparse.gaps, sparse.codes, sparse.counts, minor, indptr, columns, codes)
    if kept == -2:
        raise ValueError("the gaps of a row run past its end")
    if kept != nonzeros:
        raise ValueError(f"{'more' if kept < 0 else kept} non-zero weights, {nonzeros} declared")
    if sparse.layout == "csc":
        rows = sparse.shape[0]
        row_indptr = np.zeros(rows + 1, dtype=np.int64)
        row_columns = np.empty(nonzeros, dtype=np.uint16 if sparse.shape[1] <= 1 << 16 else np.int32)
        row_codes = np.empty(nonzeros, dtype=code_type)
        _transpose_csr(indptr, columns, codes, rows, row_indptr, row_columns, row_codes)
        return row_indptr, row_columns, row_codes
    return indptr, columns, codes


def _compiled(function, parallel: bool):
    """`function` compiled with or without threads. Small layers run serial: waking a second
    thread costs more than their whole product. The distinct name keeps numba's on-disk
    caches of the two variants apart."""
    function.__qualname__ = f"{function.__name__}_{'parallel' if parallel else 'serial'}"
    return numba.njit(parallel=parallel, fastmath=True, cache=True, nogil=True)(function)


# Below this many kept weights a layer's product runs on one thread (benchmarks/inference_speed.py).
PARALLEL_MINIMUM_NONZEROS = 100_000


def _codebook_matvec(indptr, columns, codes, codebook, vector, out):
    """out[r] = sum_j codebook[codes[j]] * vector[columns[j]] over row r's entries."""
    for row in numba.prange(len(indptr) - 1):
        start = indptr[row]
        end = indptr[row + 1]
        first = np.float32(0.0)
        second = np.float32(0.0)
        third = np.float32(0.0)
        fourth = np.float32(0.0)
        index = start
        while index + 4 <= end:
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
    for row in numba.prange(len(indptr) - 1):
        accumulator = np.zeros(batch, dtype=np.float32)
        for index in range(indptr[row], indptr[row + 1]):
            weight = codebook[codes[index]]
            source = inputs[columns[index]]
            for column in range(batch):
                accumulator[column] += weight * source[column]
        out[row, :] = accumulator


MATVEC = {parallel: _compiled(_codebook_matvec, parallel) for parallel in (False, True)}
MATMUL = {parallel: _compiled(_codebook_matmul, parallel) for parallel in (False, True)}


def codebook_matvec(indptr, columns, codes, codebook, vector, out) -> None:
    MATVEC[len(codes) >= PARALLEL_MINIMUM_NONZEROS](indptr, columns, codes, codebook, vector, out)


def codebook_matmul(indptr, columns, codes, codebook, inputs, out) -> None:
    work = len(codes) * inputs.shape[1]
    MATMUL[work >= PARALLEL_MINIMUM_NONZEROS](indptr, columns, codes, codebook, inputs, out)
