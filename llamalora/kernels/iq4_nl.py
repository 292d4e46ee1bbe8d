"""IQ4_NL: blocks of 32 weights in 18 bytes: half-float scale d, then 16 bytes of 4-bit indices into a
fixed non-linear table of 16 values; weight = d · KVALUES[q].

Byte j holds weight j's index in its low nibble and weight j + 16's in its high nibble (as Q4_0).
"""

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from llvmlite import ir
from numba import njit, prange

from . import blockdot
from .blockdot import bits
from .f16 import half_bits_to_float
from .kquants_ref import GROUP_MAX_EPS, put_half

BLOCK_SIZE = 32
TYPE_SIZE = 18
QS_OFFSET = 2
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)

_TABLE_TYPE = ir.ArrayType(ir.FloatType(), 16)


def _table(module):
    """The 16 values as a float32 constant array in the LLVM module."""
    name = "iq4_nl_kvalues"
    if name in module.globals:
        return module.globals[name]
    table = ir.GlobalVariable(module, _TABLE_TYPE, name)
    table.initializer = ir.Constant(_TABLE_TYPE, [float(v) for v in KVALUES])
    table.global_constant = True
    table.linkage = "internal"
    return table


def _lookup(builder, table, index):
    """<8 x float> of table[index[lane]] (eight scalar loads: ggml's table has no vector form here)."""
    out = ir.Constant(blockdot._vf, ir.Undefined)
    i32 = ir.IntType(32)
    for lane in range(blockdot.LANES):
        i = builder.extract_element(index, ir.Constant(i32, lane))
        value = builder.load(builder.gep(table, [ir.Constant(i32, 0), i]), align=4)
        out = builder.insert_element(out, value, ir.Constant(i32, lane))
    return out


def _decode(block, k, biased):
    """Weights 8k..8k+7: table values of nibble k // 2 of bytes 8·(k % 2).."""
    v = block.bytes(QS_OFFSET + 8 * (k % 2))
    return _lookup(block.builder, _table(block.builder.module), bits(block.builder, v, 4 * (k // 2), 0x0F))


KIND = int(GGMLType.IQ4_NL)
blockdot.register(KIND, _decode, TYPE_SIZE, BLOCK_SIZE, BLOCK_SIZE, False)


@njit(nogil=True, cache=True)
def _matvec(data, scale, minimum, x, out):
    blockdot.matvec(KIND, data, scale, minimum, x, out)


@njit(nogil=True, cache=True)
def _matmul(data, scale, minimum, x, out):
    blockdot.matmul(KIND, data, scale, minimum, x, out)


@njit(nogil=True, cache=True)
def _dequantize_rows(data, scale, minimum, out):
    blockdot.dequantize_rows(KIND, data, scale, minimum, out)


def prepare(data: np.ndarray, n_cols: int) -> tuple:
    """The raw rows and the block scales widened to float32 (also passed as the unused minima)."""
    blocks = data.reshape(data.shape[0], -1, TYPE_SIZE)
    d = np.ascontiguousarray(half_bits_to_float(blocks[:, :, 0:2]))
    return data, d, d


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    return blockdot.dequantize_prepared(_dequantize_rows, prepare(np.ascontiguousarray(data), n_cols), n_cols)


def quantize(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_iq4_nl without importance weights (what llama-quantize writes: 7 scale tries
    either side of the first guess)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1] // BLOCK_SIZE * TYPE_SIZE), dtype=np.uint8)
    quantize_rows(x, out, KVALUES.astype(np.float32), 7)
    return out


@njit(nogil=True, cache=True)
def best_index(values, x):
    """ggml's best_index_int8: the index of the table value nearest x (ties to the upper one)."""
    if x <= values[0]:
        return 0
    if x >= values[15]:
        return 15
    lo, hi = 0, 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x < values[mid]:
            hi = mid
        else:
            lo = mid
    return hi - 1 if np.float32(x - values[hi - 1]) < np.float32(values[hi] - x) else hi


@njit(parallel=True, nogil=True, cache=True)
def quantize_rows(x, out, values, ntry):
    """ggml's quantize_row_iq4_nl_impl for blocks of 32 with no importance weights (weights x²)."""
    for r in prange(x.shape[0]):
        L = np.zeros(32, dtype=np.int64)
        for b in range(x.shape[1] // 32):
            xb = x[r, b * 32:(b + 1) * 32]
            pos = b * TYPE_SIZE
            amax = np.float32(0.0)
            vmax = np.float32(0.0)
            for j in range(32):
                if abs(xb[j]) > amax:
                    amax = abs(xb[j])
                    vmax = xb[j]
            d = np.float32(0.0)
            if amax >= GROUP_MAX_EPS:
                d = np.float32(-vmax / values[0]) if ntry > 0 else np.float32(vmax / values[0])
                inv = np.float32(np.float32(1.0) / d)
                sumqx = np.float32(0.0)
                sumq2 = np.float32(0.0)
                for j in range(32):
                    l = best_index(values, np.float32(inv * xb[j]))
                    L[j] = l
                    w = np.float32(xb[j] * xb[j])
                    wq = np.float32(w * values[l])
                    sumqx = np.float32(sumqx + np.float32(wq * xb[j]))
                    sumq2 = np.float32(sumq2 + np.float32(wq * values[l]))
                d = np.float32(sumqx / sumq2) if sumq2 > 0 else np.float32(0.0)
                best = np.float32(d * sumqx)
                for itry in range(-ntry, ntry + 1):
                    inv = np.float32(np.float32(np.float32(itry) + values[0]) / vmax)
                    sumqx = np.float32(0.0)
                    sumq2 = np.float32(0.0)
                    for j in range(32):
                        l = best_index(values, np.float32(inv * xb[j]))
                        w = np.float32(xb[j] * xb[j])
                        wq = np.float32(w * values[l])
                        sumqx = np.float32(sumqx + np.float32(wq * xb[j]))
                        sumq2 = np.float32(sumq2 + np.float32(wq * values[l]))
                    if sumq2 > 0 and np.float32(sumqx * sumqx) > np.float32(best * sumq2):
                        d = np.float32(sumqx / sumq2)
                        best = np.float32(d * sumqx)
            put_half(out, r, pos, d)
            if ntry > 0:
                inv = np.float32(np.float32(1.0) / d) if d != 0 else np.float32(0.0)
                for j in range(32):
                    L[j] = best_index(values, np.float32(inv * xb[j]))
            for j in range(16):
                out[r, pos + QS_OFFSET + j] = L[j] | (L[16 + j] << 4)


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matvec(*prepared, x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matmul(*prepared, x, out)
