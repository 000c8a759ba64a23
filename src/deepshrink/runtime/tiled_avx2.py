"""The register-tiled form with 256-bit registers: products from codebook indices on AVX2 CPUs.

The same idea as tiled.py (inputs and codebook held in registers, one lane per row, no memory
gathers), cut to what AVX2 has: vpermps permutes eight floats by a 3-bit index and there is no
two-register permute. So

- the 8 lanes of a vector are 8 rows (a chunk), ordered by length first (SELL-C-sigma);
- the input is cut into tiles of TILE = 8 columns, one register, and a weight's input is one
  vpermps by its 3-bit column in the tile;
- the codebook (at most 32 entries, one of them zero) sits in four registers, and a weight's
  value is one vpermps from each and three blends on the code's fourth and fifth bits;
- an entry is the column in its tile (3 bits) and the code (5 bits): one byte.

A block is one step of one (chunk, tile): each row's next weight in that tile, padding entries
(the zero's code) where a row has no more. Every block names its tile, so a chunk's blocks are
one flat loop. Four consecutive blocks share one vector of 32-bit words, block u in byte u of
each lane, so a single load serves four blocks and no byte-widening instruction (which would
compete with the permutes for the same port on Intel CPUs) is needed; each chunk's block count
is padded to a multiple of four.

Measured (BENCHMARKS.md, "The AVX2 tiled form"): a tile holds a row's weights in 8 columns,
about 0.72 of them at 9% density, while a block runs as long as the longest of its 8 rows
(about 2 steps), so about 36% of the slots are real weights; a block takes about 3.3 ns on an
Intel Xeon (Sapphire Rapids class), half of it the codebook lookup. Looking the code's value up
with an 8-entry gather (vgatherdps from the table in L1 cache) measured no faster, and gathers
are slowed further by the Gather Data Sampling mitigation on older Intel CPUs (not measured
here), so the permutes stay. At batch 1 this form ran 1.2-1.8x faster than the per-entry CSR
kernel on AlexNet's fc7 and fc8 shapes and about level with it on fc6 and LeNet's fc1.

Only single samples run tiled. Batches run the per-entry CSR kernel, whose arrays this form
keeps too: a batched tiled kernel (4 samples a chunk, each block's lookup serving all four;
AVX2's 16 registers hold no more) ran 1.3-3.5x slower than per-entry at batch 8 and 64 on every
shape measured, since per-entry adds each weight's contribution to a whole vector of samples
with no padding and no permute.

The kernel is emitted as LLVM IR with x86 AVX2 intrinsics and runs where the code numba
generates has AVX2 and FMA (`available()`), and only where the AVX-512 tiled form does not.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from deepshrink.runtime.intrinsics import float32_at, is_c_array
from deepshrink.runtime.kernels import add_bias, compiled
from deepshrink.runtime.tiled import KernelEmitter, TiledArrays, chunk_arrays, padded_vector, scatter_vector

LANES = 8  # rows per chunk: one float32 lane each in a 256-bit register
TILE = 8  # input columns per tile: one 256-bit register
TABLE = 32  # codebook entries the kernels hold: four registers
COLUMN_BITS = 3
BLOCKS_PER_WORD = 4  # blocks sharing one vector of 32-bit words, one byte each
# Below this many blocks a product runs on one thread. A block here holds 8 slots, a sixth of
# the AVX-512 form's 48, so this is that form's 4,000 blocks (benchmarks/inference_speed.py) in
# slots, rounded; not measured separately.
PARALLEL_MINIMUM_BLOCKS = 24_000


def available() -> bool:
    """Whether the AVX2 tiled form may run: the code numba generates has AVX2 and FMA.

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
        import llvmlite.binding

        host = llvmlite.binding.get_host_cpu_features()
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


