"""The register-tiled form: products from codebook indices with no memory gathers (AVX-512).

The CSR kernels (kernels.py) fetch one input per kept weight with a vector gather, and this
CPU class sustains about one gathered float per cycle: AlexNet's fc8 at 25% density ran only
1.8x faster than dense at batch 1 for that reason. Here the lookups come from registers instead:

- the input is cut into tiles of TILE = 32 consecutive columns, which fit in two 512-bit
  registers, so a weight's input is one two-register permute (vpermi2ps) by its 5-bit column
  inside the tile;
- the codebook (at most 32 entries, one of them zero) sits in two more registers, so a weight's
  value is one more permute by its code;
- the 16 lanes of a vector are 16 rows (a chunk), so the products add into one accumulator per
  lane and never need a horizontal sum. Step k of a (chunk, tile) takes each row's k-th weight
  in that tile; rows with fewer weights there get padding entries (code of the zero slot).

Each entry is 10 bits (column in tile, code), three to a 32-bit word, so a 16-lane word holds
three steps of one (chunk, tile). Rows are ordered by their number of weights before they are cut
into chunks (SELL-C-sigma), so that rows of like length share a chunk and pad less.

Batched products take the inputs as (tiles, batch, TILE) and the outputs as (chunks, batch,
LANES), so a tile's inputs for a block of batch columns and a chunk's outputs are contiguous;
each word's codebook lookups are shared by the whole batch block.

The kernels are emitted as LLVM IR with x86 AVX-512 intrinsics and so run only where the CPU
has AVX-512F (`available()`); elsewhere the runtime uses the CSR forms.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from deepshrink.runtime.intrinsics import is_c_array
from deepshrink.runtime.kernels import compiled

LANES = 16  # rows per chunk: one float32 lane each in a 512-bit register
TILE = 32  # input columns per tile: two 512-bit registers of float32
TABLE = 32  # codebook entries a two-register permute reaches
ENTRY_BITS = 10  # 5 bits of column inside the tile, then 5 bits of code
PER_WORD = 3  # entries per 32-bit word

# Batch columns a batched product runs through a chunk's weights at once, their sums held in
# registers: 4 columns take 8 registers of inputs and 8 of sums, of the 32.
COLUMN_GROUP = 4


def available() -> bool:
    """Whether the machine numba compiles for has AVX-512F (the permutes are AVX-512 instructions)."""
    features = os.environ.get("NUMBA_CPU_FEATURES")
    if features:
        return "+avx512f" in features.split(",")
    if os.environ.get("NUMBA_CPU_NAME", "host") != "host":
        return False  # a named CPU model: do not guess its features
    import llvmlite.binding

    return bool(llvmlite.binding.get_host_cpu_features().get("avx512f", False))


def kernel_table(codebook: np.ndarray) -> tuple[np.ndarray, int] | None:
    """(the codebook in a TABLE-entry float32 table, the code of a zero entry) or None when the
    codebook does not fit: more than TABLE entries, or TABLE entries none of which is zero."""
    codebook = np.asarray(codebook, dtype=np.float32)
    if len(codebook) < TABLE:
        table = np.zeros(TABLE, dtype=np.float32)
        table[: len(codebook)] = codebook
        zeros = np.flatnonzero(codebook == 0)
        return table, int(zeros[0]) if len(zeros) else len(codebook)
    if len(codebook) == TABLE and np.any(codebook == 0):
        return codebook.copy(), int(np.flatnonzero(codebook == 0)[0])
    return None


@numba.njit(cache=True, nogil=True)
def _pack(indptr, columns, codes, order, tiles, padding_code, starts, words, block_tiles):
    """Fill starts (each chunk's first block) and, when `words` is not empty, the words and each
    block's tile. A block is LANES words: PER_WORD steps of one (chunk, tile), one row a lane.
    Returns the number of blocks."""
    rows = len(indptr) - 1
    chunks = len(starts) - 1
    counts = np.zeros((LANES, tiles), dtype=np.int64)
    fill = np.zeros(tiles, dtype=np.int64)
    first_block = np.zeros(tiles, dtype=np.int64)
    padding = np.uint32(padding_code << 5)
    padded = np.uint32(0)
    for k in range(PER_WORD):
        padded |= padding << np.uint32(ENTRY_BITS * k)
    total = 0
    for chunk in range(chunks):
        counts[:, :] = 0
        for lane in range(LANES):
            position = chunk * LANES + lane
            if position < rows:
                row = order[position]
                for index in range(indptr[row], indptr[row + 1]):
                    counts[lane, columns[index] // TILE] += 1
        starts[chunk] = total
        for tile in range(tiles):
            widest = 0
            for lane in range(LANES):
                widest = max(widest, counts[lane, tile])
            first_block[tile] = total
            blocks = (widest + PER_WORD - 1) // PER_WORD
            if len(words):
                block_tiles[total : total + blocks] = tile
            total += blocks
        if len(words) == 0:
            continue
        words[starts[chunk] * LANES : total * LANES] = padded
        for lane in range(LANES):
            position = chunk * LANES + lane
            if position >= rows:
                continue
            row = order[position]
            fill[:] = 0
            for index in range(indptr[row], indptr[row + 1]):
                tile = columns[index] // TILE
                step = fill[tile]
                fill[tile] += 1
                word = (first_block[tile] + step // PER_WORD) * LANES + lane
                shift = np.uint32(ENTRY_BITS * (step % PER_WORD))
                entry = np.uint32(columns[index] % TILE) | (np.uint32(codes[index]) << np.uint32(5))
                words[word] = (words[word] & ~(np.uint32(1023) << shift)) | (entry << shift)
    starts[chunks] = total
    return total


@numba.njit(cache=True, nogil=True)
def _unpack(words, block_tiles, starts, order, rows, padding_code, out_rows, out_columns, out_codes):
    """Every non-padding entry as (row, column, code); returns how many."""
    found = 0
    for chunk in range(len(starts) - 1):
        for block in range(starts[chunk], starts[chunk + 1]):
            for lane in range(LANES):
                position = chunk * LANES + lane
                value = words[block * LANES + lane]
                for k in range(PER_WORD):
                    entry = (value >> np.uint32(ENTRY_BITS * k)) & np.uint32(1023)
                    code = entry >> np.uint32(5)
                    if code != padding_code and position < rows:
                        out_rows[found] = order[position]
                        out_columns[found] = block_tiles[block] * TILE + (entry & np.uint32(31))
                        out_codes[found] = code
                        found += 1
    return found


class TiledCodes:
    """A weight matrix in the register-tiled form; see the module docstring."""

    def __init__(self, indptr, columns, codes, codebook, shape: tuple[int, int]) -> None:
        fitted = kernel_table(codebook)
        if fitted is None:
            raise ValueError(f"the register-tiled form holds at most {TABLE} codebook entries, one of them zero")
        self.codebook, self.padding_code = fitted
        self.shape = shape
        rows, width = shape
        self.tiles = max(-(-width // TILE), 1)
        lengths = np.diff(indptr)
        # Longest rows first, ties in row order: like rows share a chunk (SELL-C-sigma).
        self.order = np.argsort(-lengths, kind="stable").astype(np.int32)
        self.starts = np.zeros(-(-rows // LANES) + 1, dtype=np.int64)
        columns64, codes64 = np.asarray(columns, dtype=np.int64), np.asarray(codes, dtype=np.int64)
        tile_type = np.uint16 if self.tiles <= 1 << 16 else np.uint32
        arguments = (indptr, columns64, codes64, self.order, self.tiles, self.padding_code, self.starts)
        blocks = _pack(*arguments, np.empty(0, dtype=np.uint32), np.empty(0, dtype=tile_type))
        self.words = np.empty(blocks * LANES, dtype=np.uint32)
        self.block_tiles = np.empty(blocks, dtype=tile_type)
        _pack(*arguments, self.words, self.block_tiles)

    @staticmethod
    def fits(codebook: np.ndarray) -> bool:
        return available() and kernel_table(codebook) is not None

    @property
    def nbytes(self) -> int:
        arrays = (self.words, self.block_tiles, self.starts, self.order, self.codebook)
        return sum(array.nbytes for array in arrays)

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, code) of every kept weight, padding left out; codes index `codebook`."""
        capacity = len(self.words) * PER_WORD
        rows, columns, codes = (np.empty(capacity, dtype=np.int64) for _ in range(3))
        found = _unpack(
            self.words,
            self.block_tiles,
            self.starts,
            self.order,
            self.shape[0],
            self.padding_code,
            rows,
            columns,
            codes,
        )
        return rows[:found], columns[:found], codes[:found]

    def product(self, inputs: np.ndarray) -> np.ndarray:
        """inputs @ W.T for float32 inputs of shape (batch, columns): (batch, rows)."""
        batch = inputs.shape[0]
        result = np.empty((batch, self.shape[0]), dtype=np.float32)
        arrays = (self.words, self.block_tiles, self.starts, self.codebook, self.order)
        if batch == 1:
            TILED_MATVEC[len(self.block_tiles) >= PARALLEL_MINIMUM_BLOCKS](result[0], inputs[0], *arrays)
        else:
            work = len(self.block_tiles) * -(-batch // COLUMN_GROUP)
            TILED_MATMUL[work >= PARALLEL_MINIMUM_BLOCKS](result, inputs, *arrays)
        return result


# Below this many blocks (times the groups of COLUMN_GROUP samples) a product runs on one
# thread: waking the second costs more than it saves (benchmarks/inference_speed.py).
PARALLEL_MINIMUM_BLOCKS = 4_000


def _arguments_fit(out, inputs, out_dimensions, input_dimensions, words, block_tiles, starts, table, chunk) -> bool:
    return (
        is_c_array(out, out_dimensions, types.float32)
        and is_c_array(inputs, input_dimensions, types.float32)
        and is_c_array(words, 1, types.uint32)
        and is_c_array(block_tiles, 1)
        and is_c_array(starts, 1, types.int64)
        and is_c_array(table, 1, types.float32)
        and isinstance(chunk, types.Integer)
    )


class _Emitter:
    """What both chunk kernels share: the arrays' data pointers, vector types and intrinsics.
    Arguments: out, inputs, words, block_tiles, starts, table, chunk, ..."""

    def __init__(self, context, builder, signature, arguments) -> None:
        self.builder = builder
        self.arrays = [
            context.make_array(array_type)(context, builder, value)
            for array_type, value in zip(signature.args[:6], arguments[:6], strict=True)
        ]
        self.tile_type = signature.args[3].dtype
        self.chunk = context.cast(builder, arguments[6], signature.args[6], types.int64)
        self.int64 = ir.IntType(64)
        self.floats = ir.VectorType(ir.FloatType(), LANES)
        self.integers = ir.VectorType(ir.IntType(32), LANES)
        self.permute = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(self.floats, [self.floats, self.integers, self.floats]),
            "llvm.x86.avx512.vpermi2var.ps.512",
        )
        self.fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(self.floats, [self.floats] * 3), f"llvm.fma.v{LANES}f32"
        )

    def constant(self, value: int):
        return ir.Constant(self.int64, value)

    def pointer(self, array_index: int, offset, vector_type):
        element = self.builder.gep(self.arrays[array_index].data, [offset])
        return self.builder.bitcast(element, vector_type.as_pointer())

    def load(self, array_index: int, offset, vector_type):
        return self.builder.load(self.pointer(array_index, offset, vector_type), align=4)

    def scalar(self, array_index: int, offset):
        return self.builder.load(self.builder.gep(self.arrays[array_index].data, [offset]))

    def table(self):
        return self.load(5, self.constant(0), self.floats), self.load(5, self.constant(LANES), self.floats)

    def entry_parts(self, word):
        """Per step in the word: (the index vector for the input permute, for the code permute).
        vpermi2ps reads only the low 5 bits of each index, so no masking is needed."""
        builder = self.builder
        shifted = [
            builder.lshr(word, ir.Constant(self.integers, [ENTRY_BITS * k] * LANES)) if k else word
            for k in range(PER_WORD)
        ]
        return [(value, builder.lshr(value, ir.Constant(self.integers, [5] * LANES))) for value in shifted]

    def chunk_blocks(self, body) -> None:
        """Call body(tile, block) for every block of this chunk: one flat loop, each block
        naming its tile, so the loop has no branch on how many blocks a tile has."""
        builder = self.builder
        first = self.scalar(4, self.chunk)
        last = self.scalar(4, builder.add(self.chunk, self.constant(1)))
        with cgutils.for_range(builder, builder.sub(last, first)) as loop:
            block = builder.add(first, loop.index)
            tile = builder.zext(self.scalar(3, block), self.int64)
            body(tile, block)


