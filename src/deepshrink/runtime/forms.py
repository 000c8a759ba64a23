"""The in-memory forms a compressed weight matrix runs from, and the choice between them.

All four hold codebook indices, never float weights:
- "tiled": tiled.TiledCodes, register tiles (16 rows x 32 columns, codebooks of up to 64
  entries), no memory gathers; AVX-512 CPUs only, and the fastest wherever it applies.
- "blocked": blocked_avx2.Avx2BlockedCodes, 8 rows a chunk, 8 weights of one code a block, one
  gather of their inputs (up to 256 entries); AVX2 CPUs, single samples (batches run per entry);
  the automatic choice without AVX-512, at batch 1 1.4-4.2x faster than the per-entry kernel.
- "grouped": CSR with each row's entries grouped by code, one vector gather per 16 entries;
  chosen automatically only on AVX-512 CPUs.
- "per-entry": CSR with one code per entry; the smallest for small layers with many codes, and
  the automatic choice where neither of the first two applies.

Each form's `product(inputs)` takes float32 inputs of shape (batch, columns) and returns
(batch, rows). Its `vector_call` is the batch-1 entry point (kernels.py, "Batch-1 entry points")
and the arguments it takes after (result, input address, bias): one numba call per sample.
"""

from __future__ import annotations

import numpy as np
import torch

from deepshrink.errors import ConfigError
from deepshrink.runtime import blocked_avx2, tiled
from deepshrink.runtime.blocked_avx2 import Avx2BlockedCodes
from deepshrink.runtime.kernels import (
    BLOCK,
    GROUPED_MAXIMUM_CODES,
    PARALLEL_MINIMUM_NONZEROS,
    codebook_matmul,
    codebook_matvec,
    group_by_code,
    grouped_matmul,
    grouped_matvec,
    grouped_nbytes,
    grouped_vector,
    per_entry_vector,
)
from deepshrink.runtime.tiled import TiledCodes

FORMS = ("tiled", "blocked", "grouped", "per-entry")

# A faster form is given up for one code per entry only where it would be this many times
# larger: the padding of either grows out of proportion in small layers with many codes (a
# 16 x 32 1x1 conv at 35% density and 6 bits grew from about 0.7 KB to 7 KB grouped) or in very
# sparse ones (tiled pads each 16-row chunk to its longest row in every 32-column tile).
SIZE_LIMIT = 2.0


def _columns_major_product(
    matvec, matmul, indptr, middle, last, codebook, inputs: np.ndarray, zero_column: bool = False
) -> np.ndarray:
    """Run a CSR kernel, which takes a vector or (columns, batch) inputs, on (batch, columns).
    With `zero_column` the kernel's inputs get one zero past the last column (for padding
    entries), written in the same copy that transposes them."""
    rows = len(indptr) - 1
    batch, width = inputs.shape
    laid_out = np.empty((width + zero_column, batch), dtype=np.float32)
    laid_out[:width] = inputs.T
    laid_out[width:] = 0.0
    if batch == 1:
        out = np.empty(rows, dtype=np.float32)
        matvec(indptr, middle, last, codebook, laid_out[:, 0], out)
        return out[None, :]
    out = np.empty((rows, batch), dtype=np.float32)
    matmul(indptr, middle, last, codebook, laid_out, out)
    return out.T


