"""W·x for a weight of any type from compiled code: the type as an integer, its arrays in one uniform form.

Compiled callers (the one-token decode step) hold many weights of different types side by side. numba's typed
lists would do, but building them compiles their methods in every new process (about a second), so weights
are rows of an int64 table instead (`weight_table`): the arrays' addresses and shapes, turned back into
arrays inside compiled code (`matvec_entry`). The caller keeps the arrays alive (the table's `keep`).
Every weight is described by the same five things (`uniform_arrays`):

    kind     the ggml type id
    data     uint8[n_rows, row_nbytes]: the raw rows (an empty array for F32, widened at load)
    scale    float32[n_rows, n_scales]: the type's widened block scales (empty where the type has none)
    minimum  float32[n_rows, n_scales]: its minima (what the type's prepare passes; empty where it has none)
    dense    float32[n_rows, n_cols]: F32 weights (empty for the other types)

`matvec` branches on kind and calls the type's own kernel, so the kernels stay those of the type modules.
"""

import os

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from numba import carray, njit, types
from numba.extending import intrinsic, overload

from . import (bf16, cache, dense, f16, intmatvec, iq4_nl, low_rank, q2_k, q3_k, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k,
               q6_k, q8_0, simd)

# A compile-time constant: numba prunes the untaken branch, so the integer kernels are compiled only for targets
# that run them (and LLAMALORA_KERNELS=portable takes them out); cache.follows keys the cache on it.
INTEGER_KERNELS = intmatvec.ENABLED

F32, F16, BF16 = int(GGMLType.F32), int(GGMLType.F16), int(GGMLType.BF16)
Q4_0, Q4_1, Q8_0 = int(GGMLType.Q4_0), int(GGMLType.Q4_1), int(GGMLType.Q8_0)
Q5_0, Q5_1, IQ4_NL = int(GGMLType.Q5_0), int(GGMLType.Q5_1), int(GGMLType.IQ4_NL)
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = (int(GGMLType.Q2_K), int(GGMLType.Q3_K), int(GGMLType.Q4_K), int(GGMLType.Q5_K),
                                int(GGMLType.Q6_K))
# Types whose prepared arrays are (data, scale, minimum) read by the type module's compiled `_matvec`
SCALED_BLOCKS = {Q2_K: q2_k, Q3_K: q3_k, Q4_K: q4_k, Q5_K: q5_k, Q6_K: q6_k, Q5_0: q5_0, Q5_1: q5_1, IQ4_NL: iq4_nl}

NO_BYTES = np.empty((0, 0), dtype=np.uint8)
NO_FLOATS = np.empty((0, 0), dtype=np.float32)


def uniform_arrays(weight) -> tuple:
    """(kind, data, scale, minimum, dense) of a kernels.Weight, every array C-contiguous (no copy for the
    prepared arrays, which already are)."""
    kind, prepared = int(weight.type), weight.prepared
    if kind == F32:
        arrays = (NO_BYTES, NO_FLOATS, NO_FLOATS, prepared[0])
    elif kind in (F16, BF16):
        arrays = (prepared[0].view(np.uint8), NO_FLOATS, NO_FLOATS, NO_FLOATS)
    elif kind in (Q4_0, Q4_1, Q8_0, Q5_0, Q4_K, Q6_K) and len(prepared) == 1:  # scales read in the blocks (intmatvec)
        arrays = (prepared[0], NO_FLOATS, NO_FLOATS, NO_FLOATS)
    elif kind == Q8_0:
        arrays = (prepared[0], prepared[1], NO_FLOATS, NO_FLOATS)
    elif kind in (Q4_0, Q4_1) or kind in SCALED_BLOCKS:
        arrays = (prepared[0], prepared[1], prepared[2], NO_FLOATS)
    else:
        raise ValueError(f"no compiled matvec for {weight.type.name}")
    data, scale, minimum, widened = (np.ascontiguousarray(a) for a in arrays)
    return kind, data, scale, minimum, widened


