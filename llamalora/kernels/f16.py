"""F16 tensors, and the half-float bits that quantized blocks keep their scales in.

numba has no float16 arrays: half floats travel as uint16 bits and numpy converts them (exactly) to
float32 outside the jitted code.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

BLOCK_SIZE = 1
TYPE_SIZE = 2


def half_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """float32 values of little-endian half floats stored as byte pairs (..., 2) uint8."""
    return np.ascontiguousarray(bits).view(np.float16)[..., 0].astype(np.float32)


def float_to_half_bytes(x: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 bytes of x rounded to half floats (round to nearest even, as ggml does)."""
    return x.astype(np.float16)[..., None].view(np.uint8)


@njit(nogil=True, cache=True)
def float_to_half_bits(x):
    """uint16 half-float bits of float32 x, rounded to nearest even as numpy and ggml round.

    Normal results round by adding a bias to the float's bits (ties go to the even mantissa);
    subnormal ones are |x|·2^24 rounded to an integer, which float32 holds exactly.
    """
    bits = np.empty(x.shape[0], dtype=np.uint16)
    raw = x.view(np.uint32)
    for i in range(x.shape[0]):
        u = raw[i]
        sign = (u >> 16) & 0x8000
        a = u & 0x7FFFFFFF
        if a >= 0x47800000:  # overflows to infinity, or is infinity / NaN
            h = 0x7E00 if a > 0x7F800000 else 0x7C00
        elif a < 0x38800000:  # half subnormal or zero
            h = np.int64(np.rint(abs(x[i]) * np.float32(16777216.0)))
        else:
            h = (a + np.uint32(0xC8000FFF) + ((a >> 13) & 1)) >> 13
        bits[i] = np.uint16(sign | (h & 0xFFFF))
    return bits


def dequantize(data: np.ndarray, n_cols: int, out: np.ndarray | None = None) -> np.ndarray:
    if out is None:
        out = np.empty((data.shape[0], n_cols), dtype=np.float32)
    half_rows_to_float(np.ascontiguousarray(data).view(np.uint16).reshape(data.shape[0], n_cols), HALF_TO_FLOAT, out)
    return out


# float32 value of every half-float bit pattern (numpy converts exactly, once): the tail of a row that is
# not a whole number of vectors is looked up here
HALF_TO_FLOAT = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@intrinsic
def widen_halves(typingctx, src_addr, dst_addr, n):
    """Widen n // 8 groups of 8 half floats at src_addr to float32 at dst_addr (LLVM's fpext: one
    vcvtph2ps per 8 values where the CPU has F16C, exact in any case)."""
    sig = types.none(types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        src_addr, dst_addr, n = args
        half8, float8 = ir.VectorType(ir.HalfType(), 8), ir.VectorType(ir.FloatType(), 8)
        src = builder.inttoptr(src_addr, half8.as_pointer())
        dst = builder.inttoptr(dst_addr, float8.as_pointer())
        with cgutils.for_range(builder, builder.udiv(n, ir.Constant(n.type, 8))) as loop:
            value = builder.load(builder.gep(src, [loop.index]), align=2)
            builder.store(builder.fpext(value, float8), builder.gep(dst, [loop.index]), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(parallel=True, nogil=True, cache=True)
def half_rows_to_float(bits, table, out):
    n = bits.shape[1]
    whole = n - n % 8
    for r in prange(bits.shape[0]):
        widen_halves(bits.ctypes.data + r * bits.strides[0], out.ctypes.data + r * out.strides[0], n)
        for j in range(whole, n):
            out[r, j] = table[bits[r, j]]


def quantize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(x.shape[0], -1)
