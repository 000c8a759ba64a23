"""LLVM intrinsics that numba does not expose, for the compressed-form kernels, and the host
CPU's features that decide which of them may run."""

from __future__ import annotations

import functools

import llvmlite.binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@functools.cache
def host_cpu_features() -> dict[str, bool]:
    """The features LLVM finds on this machine's CPU, asked once: each kernel form's check asks
    on every model load, and the query cost about 0.35 ms a time.

    Returns:
        Feature name (for example "avx512f") to whether the CPU has it.
    """
    return dict(llvmlite.binding.get_host_cpu_features())


def is_c_array(value, ndim: int, dtype=None) -> bool:
    """A C-contiguous numba array type of `ndim` dimensions holding `dtype` (any integer if None).
    The emitted code computes addresses from the data pointer alone, so strided views are refused
    at typing time rather than read wrongly.

    Args:
        value: a numba type.
        ndim: the dimensions required.
        dtype: the element type required, or None for any integer.

    Returns:
        Whether `value` is such an array type.
    """
    return (
        isinstance(value, types.Array)
        and value.ndim == ndim
        and value.layout == "C"
        and (value.dtype == dtype if dtype is not None else isinstance(value.dtype, types.Integer))
    )


@intrinsic
def prefetch(typing_context, array, index):
    """Ask the CPU to start loading array[index] into every cache level (llvm.prefetch: read,
    locality 3, data). No effect on results, and no fault even for a bad address; callers still
    keep `index` inside the array.

    The kernels stream their column indices once per call. On this class of machine the
    hardware prefetcher left that stream waiting on memory: a pure sum over 8 MB of uint16 ran
    2.3x slower with the data out of cache than in it, and 1.0x with this hint 4 KB ahead.

    Args:
        typing_context: numba's typing context (the intrinsic protocol).
        array: a C-contiguous array.
        index: the element to prefetch.

    Returns:
        The signature and code generator (numba's intrinsic protocol), or None for argument
        types it does not take.
    """
    if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, arguments):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, arguments[0])
        offset = context.cast(builder, arguments[1], signature.args[1], types.intp)
        address = builder.bitcast(builder.gep(view.data, [offset]), ir.IntType(8).as_pointer())
        integer = ir.IntType(32)
        function_type = ir.FunctionType(ir.VoidType(), [address.type, integer, integer, integer])
        function = cgutils.get_or_insert_function(builder.module, function_type, "llvm.prefetch.p0")
        read, keep_in_all_levels, data_cache = (ir.Constant(integer, value) for value in (0, 3, 1))
        builder.call(function, [address, read, keep_in_all_levels, data_cache])
        return context.get_dummy_value()

    return types.void(array, index), codegen


# Entries summed per gather by gathered_sum: one 512-bit vector of float32.
GATHER_WIDTH = 16


@intrinsic
def gathered_sum(typing_context, vector, columns, start, blocks):
    """sum(vector[columns[start : start + GATHER_WIDTH * blocks]]) as float32.

    Each block is one contiguous load of GATHER_WIDTH column indices and one vector gather
    (llvm.masked.gather, which LLVM lowers to a single AVX-512 gather where the CPU has one and
    to scalar loads elsewhere), added into a vector accumulator that is summed once at the end
    (in any order, like fastmath). Written by hand because LLVM vectorized numba's plain loop
    across blocks instead of across a block's entries, building each gather's indices with one
    insert per entry. The caller guarantees that every index read is inside `columns` and
    every column inside `vector`.

    Args:
        typing_context: numba's typing context (the intrinsic protocol).
        vector: float32 inputs.
        columns: column indices.
        start: the first index to read.
        blocks: how many GATHER_WIDTH blocks.

    Returns:
        The signature and code generator (numba's intrinsic protocol), or None for argument
        types it does not take.
    """
    if not (
        is_c_array(vector, 1, types.float32)
        and is_c_array(columns, 1)
        and isinstance(start, types.Integer)
        and isinstance(blocks, types.Integer)
    ):
        return None

    def codegen(context, builder, signature, arguments):
        vector_type, columns_type, start_type, blocks_type = signature.args
        values = context.make_array(vector_type)(context, builder, arguments[0])
        indices = context.make_array(columns_type)(context, builder, arguments[1])
        first = context.cast(builder, arguments[2], start_type, types.int64)
        count = context.cast(builder, arguments[3], blocks_type, types.int64)
        int64 = ir.IntType(64)
        floats = ir.VectorType(ir.FloatType(), GATHER_WIDTH)
        offsets = ir.VectorType(int64, GATHER_WIDTH)
        pointers = ir.VectorType(ir.FloatType().as_pointer(), GATHER_WIDTH)
        index_vector = ir.VectorType(context.get_value_type(columns_type.dtype), GATHER_WIDTH)
        widen = builder.sext if columns_type.dtype.signed else builder.zext
        # Every lane's address is base + 4 * index (llvmlite's gep takes no vector index).
        base = builder.insert_element(
            ir.Constant(offsets, None), builder.ptrtoint(values.data, int64), ir.Constant(ir.IntType(32), 0)
        )
        base = builder.shuffle_vector(
            base,
            ir.Constant(offsets, None),
            ir.Constant(ir.VectorType(ir.IntType(32), GATHER_WIDTH), [0] * GATHER_WIDTH),
        )
        everything = ir.Constant(ir.VectorType(ir.IntType(1), GATHER_WIDTH), [1] * GATHER_WIDTH)
        gather = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(floats, [pointers, ir.IntType(32), everything.type, floats]),
            f"llvm.masked.gather.v{GATHER_WIDTH}f32.v{GATHER_WIDTH}p0",
        )
        accumulator = cgutils.alloca_once_value(builder, ir.Constant(floats, [0.0] * GATHER_WIDTH))
        with cgutils.for_range(builder, count) as loop:
            position = builder.add(first, builder.mul(loop.index, ir.Constant(int64, GATHER_WIDTH)))
            address = builder.bitcast(builder.gep(indices.data, [position]), index_vector.as_pointer())
            lanes = widen(builder.load(address, align=1), offsets)
            addresses = builder.add(base, builder.shl(lanes, ir.Constant(offsets, [2] * GATHER_WIDTH)))
            gathered = builder.call(
                gather,
                [
                    builder.inttoptr(addresses, pointers),
                    ir.Constant(ir.IntType(32), 4),
                    everything,
                    ir.Constant(floats, None),
                ],
            )
            builder.store(builder.fadd(builder.load(accumulator), gathered), accumulator)
        reduce = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.FloatType(), [ir.FloatType(), floats]),
            f"llvm.vector.reduce.fadd.v{GATHER_WIDTH}f32",
        )
        return builder.call(
            reduce, [ir.Constant(ir.FloatType(), 0.0), builder.load(accumulator)], fastmath=("reassoc",)
        )

    return types.float32(vector, columns, start, blocks), codegen


