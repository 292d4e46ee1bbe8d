"""W·X for a few columns X[j] (a batched decode step: one activation per sequence), any weight type, from compiled code.

Each column's outputs are those of dispatch.matvec for that column alone, bit for bit, LoRA delta included: the
integer kernels' types go through int_columns.matvec_columns, which reads each row once for all the columns; the others (and a column
the integer path declines) through dispatch.matvec, column by column (each reads the weight again; their kernels
have no batched form yet). Column j's run-time delta is row j of `lora`: the (address, rows, cols) of its A and of its
packed s·B, zeros for none (the rows of decode.LayerPlan.lora_table).
"""

import functools

import numpy as np
from numba import njit
from numba.extending import overload

from . import cache, dispatch, int_columns
from .dispatch import (INT_DRIVER, INT_Q4_0, INT_Q4_1, INT_Q4_K, INT_Q5_0, INT_Q6_K, INT_Q8_0, INTEGER_KERNELS,
                       Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0, byte_matrix, float_matrix)

NO_FLOATS = np.zeros((0, 0), dtype=np.float32)


def integer_columns(kinds, kind, data, X, out, lora, a_next, one_thread):
    """int_columns.matvec_columns for the weight's type, its driver id a constant; all False where the integer
    path does not run the type (an overload specialised to kinds, as dispatch.integer_matvec)."""


@overload(integer_columns, prefer_literal=True, jit_options={"nogil": True})
def _integer_columns(kinds, kind, data, X, out, lora, a_next, one_thread):
    if dispatch._any_type(kinds):  # one driver for all types, its type known at run time
        def any_type(kinds, kind, data, X, out, lora, a_next, one_thread):
            return int_columns.matvec_columns(INT_DRIVER[kind], data, X, out, lora, a_next, one_thread)

        return any_type
    on_q4_0, on_q4_1, on_q8_0, on_q5_0, on_q4_k, on_q6_k = dispatch._flags(dispatch._mask_of(kinds), Q4_0, Q4_1, Q8_0,
                                                                            Q5_0, Q4_K, Q6_K)

    def impl(kinds, kind, data, X, out, lora, a_next, one_thread):
        if kind == Q4_0:
            if on_q4_0:
                return int_columns.matvec_columns(INT_Q4_0, data, X, out, lora, a_next, one_thread)
        elif kind == Q4_1:
            if on_q4_1:
                return int_columns.matvec_columns(INT_Q4_1, data, X, out, lora, a_next, one_thread)
        elif kind == Q8_0:
            if on_q8_0:
                return int_columns.matvec_columns(INT_Q8_0, data, X, out, lora, a_next, one_thread)
        elif kind == Q5_0:
            if on_q5_0:
                return int_columns.matvec_columns(INT_Q5_0, data, X, out, lora, a_next, one_thread)
        elif kind == Q4_K:
            if on_q4_k:
                return int_columns.matvec_columns(INT_Q4_K, data, X, out, lora, a_next, one_thread)
        elif kind == Q6_K:
            if on_q6_k:
                return int_columns.matvec_columns(INT_Q6_K, data, X, out, lora, a_next, one_thread)
        return np.zeros(X.shape[0], dtype=np.bool_)

    return impl


@njit(nogil=True, cache=True)
def matvec_columns(kinds, kind, data, scale, minimum, widened, X, out, lora, a_next, one_thread):
    """out[j] = W·X[j] (+ column j's delta, lora[j]) for X float32[b, n_cols], out float32[b, n_rows]; W as
    dispatch.uniform_arrays gives it; kinds as dispatch.matvec takes it; a_next and one_thread as
    intmatvec.matvec takes them."""
    if INTEGER_KERNELS and INT_DRIVER[kind] >= 0:
        ok = integer_columns(kinds, kind, data, X, out, lora, a_next, one_thread)
    else:
        ok = np.zeros(X.shape[0], dtype=np.bool_)
    for j in range(X.shape[0]):
        if not ok[j]:
            e = lora[j]
            dispatch.matvec(kinds, kind, data, scale, minimum, widened, X[j], out[j], float_matrix(e[0], e[1], e[2]),
                            float_matrix(e[3], e[4], e[5]), a_next, one_thread)


@njit(nogil=True, cache=True)
def matvec_columns_entry(table, kinds, i, X, out, lora, a_next, one_thread):
    """matvec_columns for the weight in row i of a dispatch.weight_table whose kinds_mask is kinds (compiled code
    passes it as a literal; from Python, entry_for)."""
    e = table[i]
    matvec_columns(kinds, e[0], byte_matrix(e[1], e[2], e[3]), float_matrix(e[4], e[5], e[6]),
                   float_matrix(e[7], e[8], e[9]), float_matrix(e[10], e[11], e[12]), X, out, lora, a_next,
                   one_thread)


@functools.cache
def entry_for(kinds: int):
    """matvec_columns_entry for one kinds mask, callable from Python: (table, i, X, out, lora, a_next, one_thread);
    kinds is its closure constant, so it is compiled for those types alone and a call needs no literal dispatch."""

    @njit(nogil=True, cache=True)
    def entry(table, i, X, out, lora, a_next, one_thread):
        matvec_columns_entry(table, kinds, i, X, out, lora, a_next, one_thread)

    cache.follows(entry, cache.KERNEL_SOURCES)
    return entry


for _function in (matvec_columns, matvec_columns_entry):
    cache.follows(_function, cache.KERNEL_SOURCES)
