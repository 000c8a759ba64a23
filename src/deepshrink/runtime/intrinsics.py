"""LLVM intrinsics that numba does not expose, for the compressed-form kernels."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def prefetch(typing_context, array, index):
    """Ask the CPU to start loading array[index] into every cache level (llvm.prefetch: read,
    locality 3, data). No effect on results, and no fault even for a bad address; callers still
    keep `index` inside the array.

    The kernels stream their column indices once per call. On this class of machine the
    hardware prefetcher left that stream waiting on memory: a pure sum over 8 MB of uint16 ran
    2.3x slower with the data out of cache than in it, and 1.0x with this hint 4 KB ahead.
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
