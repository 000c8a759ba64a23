"""The relative-index sparse layout of Han et al. (2016), Figure 2.

A weight tensor's codes (0 = exact zero) are viewed as a 2-D matrix (conv: out x in*kh*kw) and
stored row by row (CSR) or column by column (CSC) as entries (gap, code): `gap` zeros are
skipped, then `code` is placed. Gaps are stored in `index_bits` bits, so when more than
2^index_bits - 1 zeros lie between two non-zeros a filler entry (2^index_bits - 1, code 0) is
inserted: it skips that many zeros and places one more zero, which costs nothing because code 0
is the exact zero reserved by the quantization stage.

Each row's (or column's) number of entries is kept in `counts`, the compact form of the row
pointers; the encoder stores them with the same entropy coder as everything else.

Optionally (format 2.7) the gaps count only the used columns, those holding a non-zero: `used`
lists them, and a row's positions are indices into it. Pruning leaves inputs no weight reads
(the outputs of a previous layer's dead units), and skipping them in every row costs bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from deepshrink.errors import ConfigError, FormatError

LAYOUTS = ("csr", "csc")


@dataclass(frozen=True)
class SparseLayout:
    gaps: np.ndarray  # uint8/uint16, one per entry
    codes: np.ndarray  # same dtype as the input codes, one per entry (0 for fillers)
    counts: np.ndarray  # int64, entries per row (CSR) or column (CSC)
    shape: tuple[int, int]
    layout: str
    index_bits: int
    used: np.ndarray | None = None  # int64, ascending: the stored columns the gaps count, or None for all

    @property
    def stored_shape(self) -> tuple[int, int]:
        """(rows, columns) as the entries walk them: the matrix's, transposed under CSC."""
        rows, columns = self.shape
        return (columns, rows) if self.layout == "csc" else (rows, columns)

    @property
    def counted_columns(self) -> int:
        """The columns a row's gaps walk: the used ones, or every stored column."""
        return len(self.used) if self.used is not None else self.stored_shape[1]

    def column_map(self) -> np.ndarray:
        """Position among the counted columns -> stored column.

        Returns:
            `used`, or every stored column's index (int64).
        """
        return self.used if self.used is not None else np.arange(self.stored_shape[1], dtype=np.int64)

    @property
    def fillers(self) -> int:
        """The filler entries (code 0), which only carry a gap too long for the index."""
        return int(np.count_nonzero(self.codes == 0))


def as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view of a weight tensor: (first dimension, product of the rest).

    Args:
        shape: the tensor's shape.

    Returns:
        (rows, columns).
    """
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 1:
        return (1, int(shape[0]))
    return (int(shape[0]), math.prod(int(side) for side in shape[1:]))  # Python integers: no overflow


@numba.njit(cache=True, nogil=True)
def _count_entries(matrix, max_gap):
    rows, columns = matrix.shape
    counts = np.zeros(rows, dtype=np.int64)
    for row in range(rows):
        previous = -1
        for column in range(columns):
            if matrix[row, column] != 0:
                gap = column - previous - 1
                counts[row] += gap // (max_gap + 1) + 1
                previous = column
    return counts


@numba.njit(cache=True, nogil=True)
def _fill_entries(matrix, max_gap, gaps, codes):
    rows, columns = matrix.shape
    position = 0
    for row in range(rows):
        previous = -1
        for column in range(columns):
            value = matrix[row, column]
            if value != 0:
                gap = column - previous - 1
                while gap > max_gap:
                    gaps[position] = max_gap
                    codes[position] = 0
                    position += 1
                    gap -= max_gap + 1
                gaps[position] = gap
                codes[position] = value
                position += 1
                previous = column


def to_sparse(codes: np.ndarray, index_bits: int, layout: str = "csr", used_only: bool = False) -> SparseLayout:
    """Encode a tensor of codes (0 = zero) into (gap, code) entries with filler zeros.

    Args:
        codes: the code tensor.
        index_bits: the gap width, 1 to 16.
        layout: "csr" (gaps along rows) or "csc" (along columns).
        used_only: count the gaps over the used columns only (those with a non-zero code), and
            list them in the layout's `used`.

    Returns:
        The SparseLayout.

    Raises:
        ConfigError: an unknown layout, or a width outside 1-16.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r} should be one of {', '.join(LAYOUTS)}")
    if not isinstance(index_bits, int) or not 1 <= index_bits <= 16:
        raise ConfigError(f"index_bits={index_bits!r} should be an integer from 1 to 16 (paper: 8 conv, 5 fc)")
    shape = as_matrix(codes.shape)
    matrix = np.ascontiguousarray(codes.reshape(shape))
    if layout == "csc":
        matrix = np.ascontiguousarray(matrix.T)
    used = None
    if used_only:
        used = np.flatnonzero(matrix.any(axis=0)).astype(np.int64)
        matrix = np.ascontiguousarray(matrix[:, used])
    max_gap = (1 << index_bits) - 1
    counts = _count_entries(matrix, max_gap)
    total = int(counts.sum())
    gaps = np.empty(total, dtype=np.uint8 if index_bits <= 8 else np.uint16)
    entry_codes = np.empty(total, dtype=matrix.dtype)
    _fill_entries(matrix, max_gap, gaps, entry_codes)
    return SparseLayout(gaps, entry_codes, counts, shape, layout, index_bits, used)


