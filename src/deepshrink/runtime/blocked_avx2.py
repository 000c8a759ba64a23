"""The code-blocked form: products from codebook indices on AVX2 CPUs, one gather per 8 weights.

A weight's value is its codebook entry, so a row's product is sum over codes c of codebook[c]
times the sum of the inputs its weights with code c sit on. This form lays the weights out so
that a vector gather fetches those inputs and the codebook lookup happens once per 8 weights:

- the 8 lanes of a vector are 8 rows (a chunk); rows are ordered by length first
  (SELL-C-sigma), so that rows of like length share a chunk;
- a block is one step of one (chunk, code): each row's next weight with that code, as its input
  column (uint16, uint32 for inputs wider than 65,535), and a padding column (the input's width)
  where a row has no more. A block is one load of 8 columns, one gather of the inputs
  (vgatherdps) with the padding lanes masked off by comparing the column with the width, and one
  FMA by the block's codebook value, broadcast; the block's code is one byte;
- a chunk's blocks are one flat loop over four sums, so no per-code loop is set up.

The codebook is read from memory once per block, so any codebook of up to 256 entries fits, and
padding needs no zero entry. The inputs are gathered where they lie: no copy, no padding.

Measured (BENCHMARKS.md, "The code-blocked AVX2 form"), AlexNet's FC shapes at 9% and 4% kept
with 5-bit codebooks, batch 1, AVX2-only code on an Intel Xeon (Sapphire Rapids class): 0.45-0.75
ns per kept weight on one thread, 3.6-7.5x faster than dense torch at 9% and 6.3-12x at 4%, and 1.4-4.2x
faster than the per-entry kernel. A first version (a loop per code) was already 1.6-2.4x faster
than the register-tiled AVX2 form it replaced (8 rows x 8 columns, the input and a 32-entry
codebook looked up by five vpermps and three blends, 3.3 ns per block, of whose slots only about
36% held a weight at 9%). Here 61-78% of the slots hold a weight (a block runs as long as the
longest of its 8 rows' runs of that code). That machine's gathers are not slowed by the Gather
Data Sampling mitigation, which costs Intel CPUs from Skylake to Tiger Lake much of their gather
speed (not measured here); auto mode measures each layer against torch's forms at load time
(choice.py), so where gathers are slow it falls back to them.

Only single samples run here. Batches run the per-entry CSR kernel, whose arrays this form
keeps too: per-entry adds each weight's contribution to a whole vector of samples with no
padding (a batched register-tiled AVX2 kernel ran 1.3-3.5x slower than it at batch 8 and 64).

The kernel is emitted as LLVM IR with the AVX2 gather intrinsic (LLVM's generic masked gather
would be turned into scalar loads for CPUs whose gathers it considers slow), and runs where the
code numba generates has AVX2 and FMA (`available()`).
"""

from __future__ import annotations

import os

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from deepshrink.runtime.intrinsics import float32_at, host_cpu_features, is_c_array
from deepshrink.runtime.kernels import add_bias, compiled
from deepshrink.runtime.tiled import KernelEmitter, chunk_arrays, scatter_vector

LANES = 8  # rows per chunk: one float32 lane each in a 256-bit register
MAXIMUM_CODES = 256  # a block's code is one byte
SUMS = 4  # independent sums a chunk's loop keeps: a gather's latency is far above an FMA's
# Below this many blocks a product runs on one thread: 192,000 slots, as the AVX-512 form's
# 4,000 blocks of 48 (benchmarks/inference_speed.py). AlexNet's fc8 at 4% (about 34,000 blocks)
# ran 1.8x faster on two threads than on one.
PARALLEL_MINIMUM_BLOCKS = 24_000


