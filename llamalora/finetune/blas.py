"""C = alpha · A @ B + beta · C through numpy's own OpenBLAS (cblas_sgemm / cblas_dgemm), which numpy's matmul
cannot do: its products always write a fresh result, so every `y += s * (u @ b.T)` costs a temporary and two
more passes over memory. Where no OpenBLAS is found, numpy computes the same thing in those steps.
"""

import ctypes
import glob
import os

import numpy as np

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def openblas_library_paths() -> list:
    return glob.glob(os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "*openblas*"))


def _first_symbol(names: list):
    """(function, name) of the first of names the OpenBLAS numpy ships with exports, or (None, None)."""
    for path in openblas_library_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            function = getattr(lib, name, None)
            if function is not None:
                return function, name
    return None, None


def openblas_function(suffix: str):
    """A function of the OpenBLAS numpy ships with (openblas_<suffix> under its prefixed names), or None."""
    return _first_symbol([f"{prefix}{suffix}{tail}" for prefix in ("scipy_openblas_", "openblas_")
                          for tail in ("64_", "")])[0]


def _cblas_gemm(letter: str):
    """cblas_<letter>gemm with its argument types, or None. The "64_" names take 64-bit dimensions."""
    function, name = _first_symbol([f"{prefix}cblas_{letter}gemm{tail}" for prefix in ("scipy_", "")
                                    for tail in ("64_", "")])
    if function is None:
        return None
    real = ctypes.c_float if letter == "s" else ctypes.c_double
    index = ctypes.c_int64 if name.endswith("64_") else ctypes.c_int
    function.restype = None
    function.argtypes = [ctypes.c_int] * 3 + [index] * 3 + [real, ctypes.c_void_p, index, ctypes.c_void_p, index,
                                                              real, ctypes.c_void_p, index]
    return function


_GEMM = {}


def _gemm_function(dtype):
    if dtype not in _GEMM:
        function = _cblas_gemm("s" if dtype == np.float32 else "d") if dtype in (np.float32, np.float64) else None
        _GEMM[dtype] = function
        if function is not None and not _agrees_with_numpy(dtype):
            _GEMM[dtype] = None
    return _GEMM[dtype]


def _operand(m):
    """(transpose flag, leading dimension, array) for a 2-D operand BLAS can read in place."""
    item = m.itemsize
    if m.shape[1] == 1 or m.strides[1] == item:
        return _NO_TRANS, max(1, m.strides[0] // item if m.shape[0] > 1 else m.shape[1]), m
    if m.shape[0] == 1 or m.strides[0] == item:
        return _TRANS, max(1, m.strides[1] // item if m.shape[1] > 1 else m.shape[0]), m
    m = np.ascontiguousarray(m)
    return _NO_TRANS, max(1, m.shape[1]), m


def gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """c = alpha · a @ b + beta · c for 2-D arrays of one float dtype (c's rows contiguous; beta 0 ignores what
    c held); returns c."""
    m, k = a.shape
    n = b.shape[1]
    function = _gemm_function(c.dtype.type)
    if function is None or c.strides[1] != c.itemsize or m == 0 or n == 0:
        return _numpy_gemm(a, b, c, alpha, beta)
    if k == 0:
        c *= c.dtype.type(beta)
        return c
    trans_a, lda, a = _operand(a)
    trans_b, ldb, b = _operand(b)
    ldc = max(1, c.strides[0] // c.itemsize if m > 1 else n)
    function(_ROW_MAJOR, trans_a, trans_b, m, n, k, alpha, a.ctypes.data, lda, b.ctypes.data, ldb, beta,
             c.ctypes.data, ldc)
    return c


def _numpy_gemm(a, b, c, alpha, beta):
    if beta == 0.0:
        np.matmul(a, b, out=c)
        if alpha != 1.0:
            c *= c.dtype.type(alpha)
        return c
    product = a @ b
    if alpha != 1.0:
        product *= c.dtype.type(alpha)
    if beta != 1.0:
        c *= c.dtype.type(beta)
    c += product
    return c


def _agrees_with_numpy(dtype) -> bool:
    """A check product through the found function, transposed operands and a strided result included: a library
    that does not take the arguments as declared is not used."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 5)).astype(dtype)
    b = rng.standard_normal((3, 7)).astype(dtype)
    c = rng.standard_normal((9, 6)).astype(dtype)
    want = c.copy()
    want[1:6, 2:5] = 0.5 * (a[:, :5].T @ b.T) + 2.0 * want[1:6, 2:5]
    got = c.copy()
    gemm(a[:, :5].T, b.T, got[1:6, 2:5], 0.5, 2.0)
    return bool(np.allclose(got, want, rtol=1e-4, atol=1e-5))