# intmatvec.matvec's id of each type it runs, as globals (compiled code takes a global, not a module's attribute,
# as the literal the driver is compiled for)
INT_Q4_0, INT_Q4_1, INT_Q8_0 = intmatvec.Q4_0, intmatvec.Q4_1, intmatvec.Q8_0
INT_Q5_0, INT_Q4_K, INT_Q6_K = intmatvec.Q5_0, intmatvec.Q4_K, intmatvec.Q6_K
# intmatvec.matvec's id for each ggml type it runs, -1 for the others (a constant array in compiled code)
INT_DRIVER = np.full(max(t.value for t in GGMLType) + 1, -1, dtype=np.int64)
for _kind, _driver in ((Q4_0, intmatvec.Q4_0), (Q4_1, intmatvec.Q4_1), (Q8_0, intmatvec.Q8_0), (Q5_0, intmatvec.Q5_0),
                       (Q4_K, intmatvec.Q4_K), (Q6_K, intmatvec.Q6_K)):
    INT_DRIVER[_kind] = _driver


def kind_bit(kind: int) -> int:
    return 1 << kind


ALL_KINDS = sum(kind_bit(t.value) for t in GGMLType)  # a kinds mask that compiles every type's branch


def kinds_mask(weights) -> int:
    """The kinds argument for weights (kernels.Weight objects): a bit per ggml type among them; ALL_KINDS under
    LLAMALORA_KERNEL_TYPES=all, for a process that loads models of many types (the test suite): one compiled step
    for every type, each type's integer kernel behind a switch, rather than a step per set of types."""
    if os.environ.get("LLAMALORA_KERNEL_TYPES", "model") == "all":
        return ALL_KINDS
    mask = 0
    for weight in weights:
        mask |= kind_bit(int(weight.type))
    return mask


def _mask_of(kinds) -> int:
    """The mask an overload is specialised to: a literal kinds' value, every type for a kinds known only at run
    time."""
    return kinds.literal_value if isinstance(kinds, types.IntegerLiteral) else ALL_KINDS


def _any_type(kinds) -> bool:
    """Whether the integer kernels are called for any type, the driver id known at run time (one compiled
    driver with a switch over the types): for a kinds known only at run time, and for ALL_KINDS."""
    return _mask_of(kinds) == ALL_KINDS


def _flags(mask, *kinds) -> tuple:
    return tuple(bool(mask & kind_bit(k)) for k in kinds)


# The three functions below are overloads specialised to a kinds mask: each type's branch is guarded by a flag of
# the specialisation (a closure constant, which numba's branch pruning removes before typing when it is False), so
# that a model's step compiles the kernels of its own types only (a first run on SmolLM2's Q4_1 compiled every
# type's kernels: 114 s on an AMD EPYC). Called from compiled code with a literal kinds (matvec_entry and the
# decode steps make it one); a kinds known only at run time compiles every branch.
def widened_scales(kinds, kind, data):
    """(scale, minimum) of raw rows as the portable kernels read them, from the type module's `scales` (Q8_0's
    scales serve as its unused minima); kind one of the integer kernels' types in the kinds mask."""


@overload(widened_scales, prefer_literal=True, jit_options={"nogil": True})
def _widened_scales(kinds, kind, data):
    on_q4_0, on_q4_1, on_q8_0, on_q5_0, on_q4_k, on_q6_k = _flags(_mask_of(kinds), Q4_0, Q4_1, Q8_0, Q5_0, Q4_K, Q6_K)

    def impl(kinds, kind, data):
        if kind == Q4_0:
            if on_q4_0:
                return q4_0.scales(data)
        elif kind == Q4_1:
            if on_q4_1:
                return q4_1.scales(data)
        elif kind == Q8_0:
            if on_q8_0:
                d = q8_0.scales(data)[0]
                return d, d
        elif kind == Q5_0:
            if on_q5_0:
                return q5_0.scales(data)
        elif kind == Q4_K:
            if on_q4_k:
                return q4_k.scales(data)
        elif kind == Q6_K:
            if on_q6_k:
                return q6_k.scales(data)
        if kind >= 0:  # (always; the return below types the result where the kinds have no branch here)
            raise ValueError("no block scales for this weight type")
        return NO_FLOATS, NO_FLOATS

    return impl


def integer_matvec(kinds, kind, data, x, out, a, packed_b, a_next, one_thread):
    """intmatvec.matvec for the weight's type, its driver id a constant (so each type's kernel is compiled for
    that type alone); False where the integer path does not run the type or declines x."""