def kernel_table(codebook: np.ndarray) -> tuple[np.ndarray, int] | None:
    """(the codebook as 32 float32 entries, the code of a zero entry), or None when it has more
    than 32 entries or 32 without a zero to pad with.

    Args:
        codebook: code -> value.

    Returns:
        (table, zero code), or None.
    """
    codebook = np.asarray(codebook, dtype=np.float32)
    zeros = np.flatnonzero(codebook == 0)
    if len(codebook) > TABLE or (len(codebook) == TABLE and not len(zeros)):
        return None
    table = np.zeros(TABLE, dtype=np.float32)
    table[: len(codebook)] = codebook
    return table, int(zeros[0]) if len(zeros) else len(codebook)


@numba.njit(cache=True, nogil=True)
def _pack(indptr, columns, codes, order, tiles, padding_code, starts, words, block_tiles):
    """Fill starts (each chunk's first block) and, when `words` is not empty, the words and each
    block's tile. Block b's entry for lane l is byte b % 4 of word (b // 4) * LANES + l. Returns
    the number of blocks (a multiple of BLOCKS_PER_WORD)."""
    rows = len(indptr) - 1
    chunks = len(starts) - 1
    counts = np.zeros((LANES, tiles), dtype=np.int64)
    fill = np.zeros(tiles, dtype=np.int64)
    first_block = np.zeros(tiles, dtype=np.int64)
    padded = 0
    for byte in range(BLOCKS_PER_WORD):
        padded |= (padding_code << COLUMN_BITS) << (8 * byte)
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
            if len(words):
                block_tiles[total : total + widest] = tile
            total += widest
        spare = (BLOCKS_PER_WORD - (total - starts[chunk]) % BLOCKS_PER_WORD) % BLOCKS_PER_WORD
        if len(words):
            block_tiles[total : total + spare] = 0  # padding blocks: any tile, zero weights
        total += spare
        if len(words) == 0:
            continue
        words[starts[chunk] // BLOCKS_PER_WORD * LANES : total // BLOCKS_PER_WORD * LANES] = padded
        for lane in range(LANES):
            position = chunk * LANES + lane
            if position >= rows:
                continue
            row = order[position]
            fill[:] = 0
            for index in range(indptr[row], indptr[row + 1]):
                tile = columns[index] // TILE
                block = first_block[tile] + fill[tile]
                fill[tile] += 1
                word = block // BLOCKS_PER_WORD * LANES + lane
                shift = 8 * (block % BLOCKS_PER_WORD)
                entry = (columns[index] % TILE) | (codes[index] << COLUMN_BITS)
                words[word] = (words[word] & ~(0xFF << shift)) | (entry << shift)
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
                if position >= rows:
                    continue
                word = words[block // BLOCKS_PER_WORD * LANES + lane]
                entry = (int(word) >> (8 * (block % BLOCKS_PER_WORD))) & 0xFF
                code = entry >> COLUMN_BITS
                if code != padding_code:
                    out_rows[found] = order[position]
                    out_columns[found] = block_tiles[block] * TILE + (entry & (TILE - 1))
                    out_codes[found] = code
                    found += 1
    return found


class Avx2TiledCodes(TiledArrays):
    """A weight matrix in the AVX2 register-tiled form, with the per-entry form (`batched`) for
    batches of more than one sample; see the module docstring."""

    def __init__(self, indptr, columns, codes, codebook, shape: tuple[int, int], batched) -> None:
        fitted = kernel_table(codebook)
        if fitted is None:
            raise ValueError(f"the AVX2 tiled form holds at most {TABLE} codebook entries, one of them zero")
        self.codebook, self.padding_code = fitted
        self.shape = shape
        self.batched = batched
        rows, width = shape
        self.tiles = max(-(-width // TILE), 1)
        self.order, self.starts, tile_type = chunk_arrays(indptr, rows, self.tiles, LANES)
        columns64, codes64 = np.asarray(columns, dtype=np.int64), np.asarray(codes, dtype=np.int64)
        arguments = (indptr, columns64, codes64, self.order, self.tiles, self.padding_code, self.starts)
        blocks = _pack(*arguments, np.empty(0, dtype=np.uint32), np.empty(0, dtype=tile_type))
        self.words = np.empty(blocks // BLOCKS_PER_WORD * LANES, dtype=np.uint32)
        self.block_tiles = np.empty(blocks, dtype=tile_type)
        _pack(*arguments, self.words, self.block_tiles)

    @staticmethod
    def fits(codebook: np.ndarray) -> bool:
        """Whether a codebook can take this form on this machine.

        Args:
            codebook: code -> value.

        Returns:
            True when the AVX2 kernels may run and the codebook fits their table.
        """
        return available() and kernel_table(codebook) is not None

    @property
    def nbytes(self) -> int:
        """The bytes of the form's arrays, the per-entry form's for batches included."""
        return self.tiles_nbytes + self.batched.nbytes

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, code) of every kept weight, padding left out; codes index `codebook`.

        Returns:
            Three int64 arrays.
        """
        capacity = len(self.block_tiles) * LANES
        rows, columns, codes = (np.empty(capacity, dtype=np.int64) for _ in range(3))
        arguments = (self.words, self.block_tiles, self.starts, self.order, self.shape[0], self.padding_code)
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
        arrays = (self.words, self.block_tiles, self.starts, self.codebook, self.order)
        MATVEC[len(self.block_tiles) >= PARALLEL_MINIMUM_BLOCKS](result[0], inputs[0], *arrays)
        return result

    @property
    def vector_call(self) -> tuple:
        """The batch-1 entry point and its arguments after (result, address, bias).

        Returns:
            (this module's batch-1 entry point, its arguments).
        """
        arrays = (self.words, self.block_tiles, self.starts, self.codebook, self.order)
        return _vector, (len(self.block_tiles) >= PARALLEL_MINIMUM_BLOCKS, *arrays, self.shape[1])


def _arguments_fit(out, inputs, words, block_tiles, starts, table, chunk) -> bool:
    return (
        is_c_array(out, 1, types.float32)
        and is_c_array(inputs, 1, types.float32)
        and is_c_array(words, 1, types.uint32)
        and is_c_array(block_tiles, 1)
        and is_c_array(starts, 1, types.int64)
        and is_c_array(table, 1, types.float32)
        and isinstance(chunk, types.Integer)
    )


class _Emitter(KernelEmitter):
    """The AVX2 chunk kernel's emitter: vpermps and vblendvps."""

    def __init__(self, context, builder, signature, arguments) -> None:
        super().__init__(context, builder, signature, arguments, LANES)
        self.permute = self.intrinsic("llvm.x86.avx2.permps", self.floats, [self.floats, self.integers])
        self.blend = self.intrinsic("llvm.x86.avx.blendv.ps.256", self.floats, [self.floats] * 3)

    def lanes(self, value: int):
        return ir.Constant(self.integers, [value] * LANES)

    def table(self):
        """The codebook in four registers."""
        return [self.load(5, self.constant(LANES * part), self.floats) for part in range(TABLE // LANES)]

    def entry(self, word, byte: int):
        """Block `byte`'s entries of a word vector, shifted down: the permutes read only the low
        3 bits of each index, so the column needs no mask and the code no more than a shift."""
        return self.builder.lshr(word, self.lanes(8 * byte)) if byte else word

    def weights(self, codebook, word, byte: int):
        """The codebook value of each lane's code in block `byte` of `word`: a permute from each
        of the four registers, then blends on the code's fourth and fifth bits, which a left
        shift moves into the sign bit that vblendvps reads."""
        builder = self.builder
        code = builder.lshr(word, self.lanes(8 * byte + COLUMN_BITS))
        parts = [builder.call(self.permute, [register, code]) for register in codebook]

        def sign_of_bit(bit: int):
            shift = 31 - (8 * byte + COLUMN_BITS + bit)
            moved = builder.shl(word, self.lanes(shift)) if shift else word
            return builder.bitcast(moved, self.floats)

        fourth, fifth = sign_of_bit(3), sign_of_bit(4)
        low = builder.call(self.blend, [parts[0], parts[1], fourth])
        high = builder.call(self.blend, [parts[2], parts[3], fourth])
        return builder.call(self.blend, [low, high, fifth])

    def chunk_words(self, body) -> None:
        """Call body(word vector, first block) for every group of BLOCKS_PER_WORD blocks of this
        chunk: one flat loop, each block naming its tile."""
        builder = self.builder
        first = builder.udiv(self.scalar(4, self.chunk), self.constant(BLOCKS_PER_WORD))
        last = builder.udiv(self.scalar(4, builder.add(self.chunk, self.constant(1))), self.constant(BLOCKS_PER_WORD))
        with cgutils.for_range(builder, builder.sub(last, first)) as loop:
            group = builder.add(first, loop.index)
            word = self.load(2, builder.mul(group, self.constant(LANES)), self.integers)
            body(word, builder.mul(group, self.constant(BLOCKS_PER_WORD)))

    def tile(self, block):
        return self.builder.zext(self.scalar(3, block), self.int64)


@intrinsic
def _chunk(typing_context, out, vector, words, block_tiles, starts, table, chunk):
    """out[LANES * chunk :][:LANES] = this chunk's rows times `vector` (tiles * TILE floats)."""
    if not _arguments_fit(out, vector, words, block_tiles, starts, table, chunk):
        return None

    def codegen(context, builder, signature, arguments):
        emit = _Emitter(context, builder, signature, arguments)
        codebook = emit.table()
        zero = ir.Constant(emit.floats, [0.0] * LANES)
        # Two sums: a block (3.3 ns) already takes longer than two FMA latencies.
        sums = [cgutils.alloca_once_value(builder, zero) for _ in range(2)]

        def body(word, first_block):
            for byte in range(BLOCKS_PER_WORD):
                tile = emit.tile(builder.add(first_block, emit.constant(byte)))
                inputs = emit.load(1, builder.mul(tile, emit.constant(TILE)), emit.floats)
                value = builder.call(emit.permute, [inputs, emit.entry(word, byte)])
                weight = emit.weights(codebook, word, byte)
                total = sums[byte % 2]
                builder.store(builder.call(emit.fma, [value, weight, builder.load(total)]), total)

        emit.chunk_words(body)
        result = builder.fadd(builder.load(sums[0]), builder.load(sums[1]))
        builder.store(result, emit.pointer(0, builder.mul(emit.chunk, emit.constant(LANES)), emit.floats), align=4)
        return context.get_dummy_value()

    return types.void(out, vector, words, block_tiles, starts, table, chunk), codegen


def _matvec(result, inputs, words, block_tiles, starts, table, order):
    """result[order[p]] = product of chunk row p with `inputs` (one sample of `columns` floats)."""
    chunks = len(starts) - 1
    vector = padded_vector(inputs, TILE)
    out = np.empty(chunks * LANES, dtype=np.float32)
    for chunk in numba.prange(chunks):
        _chunk(out, vector, words, block_tiles, starts, table, chunk)
    scatter_vector(result, out, order)


# numba compiles on first call, so a machine without AVX2 never compiles it.
MATVEC = {parallel: compiled(_matvec, parallel) for parallel in (False, True)}
_MATVEC_SERIAL, _MATVEC_PARALLEL = MATVEC[False], MATVEC[True]


# tiled.tiled_vector with this form's kernels: numba caches no function that takes another as
# an argument, so each form has its own entry point.
@numba.njit(cache=True, nogil=True)
def _vector(result, address, bias, parallel, words, block_tiles, starts, table, order, width):
    """result[0] = W @ x + bias, x the `width` floats at `address` (arguments as tiled.tiled_vector)."""
    inputs = numba.carray(float32_at(address), width)
    if parallel:
        _MATVEC_PARALLEL(result[0], inputs, words, block_tiles, starts, table, order)
    else:
        _MATVEC_SERIAL(result[0], inputs, words, block_tiles, starts, table, order)
    add_bias(result[0], bias)
