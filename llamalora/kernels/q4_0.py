"""Q4_0: blocks of 32 weights in 18 bytes: half-float scale d, then 16 bytes of 4-bit values q.

Byte j of the 16 holds weight j in its low nibble and weight j + 16 in its high nibble;
weight = d * (q - 8), which the kernels read as d * q + m with m = -8d (exact in float32).
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .f16 import block_halves, float_to_half_bits, half_bits_to_float
from . import intmatvec, simd

INT_DRIVER = intmatvec.Q4_0  # intmatvec's id of this type (a global: compiled code takes it as a literal)

BLOCK_SIZE = 32
TYPE_SIZE = 18
QS_OFFSET = 2


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    blocks = data.reshape(-1, TYPE_SIZE)
    d = half_bits_to_float(blocks[:, 0:2])[:, None]
    qs = blocks[:, QS_OFFSET:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - np.int8(8)
    return (d * q.astype(np.float32)).reshape(data.shape[0], n_cols)


def quantize(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q4_0_ref, operation for operation (bit-exact with the reference)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1] // BLOCK_SIZE * TYPE_SIZE), dtype=np.uint8)
    quantize_rows(x, out)
    return out


@njit(parallel=True, nogil=True, cache=True)
def quantize_rows(x, out):
    for r in prange(x.shape[0]):
        quantize_row(x[r], out[r])


# fastmath=False stated, not defaulted: numba hands a caller's fastmath to callees that leave it unset, and a
# fused multiply-add here would change the bytes
@njit(nogil=True, cache=True, fastmath=False)
def quantize_row(x, out):
    """One contiguous row (or any whole number of its blocks: the LoRA merge quantizes rows piece by piece)."""
    nb = x.shape[0] // 32
    d = np.empty(nb, dtype=np.float32)
    for b in range(nb):
        d[b] = block_first_absmax(x.ctypes.data + 128 * b) / np.float32(-8.0)
    half = float_to_half_bits(d)
    for b in range(nb):
        inv_d = np.float32(1.0) / d[b] if d[b] != 0 else np.float32(0.0)
        base = b * TYPE_SIZE
        out[base] = half[b] & 0xFF
        out[base + 1] = half[b] >> 8
        block_pack_nibbles(x.ctypes.data + 128 * b, np.float32(0.0), inv_d, np.float32(8.5),
                           out.ctypes.data + base + QS_OFFSET)


# The two halves of a block's quantization as LLVM vector code (numba leaves the scalar loops unvectorised):
# the same IEEE operations as ggml's scalar loop, value for value, so the bytes are the same.
_f32, _i32 = ir.FloatType(), ir.IntType(32)
_v32f, _v32i = ir.VectorType(_f32, 32), ir.VectorType(_i32, 32)


def _splat32(builder, value):
    vtype = ir.VectorType(value.type, 32)
    one = builder.insert_element(ir.Constant(vtype, ir.Undefined), value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(one, ir.Constant(vtype, ir.Undefined), ir.Constant(_v32i, [0] * 32))


@intrinsic
def block_first_absmax(typingctx, x_addr):
    """The first of the 32 float32 values at x_addr whose magnitude is the largest, ignoring NaN (0.0 when all
    are zero or NaN): what ggml's `if (fabsf(v) > amax) { amax = fabsf(v); max = v; }` keeps. Magnitudes are
    compared as integer bits, which order non-negative floats as their values."""
    sig = types.float32(types.intp)

    def codegen(context, builder, signature, args):
        addr = args[0]
        bits = builder.load(builder.inttoptr(addr, _v32i.as_pointer()), align=4)
        mag = builder.and_(bits, _splat32(builder, ir.Constant(_i32, 0x7FFFFFFF)))
        is_nan = builder.icmp_unsigned(">", mag, _splat32(builder, ir.Constant(_i32, 0x7F800000)))
        mag = builder.select(is_nan, ir.Constant(_v32i, [0] * 32), mag)
        umax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_i32, [_v32i]),
                                              "llvm.vector.reduce.umax.v32i32")
        amax = builder.call(umax, [mag])
        hits = builder.bitcast(builder.icmp_unsigned("==", mag, _splat32(builder, amax)), _i32)
        first = builder.cttz(hits, ir.Constant(ir.IntType(1), 0))
        value = builder.load(builder.gep(builder.inttoptr(addr, _f32.as_pointer()), [first]), align=4)
        return builder.select(builder.icmp_unsigned("!=", amax, ir.Constant(_i32, 0)), value, ir.Constant(_f32, 0.0))

    return sig, codegen


@intrinsic
def block_pack_nibbles(typingctx, x_addr, lo, inv_d, bias, out_addr):
    """16 bytes at out_addr from the 32 float32 values v at x_addr: q = min(int32((v - lo)·inv_d + bias), 15),
    byte j = q[j] | q[j + 16] << 4 (Q4_0 passes lo = 0, exact for every v; Q4_1 its block minimum)."""
    sig = types.none(types.intp, types.float32, types.float32, types.float32, types.intp)

    def codegen(context, builder, signature, args):
        x_addr, lo, inv_d, bias, out_addr = args
        v = builder.load(builder.inttoptr(x_addr, _v32f.as_pointer()), align=4)
        t = builder.fadd(builder.fmul(builder.fsub(v, _splat32(builder, lo)), _splat32(builder, inv_d)),
                         _splat32(builder, bias))
        q = builder.fptosi(t, _v32i)
        fifteen = _splat32(builder, ir.Constant(_i32, 15))
        q = builder.select(builder.icmp_signed("<", q, fifteen), q, fifteen)
        v16 = ir.VectorType(_i32, 16)
        low = builder.shuffle_vector(q, ir.Constant(_v32i, ir.Undefined), ir.Constant(v16, list(range(16))))
        high = builder.shuffle_vector(q, ir.Constant(_v32i, ir.Undefined), ir.Constant(v16, list(range(16, 32))))
        packed = builder.or_(low, builder.shl(high, ir.Constant(v16, [4] * 16)))
        out_type = ir.VectorType(ir.IntType(8), 16)
        builder.store(builder.trunc(packed, out_type), builder.inttoptr(out_addr, out_type.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True)
def scales(data):
    """Block scales d and minima m = -8·d of raw rows, float32[n_rows, n_blocks] each."""
    d = block_halves(data, TYPE_SIZE, 0)
    return d, np.float32(-8.0) * d


def prepare(data: np.ndarray, n_cols: int) -> tuple:
    """The raw rows (still the file's bytes), with the block scales widened to float32 where the portable kernels
    read them every token. The integer kernels (intmatvec.py) read the halves inside the blocks, so there the
    widened arrays are not kept (they would add 4 to 8 bytes per 18- or 20-byte block to the memory use, and to the
    bytes each token streams); prompt batches and the rare declined activation widen them per call (`scales`)."""
    return (data,) if intmatvec.ENABLED else (data, *scales(data))


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data = prepared[0]
    # (the integer kernel declines extreme x)
    if not (intmatvec.ENABLED and intmatvec.matvec_without_delta(INT_DRIVER, data, x, out)):
        d, m = prepared[1:] if len(prepared) > 1 else scales(data)
        simd.q4_matvec(data, d, m, QS_OFFSET, TYPE_SIZE, x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data = prepared[0]
    d, m = prepared[1:] if len(prepared) > 1 else scales(data)
    simd.q4_matmul(data, d, m, QS_OFFSET, TYPE_SIZE, x, out)