@overload(integer_matvec, prefer_literal=True, jit_options={"nogil": True})
def _integer_matvec(kinds, kind, data, x, out, a, packed_b, a_next, one_thread):
    if _any_type(kinds):  # one driver for all types, its type known at run time
        def any_type(kinds, kind, data, x, out, a, packed_b, a_next, one_thread):
            return intmatvec.matvec(INT_DRIVER[kind], data, x, out, a, packed_b, a_next, one_thread)

        return any_type
    on_q4_0, on_q4_1, on_q8_0, on_q5_0, on_q4_k, on_q6_k = _flags(_mask_of(kinds), Q4_0, Q4_1, Q8_0, Q5_0, Q4_K, Q6_K)

    def impl(kinds, kind, data, x, out, a, packed_b, a_next, one_thread):
        if kind == Q4_0:
            if on_q4_0:
                return intmatvec.matvec(INT_Q4_0, data, x, out, a, packed_b, a_next, one_thread)
        elif kind == Q4_1:
            if on_q4_1:
                return intmatvec.matvec(INT_Q4_1, data, x, out, a, packed_b, a_next, one_thread)
        elif kind == Q8_0:
            if on_q8_0:
                return intmatvec.matvec(INT_Q8_0, data, x, out, a, packed_b, a_next, one_thread)
        elif kind == Q5_0:
            if on_q5_0:
                return intmatvec.matvec(INT_Q5_0, data, x, out, a, packed_b, a_next, one_thread)
        elif kind == Q4_K:
            if on_q4_k:
                return intmatvec.matvec(INT_Q4_K, data, x, out, a, packed_b, a_next, one_thread)
        elif kind == Q6_K:
            if on_q6_k:
                return intmatvec.matvec(INT_Q6_K, data, x, out, a, packed_b, a_next, one_thread)
        return False

    return impl


def portable_matvec(kinds, kind, data, scale, minimum, widened, x, out):
    """out = W·x by the type module's own kernel; False for a type outside the kinds mask."""


@overload(portable_matvec, prefer_literal=True, jit_options={"nogil": True})
def _portable_matvec(kinds, kind, data, scale, minimum, widened, x, out):
    (on_q4_1, on_q4_0, on_q8_0, on_f32, on_f16, on_q4_k, on_q6_k, on_q5_k, on_q3_k, on_q2_k, on_q5_0, on_q5_1,
     on_iq4_nl, on_bf16) = _flags(_mask_of(kinds), Q4_1, Q4_0, Q8_0, F32, F16, Q4_K, Q6_K, Q5_K, Q3_K, Q2_K, Q5_0,
                                  Q5_1, IQ4_NL, BF16)

    def impl(kinds, kind, data, scale, minimum, widened, x, out):
        if kind == Q4_1:
            if on_q4_1:
                simd.q4_matvec(data, scale, minimum, q4_1.QS_OFFSET, q4_1.TYPE_SIZE, x, out)
                return True
        elif kind == Q4_0:
            if on_q4_0:
                simd.q4_matvec(data, scale, minimum, q4_0.QS_OFFSET, q4_0.TYPE_SIZE, x, out)
                return True
        elif kind == Q8_0:
            if on_q8_0:
                simd.q8_matvec(data, scale, x, out)
                return True
        elif kind == F32:
            if on_f32:
                dense.matvec(widened, x, out)
                return True
        elif kind == F16:
            if on_f16:
                f16._matvec(data.view(np.uint16), x, out)
                return True
        elif kind == Q4_K:
            if on_q4_k:
                q4_k._matvec(data, scale, minimum, x, out)
                return True
        elif kind == Q6_K:
            if on_q6_k:
                q6_k._matvec(data, scale, minimum, x, out)
                return True
        elif kind == Q5_K:
            if on_q5_k:
                q5_k._matvec(data, scale, minimum, x, out)
                return True
        elif kind == Q3_K:
            if on_q3_k:
                q3_k._matvec(data, scale, minimum, x, out)
                return True
        elif kind == Q2_K:
            if on_q2_k:
                q2_k._matvec(data, scale, minimum, x, out)
                return True
        elif kind == Q5_0:
            if on_q5_0:
                q5_0._matvec(data, scale, minimum, x, out)
                return True
        elif kind == Q5_1:
            if on_q5_1:
                q5_1._matvec(data, scale, minimum, x, out)
                return True
        elif kind == IQ4_NL:
            if on_iq4_nl:
                iq4_nl._matvec(data, scale, minimum, x, out)
                return True
        elif kind == BF16:
            if on_bf16:
                bf16._matvec(data.view(np.uint16), x, out)
                return True
        return False

    return impl


