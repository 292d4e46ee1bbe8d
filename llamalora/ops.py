"""The per-token arithmetic of the llama layers, compiled: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Shared by the batch forward pass (llama.py) and the one-token step (decode.py), so both compute the same
values in the same order.
"""

import math

import numpy as np
from numba import njit, prange


def rope_tables(positions: np.ndarray, rope_dim: int, base: float, factors=None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin float32[len(positions), rope_dim // 2] of angle pos * base^(-2i/rope_dim) / factors[i].

    The frequencies are formed in float32 as transformers forms them, so that our angles match its angles.
    factors (rope_dim // 2 divisors, or None) stretch the wavelengths: linear RoPE scaling divides every
    frequency by its factor, llama 3's scaling (a GGUF's rope_freqs tensor) each by its own.
    """
    inv_freq = (1.0 / (np.float32(base) ** (np.arange(0, rope_dim, 2, dtype=np.float32) / np.float32(rope_dim)))).astype(
        np.float32
    )
    if factors is not None:
        inv_freq = (inv_freq / np.asarray(factors, dtype=np.float32)).astype(np.float32)
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@njit(cache=True, nogil=True)
def rope_inplace(x, cos, sin, neox=False):
    """Rotate feature pairs of every head of x float32[b, heads, head_dim] by angle i of row t: adjacent pairs
    (x[2i], x[2i+1]) in GGUF's llama layout, or with neox the halves (x[i], x[i + rope_dim/2]) as llama.cpp's
    LLAMA_ROPE_TYPE_NEOX (and transformers' rotate_half) pair them. Features past rope_dim stay as they are."""
    b, n_heads, _ = x.shape
    half = cos.shape[1]
    for t in range(b):
        for h in range(n_heads):
            for i in range(half):
                i0, i1 = (i, i + half) if neox else (2 * i, 2 * i + 1)
                x0 = x[t, h, i0]
                x1 = x[t, h, i1]
                c = cos[t, i]
                s = sin[t, i]
                x[t, h, i0] = x0 * c - x1 * s
                x[t, h, i1] = x0 * s + x1 * c


@njit(cache=True, nogil=True)
def rms_norm(x, weight, eps):
    b, n = x.shape
    out = np.empty_like(x)
    for t in range(b):
        acc = 0.0
        for j in range(n):
            acc += np.float64(x[t, j]) * x[t, j]
        scale = np.float32(1.0 / math.sqrt(acc / n + eps))
        for j in range(n):
            out[t, j] = weight[j] * (x[t, j] * scale)
    return out


@njit(cache=True, nogil=True)
def swiglu(gate, up):
    out = np.empty_like(gate)
    b, n = gate.shape
    for t in range(b):
        for j in range(n):
            g = gate[t, j]
            out[t, j] = g / (np.float32(1.0) + np.exp(-g)) * up[t, j]
    return out


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _dot(a, b):
    """a · b in float32, summed in whatever order vectorizes (a query-key score: head_dim products)."""
    s = np.float32(0.0)
    for d in range(a.shape[0]):
        s += a[d] * b[d]
    return s


@njit(cache=True, nogil=True, parallel=True)
def attention(q, k_cache, v_cache, n_past, out):
    """Causal grouped-query attention of b new queries over the cache (which already holds them).

    q, out: float32[b, n_head, head_dim]; k_cache, v_cache: float32[n_ctx, n_head_kv, head_dim].
    Query t sits at position n_past + t and sees keys 0..n_past + t.
    """
    b, n_head, head_dim = q.shape
    group = n_head // k_cache.shape[1]
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for task in prange(b * n_head):
        t = task // n_head
        h = task % n_head
        kv = h // group
        n_keys = n_past + t + 1
        scores = np.empty(n_keys, dtype=np.float32)
        best = -np.inf
        for j in range(n_keys):
            s = _dot(q[t, h], k_cache[j, kv]) * scale
            scores[j] = s
            best = max(best, s)
        total = np.float32(0.0)
        for j in range(n_keys):
            e = np.float32(math.exp(scores[j] - best))
            scores[j] = e
            total += e
        acc = np.zeros(head_dim, dtype=np.float32)
        for j in range(n_keys):
            w = scores[j] / total
            for d in range(head_dim):
                acc[d] += w * v_cache[j, kv, d]
        for d in range(head_dim):
            out[t, h, d] = acc[d]
