"""W·X for a few columns X[j] (a batched decode step: one activation per sequence), any weight type, from compiled code.

Each column's outputs are those of dispatch.matvec for that column alone, bit for bit, LoRA delta included: the
integer kernels' types go through int_columns.matvec_columns, which reads each row once for all the columns; the others (and a column
the integer path declines) through dispatch.matvec, column by column (each reads the weight again; their kernels
have no batched form yet). Column j's run-time delta is row j of `lora`: the (address, rows, cols) of its A and of its
packed s·B, zeros for none (the rows of decode.LayerPlan.lora_table).
"""

import numpy as np
from numba import njit

from . import cache, dispatch, int_columns
from .dispatch import INT_DRIVER, INTEGER_KERNELS, byte_matrix, float_matrix

NO_FLOATS = np.zeros((0, 0), dtype=np.float32)


@njit(nogil=True, cache=True)
def matvec_columns(kind, data, scale, minimum, widened, X, out, lora, a_next, one_thread):
    """out[j] = W·X[j] (+ column j's delta, lora[j]) for X float32[b, n_cols], out float32[b, n_rows]; W as
    dispatch.uniform_arrays gives it; a_next and one_thread as intmatvec.matvec takes them."""
    if INTEGER_KERNELS and INT_DRIVER[kind] >= 0:
        ok = int_columns.matvec_columns(INT_DRIVER[kind], data, X, out, lora, a_next, one_thread)
    else:
        ok = np.zeros(X.shape[0], dtype=np.bool_)
    for j in range(X.shape[0]):
        if not ok[j]:
            e = lora[j]
            dispatch.matvec(kind, data, scale, minimum, widened, X[j], out[j], float_matrix(e[0], e[1], e[2]),
                            float_matrix(e[3], e[4], e[5]), a_next, one_thread)


@njit(nogil=True, cache=True)
def matvec_columns_entry(table, i, X, out, lora, a_next, one_thread):
    """matvec_columns for the weight in row i of a dispatch.weight_table."""
    e = table[i]
    matvec_columns(e[0], byte_matrix(e[1], e[2], e[3]), float_matrix(e[4], e[5], e[6]), float_matrix(e[7], e[8], e[9]),
                   float_matrix(e[10], e[11], e[12]), X, out, lora, a_next, one_thread)


for _function in (matvec_columns, matvec_columns_entry):
    cache.follows(_function, cache.KERNEL_SOURCES)