def _row_arguments_fit(total, inputs, columns, start, count) -> bool:
    return (
        is_c_array(total, 1, types.float32)
        and is_c_array(inputs, 2, types.float32)
        and is_c_array(columns, 1)
        and isinstance(start, types.Integer)
        and isinstance(count, types.Integer)
    )


def _emit_row_sum(context, builder, total, inputs, columns, start, count, weight_of=None) -> None:
    """total += sum over entries e in [start, start + count) of w(e) * inputs[columns[e], :], where
    w(e) = weight_of(builder, e) (a float) or 1. The batch is walked in chunks of GATHER_WIDTH
    columns, the last chunk masked; a chunk's sum stays in one vector register."""
    total_type, inputs_type, columns_type, start_type, count_type = total[1], inputs[1], columns[1], start[1], count[1]
    sums = context.make_array(total_type)(context, builder, total[0])
    rows = context.make_array(inputs_type)(context, builder, inputs[0])
    indices = context.make_array(columns_type)(context, builder, columns[0])
    first = context.cast(builder, start[0], start_type, types.int64)
    entries = context.cast(builder, count[0], count_type, types.int64)
    int64, int32 = ir.IntType(64), ir.IntType(32)
    floats = ir.VectorType(ir.FloatType(), GATHER_WIDTH)
    lanes_type = ir.VectorType(int64, GATHER_WIDTH)
    mask_type = ir.VectorType(ir.IntType(1), GATHER_WIDTH)
    splat = ir.Constant(ir.VectorType(int32, GATHER_WIDTH), [0] * GATHER_WIDTH)
    batch = builder.extract_value(rows.shape, 1)
    width = ir.Constant(int64, GATHER_WIDTH)
    chunks = builder.sdiv(builder.add(batch, ir.Constant(int64, GATHER_WIDTH - 1)), width)
    load = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(floats, [floats.as_pointer(), int32, mask_type, floats]),
        f"llvm.masked.load.v{GATHER_WIDTH}f32.p0",
    )
    store = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(ir.VoidType(), [floats, floats.as_pointer(), int32, mask_type]),
        f"llvm.masked.store.v{GATHER_WIDTH}f32.p0",
    )
    zero = ir.Constant(floats, [0.0] * GATHER_WIDTH)
    lane_numbers = ir.Constant(lanes_type, list(range(GATHER_WIDTH)))
    align = ir.Constant(int32, 4)
    widen = builder.sext if columns_type.dtype.signed else builder.zext
    with cgutils.for_range(builder, chunks) as chunk:
        offset = builder.mul(chunk.index, width)
        remaining = builder.insert_element(
            ir.Constant(lanes_type, None), builder.sub(batch, offset), ir.Constant(int32, 0)
        )
        mask = builder.icmp_signed("<", lane_numbers, builder.shuffle_vector(remaining, remaining, splat))
        accumulator = cgutils.alloca_once_value(builder, zero)
        with cgutils.for_range(builder, entries) as entry:
            position = builder.add(first, entry.index)
            column = widen(builder.load(builder.gep(indices.data, [position])), int64)
            address = builder.gep(rows.data, [builder.add(builder.mul(column, batch), offset)])
            row = builder.call(load, [builder.bitcast(address, floats.as_pointer()), align, mask, zero])
            if weight_of is not None:
                weight = builder.insert_element(
                    ir.Constant(floats, None), weight_of(builder, position), ir.Constant(int32, 0)
                )
                row = builder.fmul(builder.shuffle_vector(weight, weight, splat), row)
            builder.store(builder.fadd(builder.load(accumulator), row), accumulator)
        target = builder.bitcast(builder.gep(sums.data, [offset]), floats.as_pointer())
        current = builder.call(load, [target, align, mask, zero])
        builder.call(store, [builder.fadd(current, builder.load(accumulator)), target, align, mask])