@intrinsic
def _tiled_chunk(typing_context, out, vector, words, block_tiles, starts, table, chunk):
    """out[LANES * chunk :][:LANES] = this chunk's rows times `vector` (tiles * TILE floats)."""
    if not _arguments_fit(out, vector, 1, 1, words, block_tiles, starts, table, chunk):
        return None

    def codegen(context, builder, signature, arguments):
        emit = _Emitter(context, builder, signature, arguments)
        codebook = emit.table()
        zero = ir.Constant(emit.floats, [0.0] * LANES)
        # One accumulator per step of a word, so consecutive FMAs do not wait on each other.
        sums = [cgutils.alloca_once_value(builder, zero) for _ in range(PER_WORD)]

        def body(tile, block):
            first = builder.mul(tile, emit.constant(TILE))
            inputs = (
                emit.load(1, first, emit.floats),
                emit.load(1, builder.add(first, emit.constant(LANES)), emit.floats),
            )
            word = emit.load(2, builder.mul(block, emit.constant(LANES)), emit.integers)
            for total, (column, code) in zip(sums, emit.entry_parts(word), strict=True):
                value = builder.call(emit.permute, [inputs[0], column, inputs[1]])
                weight = builder.call(emit.permute, [codebook[0], code, codebook[1]])
                builder.store(builder.call(emit.fma, [value, weight, builder.load(total)]), total)

        emit.chunk_blocks(body)
        result = builder.fadd(builder.fadd(builder.load(sums[0]), builder.load(sums[1])), builder.load(sums[2]))
        builder.store(result, emit.pointer(0, builder.mul(emit.chunk, emit.constant(LANES)), emit.floats), align=4)
        return context.get_dummy_value()

    return types.void(out, vector, words, block_tiles, starts, table, chunk), codegen