def available() -> bool:
    """Whether the code-blocked form may run: the code numba generates has AVX2 and FMA.

    That is numba's own rule for its target: NUMBA_CPU_FEATURES when set (on top of the model
    NUMBA_CPU_NAME names), none beyond the baseline for NUMBA_CPU_NAME=generic, else the host's
    features. NUMBA_CPU_NAME alone does not take the host's features away: with
    NUMBA_CPU_NAME=haswell on an AVX-512 CPU numba still emits AVX-512 instructions, so AVX2-only
    code needs NUMBA_CPU_FEATURES as well (for example -avx512f), as `make test` sets.

    Returns:
        True where the AVX2 kernels may run.
    """
    features = os.environ.get("NUMBA_CPU_FEATURES")
    model = os.environ.get("NUMBA_CPU_NAME", "host").strip().lower()
    if features is None:
        if model == "generic":
            return False
        host = host_cpu_features()
        return bool(host.get("avx2", False) and host.get("fma", False))
    listed = [name.strip() for name in features.split(",") if name.strip()]
    added = {name[1:] for name in listed if name.startswith("+")}
    removed = {name[1:] for name in listed if name.startswith("-")}
    if {"avx2", "fma"} <= added:
        return True
    return model in AVX2_MODELS and not removed & {"avx", "avx2", "fma"}


# LLVM CPU models that have AVX2 and FMA: the ones a NUMBA_CPU_NAME is likely to name.
AVX2_MODELS = frozenset(
    {
        "haswell",
        "broadwell",
        "skylake",
        "skylake-avx512",
        "cascadelake",
        "icelake-server",
        "icelake-client",
        "alderlake",
        "sapphirerapids",
        "znver1",
        "znver2",
        "znver3",
        "znver4",
        "x86-64-v3",
        "x86-64-v4",
    }
)


def column_type(width: int) -> type:
    """The dtype of a layer's columns: uint16 while the padding column (the width) fits.

    Args:
        width: the layer's input columns.

    Returns:
        np.uint16 or np.uint32.
    """
    return np.uint16 if width <= np.iinfo(np.uint16).max else np.uint32


@numba.njit(cache=True, nogil=True)
def _pack(indptr, columns, codes, order, codebook_size, width, starts, block_codes, slots):
    """Fill starts (each chunk's first block) and, when `slots` is not empty, each block's code
    and its 8 columns (lane l of block b at slots[8 b + l], `width` for padding). Returns the
    number of blocks."""
    rows = len(indptr) - 1
    chunks = len(starts) - 1
    counts = np.zeros((LANES, codebook_size), dtype=np.int64)
    first_block = np.zeros(codebook_size, dtype=np.int64)
    total = 0
    for chunk in range(chunks):
        counts[:, :] = 0
        for lane in range(LANES):
            position = chunk * LANES + lane
            if position < rows:
                row = order[position]
                for index in range(indptr[row], indptr[row + 1]):
                    counts[lane, codes[index]] += 1
        starts[chunk] = total
        for code in range(codebook_size):
            widest = 0
            for lane in range(LANES):
                widest = max(widest, counts[lane, code])
            first_block[code] = total
            if len(slots):
                block_codes[total : total + widest] = code
                slots[total * LANES : (total + widest) * LANES] = width
            total += widest
        if len(slots) == 0:
            continue
        for lane in range(LANES):
            position = chunk * LANES + lane
            if position >= rows:
                continue
            row = order[position]
            counts[lane, :] = 0
            for index in range(indptr[row], indptr[row + 1]):
                code = codes[index]
                slots[(first_block[code] + counts[lane, code]) * LANES + lane] = columns[index]
                counts[lane, code] += 1
    starts[chunks] = total
    return total


@numba.njit(cache=True, nogil=True)
def _unpack(slots, block_codes, starts, order, rows, width, out_rows, out_columns, out_codes):
    """Every non-padding entry as (row, column, code); returns how many."""
    found = 0
    for chunk in range(len(starts) - 1):
        for block in range(starts[chunk], starts[chunk + 1]):
            for lane in range(LANES):
                position = chunk * LANES + lane
                column = slots[block * LANES + lane]
                if position < rows and column < width:
                    out_rows[found] = order[position]
                    out_columns[found] = column
                    out_codes[found] = block_codes[block]
                    found += 1
    return found