@numba.njit(cache=True, nogil=True)
def _scatter(gaps, codes, counts, column_map, matrix):
    """Place the entries; returns -1 if a row's entries run past its end."""
    rows = matrix.shape[0]
    columns = len(column_map)
    position = 0
    for row in range(rows):
        column = -1
        for _ in range(counts[row]):
            column += gaps[position] + 1
            if column >= columns:
                return -1
            matrix[row, column_map[column]] = codes[position]
            position += 1
    return 0


@numba.njit(cache=True, nogil=True)
def _scatter_values(gaps, codes, counts, codebook, out, column_map, output_columns, transposed):
    """Write codebook[code] of every entry into the zeroed, flat, row-major `out`; returns how
    many are non-zero, or -1 if a row's entries run past its end."""
    position = 0
    nonzeros = 0
    counted_columns = len(column_map)
    for row in range(len(counts)):
        counted = -1
        for _ in range(counts[row]):
            counted += gaps[position] + 1
            if counted >= counted_columns:
                return -1
            column = column_map[counted]
            value = codebook[codes[position]]
            if transposed:  # csc: the stored row is the matrix's column
                out[column * output_columns + row] = value
            else:
                out[row * output_columns + column] = value
            if value != 0:
                nonzeros += 1
            position += 1
    return nonzeros


def values_from_sparse(sparse: SparseLayout, codebook: np.ndarray, out: np.ndarray) -> int:
    """The weights themselves (codebook values, zeros elsewhere) written into `out`, a flat
    float32 array of the matrix's size, with no dense code matrix in between; returns the count
    of non-zero weights. Inconsistent entries raise FormatError, as in from_sparse.

    Args:
        sparse: the entries.
        codebook: code -> value.
        out: the flat output.

    Returns:
        The count of non-zero weights.

    Raises:
        FormatError: the entries do not fit the matrix.
    """
    rows, columns = sparse.shape
    stored_rows = sparse.stored_shape[0]
    if len(sparse.counts) != stored_rows or int(sparse.counts.sum()) != len(sparse.gaps):
        raise FormatError("entry counts do not add up to the number of stored entries")
    if len(sparse.codes) != len(sparse.gaps) or out.size != rows * columns:
        raise FormatError("the entries do not match the tensor's size")
    out[:] = 0
    nonzeros = _scatter_values(
        sparse.gaps, sparse.codes, sparse.counts, codebook, out, sparse.column_map(), columns, sparse.layout == "csc"
    )
    if nonzeros < 0:
        raise FormatError("the gaps of a row run past its end: the sparse layout is corrupt")
    return nonzeros


@numba.njit(cache=True, nogil=True)
def _rows_overrun(gaps, counts, columns):
    position = 0
    for row in range(len(counts)):
        column = -1
        for _ in range(counts[row]):
            column += gaps[position] + 1
            position += 1
        if column >= columns:
            return True
    return False


def check_entries(sparse: SparseLayout) -> None:
    """The entries fit the matrix (counts add up, no row's gaps run past its end), without
    building it; FormatError otherwise.

    Args:
        sparse: the entries.

    Raises:
        FormatError: the entries do not fit the matrix.
    """
    stored_rows = sparse.stored_shape[0]
    if len(sparse.counts) != stored_rows or int(sparse.counts.sum()) != len(sparse.gaps):
        raise FormatError("entry counts do not add up to the number of stored entries")
    if _rows_overrun(sparse.gaps, sparse.counts, sparse.counted_columns):
        raise FormatError("the gaps of a row run past its end: the sparse layout is corrupt")


def from_sparse(sparse: SparseLayout, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The dense code tensor back from its entries; inconsistent entries raise FormatError.

    Args:
        sparse: the entries.
        shape: the tensor's shape (default: the 2-D matrix).

    Returns:
        The codes.

    Raises:
        FormatError: the entries do not fit the matrix.
    """
    stored_rows, stored_columns = sparse.stored_shape
    if len(sparse.counts) != stored_rows:
        raise FormatError(
            f"{len(sparse.counts)} entry counts for {stored_rows} {'columns' if sparse.layout == 'csc' else 'rows'}"
        )
    if (
        np.any(sparse.counts < 0)
        or int(sparse.counts.sum()) != len(sparse.gaps)
        or len(sparse.gaps) != len(sparse.codes)
    ):
        raise FormatError("entry counts do not add up to the number of stored entries")
    if len(sparse.gaps) and int(sparse.gaps.max()) > (1 << sparse.index_bits) - 1:
        raise FormatError(f"a gap exceeds the {sparse.index_bits}-bit index range")
    matrix = np.zeros((stored_rows, stored_columns), dtype=sparse.codes.dtype)
    if _scatter(sparse.gaps, sparse.codes, sparse.counts, sparse.column_map(), matrix) < 0:
        raise FormatError("the gaps of a row run past its end: the sparse layout is corrupt")
    if sparse.layout == "csc":
        matrix = np.ascontiguousarray(matrix.T)
    return matrix.reshape(shape) if shape is not None else matrix