@intrinsic
def _tiled_chunk_batched(typing_context, out, inputs, words, block_tiles, starts, table, chunk, first):
    """out[chunk, b, :] = this chunk's rows times inputs[:, b, :] for the COLUMN_GROUP batch
    columns b from `first`, with inputs (tiles, batch, TILE) and out (chunks, batch, LANES).
    Their sums stay in registers over the whole chunk; each word's codebook lookups serve all."""
    if not (
        _arguments_fit(out, inputs, 3, 3, words, block_tiles, starts, table, chunk) and isinstance(first, types.Integer)
    ):
        return None

    def codegen(context, builder, signature, arguments):
        emit = _Emitter(context, builder, signature, arguments)
        codebook = emit.table()
        batch = builder.extract_value(emit.arrays[1].shape, 1)
        begin = context.cast(builder, arguments[7], signature.args[7], types.int64)
        zero = ir.Constant(emit.floats, [0.0] * LANES)
        # Two sums per column, so that a column's FMAs are two chains, not one.
        sums = [[cgutils.alloca_once_value(builder, zero) for _ in range(2)] for _ in range(COLUMN_GROUP)]

        def body(tile, block):
            source = builder.mul(builder.add(builder.mul(tile, batch), begin), emit.constant(TILE))
            parts = emit.entry_parts(emit.load(2, builder.mul(block, emit.constant(LANES)), emit.integers))
            weights = [builder.call(emit.permute, [codebook[0], code, codebook[1]]) for _, code in parts]
            for column in range(COLUMN_GROUP):
                low = emit.load(1, builder.add(source, emit.constant(column * TILE)), emit.floats)
                high = emit.load(1, builder.add(source, emit.constant(column * TILE + LANES)), emit.floats)
                for step, ((index, _), weight) in enumerate(zip(parts, weights, strict=True)):
                    total = sums[column][step % 2]
                    value = builder.call(emit.permute, [low, index, high])
                    builder.store(builder.call(emit.fma, [value, weight, builder.load(total)]), total)

        emit.chunk_blocks(body)
        first_output = builder.mul(builder.add(builder.mul(emit.chunk, batch), begin), emit.constant(LANES))
        for column, (even, odd) in enumerate(sums):
            result = builder.fadd(builder.load(even), builder.load(odd))
            target = emit.pointer(0, builder.add(first_output, emit.constant(column * LANES)), emit.floats)
            builder.store(result, target, align=4)
        return context.get_dummy_value()

    return types.void(out, inputs, words, block_tiles, starts, table, chunk, first), codegen