class Avx2BlockedCodes:
    """A weight matrix in the code-blocked form, with the per-entry form (`batched`) for batches
    of more than one sample; see the module docstring."""

    def __init__(self, indptr, columns, codes, codebook, shape: tuple[int, int], batched) -> None:
        if len(codebook) > MAXIMUM_CODES:
            raise ValueError(f"the code-blocked form holds at most {MAXIMUM_CODES} codebook entries")
        self.codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        self.shape = shape
        self.batched = batched
        rows, width = shape
        # Longest rows first, as the tiled form orders them (one "tile": there are none here).
        self.order, self.starts, _ = chunk_arrays(indptr, rows, 1, LANES)
        columns64, codes64 = np.asarray(columns, dtype=np.int64), np.asarray(codes, dtype=np.int64)
        arguments = (indptr, columns64, codes64, self.order, len(self.codebook), width, self.starts)
        blocks = _pack(*arguments, np.empty(0, dtype=np.uint8), np.empty(0, dtype=column_type(width)))
        self.block_codes = np.empty(blocks, dtype=np.uint8)
        self.slots = np.empty(blocks * LANES, dtype=column_type(width))
        _pack(*arguments, self.block_codes, self.slots)

    @staticmethod
    def fits(codebook: np.ndarray) -> bool:
        """Whether a codebook can take this form on this machine.

        Args:
            codebook: code -> value.

        Returns:
            True when the AVX2 kernels may run and the codebook has at most 256 entries.
        """
        return available() and len(codebook) <= MAXIMUM_CODES

    @property
    def own_nbytes(self) -> int:
        """The bytes of this form's own arrays, without the per-entry form's it keeps for batches."""
        return sum(array.nbytes for array in (self.slots, self.block_codes, self.starts, self.order, self.codebook))

    @property
    def nbytes(self) -> int:
        """The bytes of the form's arrays, the per-entry form's for batches included."""
        return self.own_nbytes + self.batched.nbytes

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, code) of every kept weight, padding left out; codes index `codebook`.

        Returns:
            Three int64 arrays.
        """
        rows, columns, codes = (np.empty(len(self.slots), dtype=np.int64) for _ in range(3))
        arguments = (self.slots, self.block_codes, self.starts, self.order, self.shape[0], self.shape[1])
        found = _unpack(*arguments, rows, columns, codes)
        return rows[:found], columns[:found], codes[:found]

    def product(self, inputs: np.ndarray) -> np.ndarray:
        """inputs @ W.T for float32 inputs of shape (batch, columns): (batch, rows).

        Args:
            inputs: float32, (batch, columns), C-contiguous.

        Returns:
            (batch, rows) float32.
        """
        if inputs.shape[0] != 1:
            return self.batched.product(inputs)
        result = np.empty((1, self.shape[0]), dtype=np.float32)
        arrays = (self.slots, self.block_codes, self.starts, self.codebook, self.order)
        MATVEC[len(self.block_codes) >= PARALLEL_MINIMUM_BLOCKS](result[0], inputs[0], *arrays)
        return result

    @property
    def vector_call(self) -> tuple:
        """The batch-1 entry point and its arguments after (result, address, bias).

        Returns:
            (this module's batch-1 entry point, its arguments).
        """
        arrays = (self.slots, self.block_codes, self.starts, self.codebook, self.order)
        return _vector, (len(self.block_codes) >= PARALLEL_MINIMUM_BLOCKS, *arrays, self.shape[1])


def _arguments_fit(out, inputs, slots, block_codes, starts, table, chunk) -> bool:
    return (
        is_c_array(out, 1, types.float32)
        and is_c_array(inputs, 1, types.float32)
        and is_c_array(slots, 1)
        and slots.dtype in (types.uint16, types.uint32)
        and is_c_array(block_codes, 1, types.uint8)
        and is_c_array(starts, 1, types.int64)
        and is_c_array(table, 1, types.float32)
        and isinstance(chunk, types.Integer)
    )


@intrinsic
def _chunk(typing_context, out, inputs, slots, block_codes, starts, table, chunk):
    """out[LANES * chunk :][:LANES] = this chunk's rows times `inputs`."""
    if not _arguments_fit(out, inputs, slots, block_codes, starts, table, chunk):
        return None

    def codegen(context, builder, signature, arguments):
        emit = KernelEmitter(context, builder, signature, arguments, LANES)
        byte_pointer = ir.IntType(8).as_pointer()
        gather = emit.intrinsic(
            "llvm.x86.avx2.gather.d.ps.256",
            emit.floats,
            [emit.floats, byte_pointer, emit.integers, emit.floats, ir.IntType(8)],
        )
        base = builder.bitcast(emit.arrays[1].data, byte_pointer)
        width = builder.trunc(cgutils.unpack_tuple(builder, emit.arrays[1].shape)[0], ir.IntType(32))
        widths = emit.broadcast(width, emit.integers)
        slot_vector = ir.VectorType(context.get_value_type(signature.args[2].dtype), LANES)
        zero = ir.Constant(emit.floats, [0.0] * LANES)
        sums = [cgutils.alloca_once_value(builder, zero) for _ in range(SUMS)]

        def block(index, total):
            columns = builder.load(emit.pointer(2, builder.mul(index, emit.constant(LANES)), slot_vector), align=2)
            if slot_vector.element.width < 32:
                columns = builder.zext(columns, emit.integers)
            # Padding columns (the width) are masked off: the gather leaves those lanes zero and
            # never reads them. The compare also gives the gather the fresh mask it consumes.
            mask = builder.bitcast(builder.sext(builder.icmp_signed("<", columns, widths), emit.integers), emit.floats)
            scale = ir.Constant(ir.IntType(8), 4)
            gathered = builder.call(gather, [zero, base, columns, mask, scale])
            code = builder.zext(emit.scalar(3, index), emit.int64)
            value = emit.broadcast(emit.scalar(5, code), emit.floats)
            builder.store(builder.call(emit.fma, [gathered, value, builder.load(total)]), total)

        first = emit.scalar(4, emit.chunk)
        last = emit.scalar(4, builder.add(emit.chunk, emit.constant(1)))
        rounds = builder.udiv(builder.sub(last, first), emit.constant(SUMS))
        with cgutils.for_range(builder, rounds) as loop:
            index = builder.add(first, builder.mul(loop.index, emit.constant(SUMS)))
            for offset, total in enumerate(sums):
                block(builder.add(index, emit.constant(offset)), total)
        done = builder.add(first, builder.mul(rounds, emit.constant(SUMS)))
        with cgutils.for_range(builder, builder.sub(last, done)) as loop:
            block(builder.add(done, loop.index), sums[0])
        result = builder.load(sums[0])
        for total in sums[1:]:
            result = builder.fadd(result, builder.load(total))
        builder.store(result, emit.pointer(0, builder.mul(emit.chunk, emit.constant(LANES)), emit.floats), align=4)
        return context.get_dummy_value()

    return types.void(out, inputs, slots, block_codes, starts, table, chunk), codegen


def _matvec(result, inputs, slots, block_codes, starts, table, order):
    """result[order[p]] = product of chunk row p with `inputs` (one sample of `columns` floats)."""
    chunks = len(starts) - 1
    out = np.empty(chunks * LANES, dtype=np.float32)
    for step in numba.prange(chunks):
        # Alternate from both ends: chunks run longest rows first, so the halves a static
        # schedule hands the two threads get like shares of the work.
        chunk = step // 2 if step % 2 == 0 else chunks - 1 - step // 2
        _chunk(out, inputs, slots, block_codes, starts, table, chunk)
    scatter_vector(result, out, order)


# numba compiles on first call, so a machine without AVX2 never compiles it.
MATVEC = {parallel: compiled(_matvec, parallel) for parallel in (False, True)}
_MATVEC_SERIAL, _MATVEC_PARALLEL = MATVEC[False], MATVEC[True]


# The batch-1 entry point (kernels.py, "Batch-1 entry points"): numba caches no function that
# takes another as an argument, so each form has its own.
@numba.njit(cache=True, nogil=True)
def _vector(result, address, bias, parallel, slots, block_codes, starts, table, order, width):
    """result[0] = W @ x + bias, x the `width` floats at `address` (arguments as tiled.tiled_vector)."""
    inputs = numba.carray(float32_at(address), width)
    if parallel:
        _MATVEC_PARALLEL(result[0], inputs, slots, block_codes, starts, table, order)
    else:
        _MATVEC_SERIAL(result[0], inputs, slots, block_codes, starts, table, order)
    add_bias(result[0], bias)
