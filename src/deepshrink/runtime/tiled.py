"""The register-tiled form: products from codebook indices with no memory gathers (AVX-512).

The CSR kernels (kernels.py) fetch one input per kept weight with a vector gather, and this
CPU class sustains about one gathered float per cycle: AlexNet's fc8 at 25% density ran only
1.8x faster than dense at batch 1 for that reason. Here the lookups come from registers instead:

- the input is cut into tiles of TILE = 32 consecutive columns, which fit in two 512-bit
  registers, so a weight's input is one two-register permute (vpermi2ps) by its 5-bit column
  inside the tile;
- the codebook (at most 32 entries, one of them zero) sits in two more registers, so a weight's
  value is one more permute by its code; a codebook of up to 64 entries sits in four, and a
  weight's value is two permutes and a blend on the code's sixth bit;
- the 16 lanes of a vector are 16 rows (a chunk), so the products add into one accumulator per
  lane and never need a horizontal sum. Step k of a (chunk, tile) takes each row's k-th weight
  in that tile; rows with fewer weights there get padding entries (code of the zero slot).

An entry is the column in its tile (5 bits) and the code. With up to 32 codes it is 10 bits,
three to a uint32 word; with up to 64 it is 11 bits, one to a uint16, two uint16 a lane. Either
way a block of 64 bytes (one vector) holds one lane per row and three (or two) steps of one
(chunk, tile), and names its tile, so a chunk's blocks are one flat loop. The array's dtype
tells the kernels, at compile time, which layout they read. Rows are ordered by their number of
weights before they are cut into chunks (SELL-C-sigma), so that rows of like length share a
chunk and pad less.

Batched products lay the inputs out as (tiles, batch, TILE), so a tile's inputs for each sample
are contiguous, and run COLUMN_GROUP samples at a time through a chunk: their sums stay in
registers and each block's codebook lookups serve all of them. The work is split over (chunk,
sample group) pairs.

The kernels are emitted as LLVM IR with x86 AVX-512 intrinsics and so run only where the CPU
has AVX-512F (`available()`); elsewhere the runtime uses the AVX2 code-blocked form
(blocked_avx2.py) or the CSR forms.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from deepshrink.runtime.intrinsics import float32_at, host_cpu_features, is_c_array
from deepshrink.runtime.kernels import add_bias, compiled

LANES = 16  # rows per chunk: one float32 lane each in a 512-bit register
TILE = 32  # input columns per tile: two 512-bit registers of float32
BLOCK_BYTES = 64  # one vector: a lane per row


class Layout(NamedTuple):
    """How entries of (column in tile, code) are packed into a block."""

    table: int  # codebook entries the kernels look up from registers
    word_type: type  # numpy dtype of the words
    entry_bits: int  # bits an entry occupies in its word
    per_word: int  # entries per word

    @property
    def steps(self) -> int:
        """Steps (weights per row) a block holds."""
        return BLOCK_BYTES // LANES // np.dtype(self.word_type).itemsize * self.per_word


NARROW = Layout(table=32, word_type=np.uint32, entry_bits=10, per_word=3)  # 5-bit column, 5-bit code
WIDE = Layout(table=64, word_type=np.uint16, entry_bits=16, per_word=1)  # 5-bit column, 6-bit code
LAYOUTS = (NARROW, WIDE)

# Batch columns a batched product runs through a chunk's weights at once, their sums held in
# registers: 4 columns take 8 registers of inputs and 8 of sums, of the 32.
COLUMN_GROUP = 4


# Set to 0 (or off, false, no) to turn the AVX-512 forms off on a CPU that has them: to run and
# time the other path (with NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=-avx512f for AVX2-only code: the
# name alone keeps the host's features), as `make test` does.
AVX512_SWITCH = "DEEPSHRINK_AVX512"


def available() -> bool:
    """Whether the tiled form may run: the machine numba compiles for has AVX-512F (the permutes
    are AVX-512 instructions) and DEEPSHRINK_AVX512 does not turn it off.

    Returns:
        True where the tiled form may run.
    """
    if os.environ.get(AVX512_SWITCH, "").strip().lower() in ("0", "off", "false", "no"):
        return False
    features = os.environ.get("NUMBA_CPU_FEATURES")
    if features:
        return "+avx512f" in features.split(",")
    if os.environ.get("NUMBA_CPU_NAME", "host") != "host":
        return False  # a named CPU model: do not guess its features
    return host_cpu_features().get("avx512f", False)


def kernel_table(codebook: np.ndarray) -> tuple[np.ndarray, int, Layout] | None:
    """(the codebook as a float32 table of the smallest layout's size, the code of a zero entry,
    that layout), or None when no layout holds the codebook with a zero to pad with.

    Args:
        codebook: code -> value.

    Returns:
        (table, zero code, layout), or None.
    """
    codebook = np.asarray(codebook, dtype=np.float32)
    zeros = np.flatnonzero(codebook == 0)
    for layout in LAYOUTS:
        if len(codebook) < layout.table or (len(codebook) == layout.table and len(zeros)):
            table = np.zeros(layout.table, dtype=np.float32)
            table[: len(codebook)] = codebook
            return table, int(zeros[0]) if len(zeros) else len(codebook), layout
    return None


@numba.njit(cache=True, nogil=True)
def _pack(indptr, columns, codes, order, tiles, padding_code, steps, entry_bits, starts, words, block_tiles):
    """Fill starts (each chunk's first block) and, when `words` is not empty, the words and each
    block's tile. A block holds `steps` steps of one (chunk, tile), one row a lane; lane l's step
    k is entry k % per_word of word l * words_per_lane + k // per_word. Returns the number of
    blocks."""
    rows = len(indptr) - 1
    chunks = len(starts) - 1
    block_words = BLOCK_BYTES // words.itemsize
    words_per_lane = block_words // LANES
    per_word = steps // words_per_lane
    field = (1 << entry_bits) - 1
    counts = np.zeros((LANES, tiles), dtype=np.int64)
    fill = np.zeros(tiles, dtype=np.int64)
    first_block = np.zeros(tiles, dtype=np.int64)
    padded = 0
    for k in range(per_word):
        padded |= (padding_code << 5) << (entry_bits * k)
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
            blocks = (widest + steps - 1) // steps
            if len(words):
                block_tiles[total : total + blocks] = tile
            total += blocks
        if len(words) == 0:
            continue
        words[starts[chunk] * block_words : total * block_words] = padded
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
                block = first_block[tile] + step // steps
                word = block * block_words + lane * words_per_lane + step % steps // per_word
                shift = entry_bits * (step % per_word)
                entry = (columns[index] % TILE) | (codes[index] << 5)
                words[word] = (words[word] & ~(field << shift)) | (entry << shift)
    starts[chunks] = total
    return total


@numba.njit(cache=True, nogil=True)
def _unpack(words, block_tiles, starts, order, rows, padding_code, steps, entry_bits, out_rows, out_columns, out_codes):
    """Every non-padding entry as (row, column, code); returns how many."""
    block_words = BLOCK_BYTES // words.itemsize
    words_per_lane = block_words // LANES
    per_word = steps // words_per_lane
    field = (1 << entry_bits) - 1
    found = 0
    for chunk in range(len(starts) - 1):
        for block in range(starts[chunk], starts[chunk + 1]):
            for lane in range(LANES):
                position = chunk * LANES + lane
                if position >= rows:
                    continue
                for step in range(steps):
                    word = block * block_words + lane * words_per_lane + step // per_word
                    entry = (int(words[word]) >> (entry_bits * (step % per_word))) & field
                    code = entry >> 5
                    if code != padding_code:
                        out_rows[found] = order[position]
                        out_columns[found] = block_tiles[block] * TILE + (entry & 31)
                        out_codes[found] = code
                        found += 1
    return found


def chunk_arrays(indptr, rows: int, tiles: int, lanes: int) -> tuple[np.ndarray, np.ndarray, type]:
    """(the rows in chunk order, an empty array for each chunk's first block, the dtype of the
    blocks' tile numbers) for a tiled form of `lanes` rows a chunk. Longest rows come first, ties
    in row order, so that like rows share a chunk and pad less (SELL-C-sigma).

    Args:
        indptr: the CSR row pointers.
        rows: the matrix's rows.
        tiles: its tiles of input columns.
        lanes: rows per chunk.

    Returns:
        (order int32, starts int64 of chunks + 1 zeros, uint16 or uint32).
    """
    order = np.argsort(-np.diff(indptr), kind="stable").astype(np.int32)
    starts = np.zeros(-(-rows // lanes) + 1, dtype=np.int64)
    return order, starts, np.uint16 if tiles <= 1 << 16 else np.uint32


class TiledCodes:
    """A weight matrix in the register-tiled form; see the module docstring."""

    def __init__(self, indptr, columns, codes, codebook, shape: tuple[int, int]) -> None:
        fitted = kernel_table(codebook)
        if fitted is None:
            raise ValueError(
                f"the register-tiled form holds at most {LAYOUTS[-1].table} codebook entries, one of them zero"
            )
        self.codebook, self.padding_code, self.layout = fitted
        self.shape = shape
        rows, width = shape
        self.tiles = max(-(-width // TILE), 1)
        self.order, self.starts, tile_type = chunk_arrays(indptr, rows, self.tiles, LANES)
        columns64, codes64 = np.asarray(columns, dtype=np.int64), np.asarray(codes, dtype=np.int64)
        layout = self.layout
        arguments = (indptr, columns64, codes64, self.order, self.tiles, self.padding_code, layout.steps)
        arguments += (layout.entry_bits, self.starts)
        blocks = _pack(*arguments, np.empty(0, dtype=layout.word_type), np.empty(0, dtype=tile_type))
        self.words = np.empty(blocks * BLOCK_BYTES // np.dtype(layout.word_type).itemsize, dtype=layout.word_type)
        self.block_tiles = np.empty(blocks, dtype=tile_type)
        _pack(*arguments, self.words, self.block_tiles)

    @staticmethod
    def fits(codebook: np.ndarray) -> bool:
        """Whether a codebook can take the tiled form on this machine.

        Args:
            codebook: code -> value.

        Returns:
            True when the tiled form is available and a layout holds the codebook.
        """
        return available() and kernel_table(codebook) is not None

    @property
    def nbytes(self) -> int:
        """The bytes of the form's arrays."""
        return sum(array.nbytes for array in (self.words, self.block_tiles, self.starts, self.order, self.codebook))

    @property
    def own_nbytes(self) -> int:
        """The bytes of the form's arrays (it keeps no other form's)."""
        return self.nbytes

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, code) of every kept weight, padding left out; codes index `codebook`.

        Returns:
            Three int64 arrays.
        """
        capacity = len(self.block_tiles) * LANES * self.layout.steps
        rows, columns, codes = (np.empty(capacity, dtype=np.int64) for _ in range(3))
        found = _unpack(
            self.words,
            self.block_tiles,
            self.starts,
            self.order,
            self.shape[0],
            self.padding_code,
            self.layout.steps,
            self.layout.entry_bits,
            rows,
            columns,
            codes,
        )
        return rows[:found], columns[:found], codes[:found]

    def product(self, inputs: np.ndarray) -> np.ndarray:
        """inputs @ W.T for float32 inputs of shape (batch, columns): (batch, rows).

        Args:
            inputs: float32, (batch, columns), C-contiguous.

        Returns:
            (batch, rows) float32.
        """
        batch = inputs.shape[0]
        result = np.empty((batch, self.shape[0]), dtype=np.float32)
        arrays = (self.words, self.block_tiles, self.starts, self.codebook, self.order)
        if batch == 1:
            TILED_MATVEC[len(self.block_tiles) >= PARALLEL_MINIMUM_BLOCKS](result[0], inputs[0], *arrays)
        else:
            work = len(self.block_tiles) * -(-batch // COLUMN_GROUP)
            TILED_MATMUL[work >= PARALLEL_MINIMUM_BLOCKS](result, inputs, *arrays)
        return result

    @property
    def vector_call(self) -> tuple:
        """The batch-1 entry point and its arguments after (result, address, bias).

        Returns:
            (tiled_vector, its arguments).
        """
        arrays = (self.words, self.block_tiles, self.starts, self.codebook, self.order)
        return tiled_vector, (len(self.block_tiles) >= PARALLEL_MINIMUM_BLOCKS, *arrays, self.shape[1])


# Below this many blocks (times the groups of COLUMN_GROUP samples) a product runs on one
# thread: waking the second costs more than it saves (benchmarks/inference_speed.py).
PARALLEL_MINIMUM_BLOCKS = 4_000


def _arguments_fit(out, inputs, out_dimensions, input_dimensions, words, block_tiles, starts, table, chunk) -> bool:
    return (
        is_c_array(out, out_dimensions, types.float32)
        and is_c_array(inputs, input_dimensions, types.float32)
        and (is_c_array(words, 1, types.uint32) or is_c_array(words, 1, types.uint16))
        and is_c_array(block_tiles, 1)
        and is_c_array(starts, 1, types.int64)
        and is_c_array(table, 1, types.float32)
        and isinstance(chunk, types.Integer)
    )


class KernelEmitter:
    """What the chunk kernels of every tiled form share: the arrays' data pointers, the chunk
    index, float and integer vectors of `lanes` lanes, an FMA, and typed loads.
    Arguments: six arrays (out, inputs, ...), then the chunk."""

    def __init__(self, context, builder, signature, arguments, lanes: int) -> None:
        self.builder = builder
        self.arrays = [
            context.make_array(array_type)(context, builder, value)
            for array_type, value in zip(signature.args[:6], arguments[:6], strict=True)
        ]
        self.chunk = context.cast(builder, arguments[6], signature.args[6], types.int64)
        self.int64 = ir.IntType(64)
        self.floats = ir.VectorType(ir.FloatType(), lanes)
        self.integers = ir.VectorType(ir.IntType(32), lanes)
        self.fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(self.floats, [self.floats] * 3), f"llvm.fma.v{lanes}f32"
        )

    def intrinsic(self, name: str, result, operands):
        """An LLVM intrinsic's declaration in this module.

        Args:
            name: the intrinsic, e.g. "llvm.x86.avx2.permps".
            result: its LLVM result type.
            operands: its LLVM operand types.

        Returns:
            The function to call.
        """
        return cgutils.get_or_insert_function(self.builder.module, ir.FunctionType(result, operands), name)

    def constant(self, value: int):
        """An int64 constant.

        Args:
            value: the value.

        Returns:
            The LLVM constant.
        """
        return ir.Constant(self.int64, value)

    def pointer(self, array_index: int, offset, vector_type):
        """A pointer to element `offset` of argument `array_index`, as a `vector_type` pointer.

        Args:
            array_index: which array argument.
            offset: the element, an int64 value.
            vector_type: the LLVM type to point at.

        Returns:
            The pointer.
        """
        element = self.builder.gep(self.arrays[array_index].data, [offset])
        return self.builder.bitcast(element, vector_type.as_pointer())

    def load(self, array_index: int, offset, vector_type):
        """A `vector_type` loaded from element `offset` of argument `array_index` (4-byte aligned).

        Args:
            array_index: which array argument.
            offset: the first element, an int64 value.
            vector_type: the LLVM type to load.

        Returns:
            The loaded value.
        """
        return self.builder.load(self.pointer(array_index, offset, vector_type), align=4)

    def broadcast(self, value, vector_type):
        """`value` in every lane of a `vector_type`.

        Args:
            value: a scalar LLVM value of the vector's element type.
            vector_type: the LLVM vector type.

        Returns:
            The vector.
        """
        builder = self.builder
        undefined = ir.Constant(vector_type, ir.Undefined)
        first = builder.insert_element(undefined, value, ir.Constant(ir.IntType(32), 0))
        everywhere = ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), [0] * vector_type.count)
        return builder.shuffle_vector(first, undefined, everywhere)

    def scalar(self, array_index: int, offset):
        """Element `offset` of argument `array_index`.

        Args:
            array_index: which array argument.
            offset: the element, an int64 value.

        Returns:
            The loaded value.
        """
        return self.builder.load(self.builder.gep(self.arrays[array_index].data, [offset]))


class _Emitter(KernelEmitter):
    """The AVX-512 chunk kernels' emitter: the layout the words' dtype names and vpermi2ps."""

    def __init__(self, context, builder, signature, arguments) -> None:
        super().__init__(context, builder, signature, arguments, LANES)
        # The words' dtype says which layout they hold (see the module docstring).
        self.layout = NARROW if signature.args[2].dtype == types.uint32 else WIDE
        self.permute = self.intrinsic(
            "llvm.x86.avx512.vpermi2var.ps.512", self.floats, [self.floats, self.integers, self.floats]
        )

    def table(self):
        """The codebook in registers: two vectors, or four for the wide layout."""
        return [self.load(5, self.constant(LANES * part), self.floats) for part in range(self.layout.table // LANES)]

    def word(self, block):
        """A block's 64 bytes as 16 lanes of 32 bits."""
        return self.load(
            2, self.builder.mul(block, self.constant(BLOCK_BYTES // self.layout_itemsize())), self.integers
        )

    def layout_itemsize(self) -> int:
        return np.dtype(self.layout.word_type).itemsize

    def entry_parts(self, word):
        """Per step in the block: (the index vector for the input permute, for the code lookup).
        vpermi2ps reads only the low 5 bits of each index, so no masking is needed."""
        builder = self.builder
        shift = self.layout.entry_bits
        shifted = [
            builder.lshr(word, ir.Constant(self.integers, [shift * k] * LANES)) if k else word
            for k in range(self.layout.steps)
        ]
        return [(value, builder.lshr(value, ir.Constant(self.integers, [5] * LANES))) for value in shifted]

    def weights(self, codebook, code):
        """The codebook value of each lane's code: one permute over two registers, or for the
        wide layout one over each pair and a blend on the code's sixth bit."""
        builder = self.builder
        low = builder.call(self.permute, [codebook[0], code, codebook[1]])
        if len(codebook) == 2:
            return low
        high = builder.call(self.permute, [codebook[2], code, codebook[3]])
        sixth = builder.and_(code, ir.Constant(self.integers, [1 << 5] * LANES))
        upper = builder.icmp_unsigned("!=", sixth, ir.Constant(self.integers, [0] * LANES))
        return builder.select(upper, high, low)

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
        # One accumulator per step of a block, so consecutive FMAs do not wait on each other.
        sums = [cgutils.alloca_once_value(builder, zero) for _ in range(emit.layout.steps)]

        def body(tile, block):
            first = builder.mul(tile, emit.constant(TILE))
            inputs = (
                emit.load(1, first, emit.floats),
                emit.load(1, builder.add(first, emit.constant(LANES)), emit.floats),
            )
            for total, (column, code) in zip(sums, emit.entry_parts(emit.word(block)), strict=True):
                value = builder.call(emit.permute, [inputs[0], column, inputs[1]])
                weight = emit.weights(codebook, code)
                builder.store(builder.call(emit.fma, [value, weight, builder.load(total)]), total)

        emit.chunk_blocks(body)
        result = builder.load(sums[0])
        for total in sums[1:]:
            result = builder.fadd(result, builder.load(total))
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
            parts = emit.entry_parts(emit.word(block))
            weights = [emit.weights(codebook, code) for _, code in parts]
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
def padded_vector(inputs, tile):
    """`inputs` with zeros after it, to a whole number of tiles of `tile` floats.

    Args:
        inputs: float32 (columns,).
        tile: floats per tile.

    Returns:
        The padded float32 vector.
    """
    vector = np.zeros((len(inputs) + tile - 1) // tile * tile, dtype=np.float32)
    vector[: len(inputs)] = inputs
    return vector


@numba.njit(cache=True, nogil=True)
def tiled_inputs(inputs, samples, tile):
    """(tiles, samples, tile): each tile's inputs for every sample, zero-padded (the samples past
    the batch too).

    Args:
        inputs: float32 (batch, columns).
        samples: the samples to lay out, at least the batch.
        tile: floats per tile.

    Returns:
        The float32 (tiles, samples, tile) array.
    """
    batch, width = inputs.shape
    tiles = (width + tile - 1) // tile
    tiled = np.zeros((tiles, samples, tile), dtype=np.float32)
    for sample in range(batch):  # explicit loops: a slice costs an array view each
        for tile_index in range(tiles - 1):
            for column in range(tile):
                tiled[tile_index, sample, column] = inputs[sample, tile_index * tile + column]
        for column in range((tiles - 1) * tile, width):
            tiled[tiles - 1, sample, column - (tiles - 1) * tile] = inputs[sample, column]
    return tiled


@numba.njit(cache=True, nogil=True)
def scatter_rows(result, out, order):
    """result[sample, order[p]] = out[p // lanes, sample, p % lanes], lanes = out.shape[2].

    Args:
        result: float32 (batch, rows), written.
        out: float32 (chunks, samples, lanes), the chunks' sums.
        order: the row of each chunk lane.
    """
    rows = len(order)
    lanes = out.shape[2]
    for sample in range(result.shape[0]):
        for chunk in range(out.shape[0]):
            for lane in range(min(lanes, rows - chunk * lanes)):
                result[sample, order[chunk * lanes + lane]] = out[chunk, sample, lane]


@numba.njit(cache=True, nogil=True)
def scatter_vector(result, out, order):
    """result[order[p]] = out[p].

    Args:
        result: float32 (rows,), written.
        out: float32, the chunks' sums lane by lane.
        order: the row of each chunk lane.
    """
    for position in range(len(order)):
        result[order[position]] = out[position]


def _tiled_matvec(result, inputs, words, block_tiles, starts, table, order):
    """result[order[p]] = product of chunk row p with `inputs` (one sample of `columns` floats)."""
    chunks = len(starts) - 1
    vector = padded_vector(inputs, TILE)
    out = np.empty(chunks * LANES, dtype=np.float32)
    for chunk in numba.prange(chunks):
        _tiled_chunk(out, vector, words, block_tiles, starts, table, chunk)
    scatter_vector(result, out, order)


def _tiled_matmul(result, inputs, words, block_tiles, starts, table, order):
    """result[:, order[p]] = product of chunk row p with each row of `inputs` (batch x columns).
    The work is split over (chunk, group of COLUMN_GROUP samples) pairs, so a convolution's
    many positions keep both threads busy even where the layer has few chunks."""
    chunks = len(starts) - 1
    groups = (inputs.shape[0] + COLUMN_GROUP - 1) // COLUMN_GROUP
    tiled = tiled_inputs(inputs, groups * COLUMN_GROUP, TILE)
    out = np.empty((chunks, groups * COLUMN_GROUP, LANES), dtype=np.float32)
    for pair in numba.prange(chunks * groups):
        _tiled_chunk_batched(
            out, tiled, words, block_tiles, starts, table, pair // groups, pair % groups * COLUMN_GROUP
        )
    scatter_rows(result, out, order)


# numba compiles on first call, so a machine without AVX-512 never compiles these.
TILED_MATVEC = {parallel: compiled(_tiled_matvec, parallel) for parallel in (False, True)}
TILED_MATMUL = {parallel: compiled(_tiled_matmul, parallel) for parallel in (False, True)}
_TILED_MATVEC_SERIAL, _TILED_MATVEC_PARALLEL = TILED_MATVEC[False], TILED_MATVEC[True]


@numba.njit(cache=True, nogil=True)
def tiled_vector(result, address, bias, parallel, words, block_tiles, starts, table, order, width):
    """result[0] = W @ x + bias, x the `width` floats at `address`: the batch-1 entry point
    (kernels.py, "Batch-1 entry points").

    Args:
        result: float32 (1, rows), written.
        address: the input's address (intrinsics.float32_at).
        bias: float32 (rows,) or (0,).
        parallel: run the threaded kernel.
        words: the packed blocks.
        block_tiles: each block's tile.
        starts: each chunk's first block.
        table: the kernel's codebook table.
        order: the row of each chunk lane.
        width: the input's floats.
    """
    inputs = numba.carray(float32_at(address), width)
    if parallel:
        _TILED_MATVEC_PARALLEL(result[0], inputs, words, block_tiles, starts, table, order)
    else:
        _TILED_MATVEC_SERIAL(result[0], inputs, words, block_tiles, starts, table, order)
    add_bias(result[0], bias)