# The copies in and out run in these serial functions: inside a function compiled with
# parallel=True numba turns every array expression and slice assignment into a parallel region
# of its own, which made a batch-64 product 15x slower.
@numba.njit(cache=True, nogil=True)
def _padded_vector(inputs):
    vector = np.zeros((len(inputs) + TILE - 1) // TILE * TILE, dtype=np.float32)
    vector[: len(inputs)] = inputs
    return vector


@numba.njit(cache=True, nogil=True)
def _tiled_inputs(inputs, groups):
    """(tiles, groups * COLUMN_GROUP, TILE): each tile's inputs for every sample, zero-padded."""
    batch, width = inputs.shape
    tiles = (width + TILE - 1) // TILE
    tiled = np.zeros((tiles, groups * COLUMN_GROUP, TILE), dtype=np.float32)
    for sample in range(batch):  # explicit loops: a slice costs an array view each
        for tile in range(tiles - 1):
            for column in range(TILE):
                tiled[tile, sample, column] = inputs[sample, tile * TILE + column]
        for column in range((tiles - 1) * TILE, width):
            tiled[tiles - 1, sample, column - (tiles - 1) * TILE] = inputs[sample, column]
    return tiled


@numba.njit(cache=True, nogil=True)
def _scatter_rows(result, out, order):
    """result[sample, order[p]] = out[p // LANES, sample, p % LANES]."""
    rows = len(order)
    for sample in range(result.shape[0]):
        for chunk in range(out.shape[0]):
            for lane in range(min(LANES, rows - chunk * LANES)):
                result[sample, order[chunk * LANES + lane]] = out[chunk, sample, lane]


@numba.njit(cache=True, nogil=True)
def _scatter_vector(result, out, order):
    for position in range(len(order)):
        result[order[position]] = out[position]


def _tiled_matvec(result, inputs, words, block_tiles, starts, table, order):
    """result[order[p]] = product of chunk row p with `inputs` (one sample of `columns` floats)."""
    chunks = len(starts) - 1
    vector = _padded_vector(inputs)
    out = np.empty(chunks * LANES, dtype=np.float32)
    for chunk in numba.prange(chunks):
        _tiled_chunk(out, vector, words, block_tiles, starts, table, chunk)
    _scatter_vector(result, out, order)


def _tiled_matmul(result, inputs, words, block_tiles, starts, table, order):
    """result[:, order[p]] = product of chunk row p with each row of `inputs` (batch x columns).
    The work is split over (chunk, group of COLUMN_GROUP samples) pairs, so a convolution's
    many positions keep both threads busy even where the layer has few chunks."""
    chunks = len(starts) - 1
    groups = (inputs.shape[0] + COLUMN_GROUP - 1) // COLUMN_GROUP
    tiled = _tiled_inputs(inputs, groups)
    out = np.empty((chunks, groups * COLUMN_GROUP, LANES), dtype=np.float32)
    for pair in numba.prange(chunks * groups):
        _tiled_chunk_batched(
            out, tiled, words, block_tiles, starts, table, pair // groups, pair % groups * COLUMN_GROUP
        )
    _scatter_rows(result, out, order)


# numba compiles on first call, so a machine without AVX-512 never compiles these.
TILED_MATVEC = {parallel: compiled(_tiled_matvec, parallel) for parallel in (False, True)}
TILED_MATMUL = {parallel: compiled(_tiled_matmul, parallel) for parallel in (False, True)}