class PerEntryCodes:
    """CSR: row pointers, column indices and one code per kept weight."""

    def __init__(self, indptr, columns, codes, codebook, shape: tuple[int, int]) -> None:
        self.indptr, self.columns, self.codes = indptr, columns, codes
        self.codebook = codebook
        self.shape = shape

    @property
    def nbytes(self) -> int:
        """The bytes of the form's arrays."""
        return self.indptr.nbytes + self.columns.nbytes + self.codes.nbytes + self.codebook.nbytes

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, code) of every kept weight.

        Returns:
            Three int64 arrays.
        """
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
        return rows, self.columns.astype(np.int64), self.codes.astype(np.int64)

    def product(self, inputs: np.ndarray) -> np.ndarray:
        """inputs @ W.T.

        Args:
            inputs: float32, (batch, columns), C-contiguous.

        Returns:
            (batch, rows) float32.
        """
        return _columns_major_product(
            codebook_matvec, codebook_matmul, self.indptr, self.columns, self.codes, self.codebook, inputs
        )

    @property
    def vector_call(self) -> tuple:
        """The batch-1 entry point and its arguments after (result, address, bias).

        Returns:
            (per_entry_vector, its arguments).
        """
        parallel = len(self.codes) >= PARALLEL_MINIMUM_NONZEROS
        return per_entry_vector, (parallel, self.indptr, self.columns, self.codes, self.codebook, self.shape[1])


class GroupedCodes:
    """CSR with each row's entries sorted by code, each code's run padded to whole blocks
    (kernels.group_by_code): row pointers, column indices and per-row block counts per code."""

    def __init__(self, indptr, columns, codes, codebook, shape: tuple[int, int]) -> None:
        self.codebook = codebook
        self.shape = shape
        self.indptr, self.blocks, self.columns = group_by_code(indptr, columns, codes, len(codebook), shape[1])

    @property
    def nbytes(self) -> int:
        """The bytes of the form's arrays."""
        return self.indptr.nbytes + self.columns.nbytes + self.blocks.nbytes + self.codebook.nbytes

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, code) of every kept weight, padding left out.

        Returns:
            Three int64 arrays.
        """
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
        codes = np.repeat(np.tile(np.arange(len(self.codebook)), self.shape[0]), self.blocks.reshape(-1) * BLOCK)
        real = self.columns != self.shape[1]
        return rows[real], self.columns[real].astype(np.int64), codes[real]

    def product(self, inputs: np.ndarray) -> np.ndarray:
        # Padding entries read one zero appended past the last column.
        """inputs @ W.T.

        Args:
            inputs: float32, (batch, columns), C-contiguous.

        Returns:
            (batch, rows) float32.
        """
        return _columns_major_product(
            grouped_matvec,
            grouped_matmul,
            self.indptr,
            self.blocks,
            self.columns,
            self.codebook,
            inputs,
            zero_column=True,
        )

    @property
    def vector_call(self) -> tuple:
        """The batch-1 entry point and its arguments after (result, address, bias).

        Returns:
            (grouped_vector, its arguments).
        """
        parallel = len(self.columns) >= PARALLEL_MINIMUM_NONZEROS
        return grouped_vector, (parallel, self.indptr, self.blocks, self.columns, self.codebook, self.shape[1])


def _automatic_form(indptr, columns, codes, codebook, shape):
    """The fastest form that applies and is at most SIZE_LIMIT times one code per entry.

    With AVX-512: tiled, else grouped (16-wide gathers), else per-entry. Without it: blocked
    (AVX2), else per-entry. LLVM turns the grouped form's gathers into scalar loads for CPUs whose
    gathers are slow (haswell), and in AVX2-only code per-entry was faster than grouped at batch
    8 and 64 on all 14 cases of benchmarks/form_choice.py (BENCHMARKS.md, "The AVX2 tiled form").
    """
    per_entry = PerEntryCodes(indptr, columns, codes, codebook, shape)
    if tiled.available():
        if TiledCodes.fits(codebook):
            tiled_codes = TiledCodes(indptr, columns, codes, codebook, shape)
            if tiled_codes.own_nbytes <= SIZE_LIMIT * per_entry.nbytes:
                return tiled_codes
        grouped_bytes = grouped_nbytes(indptr, columns, codes, len(codebook), shape[1])
        if len(codebook) <= GROUPED_MAXIMUM_CODES and grouped_bytes <= SIZE_LIMIT * (columns.nbytes + codes.nbytes):
            return GroupedCodes(indptr, columns, codes, codebook, shape)
        return per_entry
    if Avx2BlockedCodes.fits(codebook):
        blocked = Avx2BlockedCodes(indptr, columns, codes, codebook, shape, per_entry)
        # What the blocked form adds: it keeps the per-entry arrays too, for batches.
        if blocked.own_nbytes <= SIZE_LIMIT * per_entry.nbytes:
            return blocked
    return per_entry


def machine_kernels() -> str:
    """Which vector kernels this machine runs, in words.

    Returns:
        "AVX-512", "AVX2" or "portable".
    """
    return "AVX-512" if tiled.available() else "AVX2" if blocked_avx2.available() else "portable"


def check_csr(indptr: np.ndarray, columns: np.ndarray, codes: np.ndarray, codebook_size: int, shape) -> None:
    """The CSR arrays every form is built from stay inside the matrix and the codebook.

    The kernels index without bounds checks (for speed), so this is where an index that could
    leave its array is stopped: row pointers that start at 0, never decrease and end at the
    entry count, column indices below the column count, codes below the codebook size.

    Args:
        indptr: the row pointers.
        columns: the column indices.
        codes: each entry's code.
        codebook_size: the codebook's entries.
        shape: (rows, columns).

    Raises:
        ConfigError: an index that would leave its array.
    """
    rows, width = shape
    problem = None
    if len(indptr) != rows + 1 or indptr[0] != 0 or indptr[-1] != len(columns) or len(codes) != len(columns):
        problem = f"{len(indptr)} row pointers ending at {int(indptr[-1]) if len(indptr) else None} for {rows} rows"
    elif np.any(np.diff(indptr) < 0):
        problem = "row pointers decrease"
    elif len(columns) and (int(columns.min()) < 0 or int(columns.max()) >= width):
        problem = f"a column index outside 0..{width - 1}"
    elif len(codes) and (int(codes.min()) < 0 or int(codes.max()) >= codebook_size):
        problem = f"a code outside the codebook's {codebook_size} entries"
    if problem:
        raise ConfigError(f"the compressed {rows} x {width} weight is inconsistent: {problem}")


class CodebookWeight:
    """A weight matrix (rows x columns) held as codebook indices in one of FORMS.

    `form` None chooses automatically (the fastest that applies and is not far larger than one
    code per entry); a named form is built as asked, and "tiled" or "blocked" where it cannot
    apply (no AVX-512, or no AVX2, or a codebook too large for it) is a ConfigError. `storage` is the
    form's object (TiledCodes, Avx2BlockedCodes, GroupedCodes or PerEntryCodes), which holds the
    indices and runs the product; `form` is its name.

    Raises ConfigError for CSR arrays that leave the matrix or the codebook (see `check_csr`).
    """

    def __init__(self, indptr, columns, codes, codebook, shape: tuple[int, int], form: str | None = None) -> None:
        codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        self.shape = (int(shape[0]), int(shape[1]))
        self.nonzeros = len(columns)
        indptr = np.ascontiguousarray(indptr, dtype=np.int64)
        columns, codes = np.ascontiguousarray(columns), np.ascontiguousarray(codes)
        check_csr(indptr, columns, codes, len(codebook), self.shape)
        if form is None:
            self.storage = _automatic_form(indptr, columns, codes, codebook, shape)
        elif form == "tiled":
            if not TiledCodes.fits(codebook):
                raise ConfigError(
                    f"the tiled form needs AVX-512 kernels and holds at most 64 codebook entries (one of them zero); "
                    f"this codebook has {len(codebook)} and this machine runs {machine_kernels()} kernels: "
                    f"use form 'blocked' (AVX2), 'grouped' or 'per-entry'"
                )
            self.storage = TiledCodes(indptr, columns, codes, codebook, shape)
        elif form == "blocked":
            if not Avx2BlockedCodes.fits(codebook):
                raise ConfigError(
                    f"the blocked form needs AVX2 kernels and a codebook of at most {blocked_avx2.MAXIMUM_CODES} "
                    f"entries; this codebook has {len(codebook)} and this machine runs {machine_kernels()} "
                    f"kernels: use form 'grouped' or 'per-entry'"
                )
            per_entry = PerEntryCodes(indptr, columns, codes, codebook, shape)
            self.storage = Avx2BlockedCodes(indptr, columns, codes, codebook, shape, per_entry)
        elif form == "grouped":
            if len(codebook) > GROUPED_MAXIMUM_CODES:
                raise ConfigError(f"the grouped form holds at most {GROUPED_MAXIMUM_CODES} codes, not {len(codebook)}")
            self.storage = GroupedCodes(indptr, columns, codes, codebook, shape)
        elif form == "per-entry":
            self.storage = PerEntryCodes(indptr, columns, codes, codebook, shape)
        else:
            raise ConfigError(f"form {form!r} should be one of {', '.join(FORMS)}")

    @property
    def form(self) -> str:
        """The storage's name: one of FORMS."""
        names = {TiledCodes: "tiled", Avx2BlockedCodes: "blocked", GroupedCodes: "grouped", PerEntryCodes: "per-entry"}
        return names[type(self.storage)]

    @property
    def density(self) -> float:
        """The fraction of the matrix's entries kept."""
        return self.nonzeros / max(self.shape[0] * self.shape[1], 1)

    @property
    def nbytes(self) -> int:
        """What this weight keeps resident: its form's indices, codes or counts, and the codebook."""
        return self.storage.nbytes

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, value index into `self.storage.codebook`) of every kept weight.

        Returns:
            Three int64 arrays.
        """
        return self.storage.entries()

    def product(self, inputs: np.ndarray) -> np.ndarray:
        """inputs @ W.T for float32 inputs of shape (batch, columns): (batch, rows).

        Args:
            inputs: the inputs.

        Returns:
            (batch, rows) float32.

        Raises:
            ConfigError: inputs of another shape.
        """
        if inputs.ndim != 2 or inputs.shape[1] != self.shape[1]:
            raise ConfigError(
                f"the compressed {self.shape[0]} x {self.shape[1]} weight takes inputs of shape (batch, "
                f"{self.shape[1]}), not {tuple(inputs.shape)}"
            )
        return self.storage.product(np.ascontiguousarray(inputs, dtype=np.float32))

    def to_dense(self) -> torch.Tensor:
        """The dense matrix, for the dense path and for tests; the sparse path never calls it.

        Returns:
            The (rows, columns) float32 tensor.
        """
        dense = np.zeros(self.shape, dtype=np.float32)
        rows, columns, codes = self.entries()
        dense[rows, columns] = self.storage.codebook[codes]
        return torch.from_numpy(dense)