@intrinsic
def add_rows(typing_context, total, inputs, columns, start, count):
    """total += inputs[columns[start : start + count]].sum(axis=0), in float32 vectors.

    `inputs` is (rows, batch) row-major and `total` has `batch` entries. Every entry is one vector
    load of its input row per GATHER_WIDTH batch columns, added to a register. The batched
    kernel had written this as a loop over a heap array whose length numba did not know, which
    kept the partial sums in memory: 1.8 ns per entry at batch 8 on AlexNet's fc6, against 0.16 ns
    for a whole batch-1 product. The caller guarantees that every index read is inside `columns`
    and every column inside `inputs`.

    Args:
        typing_context: numba's typing context (the intrinsic protocol).
        total: float32 (batch,), added to.
        inputs: float32 (rows, batch).
        columns: row indices into `inputs`.
        start: the first index to read.
        count: how many.

    Returns:
        The signature and code generator (numba's intrinsic protocol), or None for argument
        types it does not take.
    """
    if not _row_arguments_fit(total, inputs, columns, start, count):
        return None

    def codegen(context, builder, signature, arguments):
        _emit_row_sum(context, builder, *zip(arguments, signature.args, strict=True))
        return context.get_dummy_value()

    return types.void(total, inputs, columns, start, count), codegen


@intrinsic
def add_weighted_rows(typing_context, total, inputs, columns, codes, codebook, start, count):
    """total += sum over e of codebook[codes[e]] * inputs[columns[e], :] for e in [start, start +
    count): add_rows for the form that keeps one code per entry. Same guarantees from the caller,
    and every code inside `codebook`.

    Args:
        typing_context: numba's typing context (the intrinsic protocol).
        total: float32 (batch,), added to.
        inputs: float32 (rows, batch).
        columns: row indices into `inputs`.
        codes: each entry's code.
        codebook: float32 code -> value.
        start: the first entry.
        count: how many.

    Returns:
        The signature and code generator (numba's intrinsic protocol), or None for argument
        types it does not take.
    """
    if not (
        _row_arguments_fit(total, inputs, columns, start, count)
        and is_c_array(codes, 1)
        and is_c_array(codebook, 1, types.float32)
    ):
        return None

    def codegen(context, builder, signature, arguments):
        total, inputs, columns, codes, codebook, start, count = zip(arguments, signature.args, strict=True)
        code_array = context.make_array(codes[1])(context, builder, codes[0])
        values = context.make_array(codebook[1])(context, builder, codebook[0])
        widen = builder.sext if codes[1].dtype.signed else builder.zext

        def weight_of(builder, position):
            code = widen(builder.load(builder.gep(code_array.data, [position])), ir.IntType(64))
            return builder.load(builder.gep(values.data, [code]))

        _emit_row_sum(context, builder, total, inputs, columns, start, count, weight_of)
        return context.get_dummy_value()

    return types.void(total, inputs, columns, codes, codebook, start, count), codegen


@intrinsic
def float32_at(typing_context, address):
    """A float32 pointer from an integer address, for numba.carray: how the batch-1 entry
    points read a torch tensor's storage from its data_ptr(), where Tensor.numpy() alone cost
    more than the rest of a small layer's call (about 1-2 us on the machines measured).

    The caller vouches for the address: a live, C-contiguous float32 CPU tensor holding at least
    as many floats as the array it makes (CompressedLinear checks all four before each call).

    Args:
        typing_context: numba's typing context (the intrinsic protocol).
        address: the integer address.

    Returns:
        The signature and code generator (numba's intrinsic protocol), or None for a type that
        is not an integer.
    """
    if not isinstance(address, types.Integer):
        return None
    pointer_type = types.CPointer(types.float32)

    def codegen(context, builder, signature, arguments):
        return builder.inttoptr(arguments[0], context.get_value_type(pointer_type))

    return pointer_type(address), codegen