@njit(nogil=True, cache=True)
def matvec(kinds, kind, data, scale, minimum, widened, x, out, a, packed_b, a_next, one_thread):
    """out float32[n_rows] = W · x (+ s·B·(a·x) when a has rows: a run-time LoRA delta, packed_b =
    low_rank.pack_scaled_b(s·B)), W given as uniform_arrays gives it; a_next and one_thread as intmatvec.matvec
    takes them. kinds: a mask of the types the caller may pass (kinds_mask; ALL_KINDS for any), compiled for its
    value where it is a literal, so that only those types' kernels are compiled."""
    if INTEGER_KERNELS and INT_DRIVER[kind] >= 0:
        if integer_matvec(kinds, kind, data, x, out, a, packed_b, a_next, one_thread):  # the delta inside the row loop
            return
        # the integer kernel declined an extreme activation: the portable kernel needs the block scales, widened
        # here when the weight does not keep them (see the type modules' prepare)
        if scale.shape[0] == 0:
            scale, minimum = widened_scales(kinds, kind, data)
    if not portable_matvec(kinds, kind, data, scale, minimum, widened, x, out):
        raise ValueError("no compiled matvec for this weight type")
    if a.shape[0]:
        low_rank.add_low_rank_matvec(a, packed_b, x, out)


# --- weights and float matrices by address ----------------------------------------------------------------

ENTRY_FIELDS = 13  # kind, then (address, rows, cols) of data, scale, minimum, dense


def matrix_entry(a: np.ndarray) -> list[int]:
    """(address, rows, cols) of a C-contiguous 2-D array (a 1-D one counts as one row)."""
    if not a.flags.c_contiguous:
        raise ValueError("table arrays must be C-contiguous")
    rows, cols = (1, a.shape[0]) if a.ndim == 1 else a.shape
    return [a.ctypes.data, rows, cols]


def weight_table(weights) -> tuple[np.ndarray, list]:
    """int64[len(weights), ENTRY_FIELDS] describing kernels.Weight objects for matvec_entry, and the arrays
    it points into (they must outlive every use of the table)."""
    table = np.zeros((len(weights), ENTRY_FIELDS), dtype=np.int64)
    keep = []
    for i, weight in enumerate(weights):
        kind, *arrays = uniform_arrays(weight)
        table[i, 0] = kind
        for j, a in enumerate(arrays):
            table[i, 1 + 3 * j:4 + 3 * j] = matrix_entry(a)
        keep += arrays
    return table, keep


@intrinsic
def _pointer(typingctx, address, dtype):
    """A typed pointer to `address` (intp), element type the numba type `dtype`."""
    target = dtype.dtype if isinstance(dtype, types.DTypeSpec) else dtype.key
    sig = types.CPointer(target)(types.intp, dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@njit(nogil=True, cache=True)
def float_matrix(address, rows, cols):
    """The float32[rows, cols] C array at address (no copy, no ownership)."""
    return carray(_pointer(address, np.float32), (rows, cols))


@njit(nogil=True, cache=True)
def byte_matrix(address, rows, cols):
    return carray(_pointer(address, np.uint8), (rows, cols))


@njit(nogil=True, cache=True)
def matvec_entry(table, kinds, i, x, out, a, packed_b, a_next, one_thread):
    """out = W · x (+ s·B·(a·x), see matvec) for the weight in row i of a weight_table; kinds: the table's
    kinds_mask (a literal from compiled callers: their types' kernels alone; from Python every type's)."""
    e = table[i]
    matvec(kinds, e[0], byte_matrix(e[1], e[2], e[3]), float_matrix(e[4], e[5], e[6]), float_matrix(e[7], e[8], e[9]),
           float_matrix(e[10], e[11], e[12]), x, out, a, packed_b, a_next, one_thread)


for _function in (matvec, matvec_entry):
    cache.follows(_function, cache.KERNEL_SOURCES)
