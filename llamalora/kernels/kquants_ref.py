"""ggml's reference K-quant quantizers (quantize_row_q{2,3,4,5,6}_K_ref in ggml-quants.c), operation for
operation in float32: what llama-quantize writes when it has no importance matrix.

The gguf package has no K-quant quantizer, so these follow the C source: the same search for sub-block
scales (make_qx_quants, make_q3_quants, make_qkx2_quants), the same float32 expressions in the same order
(no fused multiply-adds), nearest_int's rounding trick and half-float rounding to nearest even.
Every function works on one row of float32 x and writes its blocks' bytes to one row of out.
"""

import math

import numpy as np
from numba import njit, prange

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
F0 = np.float32(0.0)


@njit(nogil=True, cache=True)
def nearest_int(f):
    """ggml's nearest_int: the low mantissa bits of f + 1.5·2^23 (round half to even for |f| < 2^22)."""
    v = np.float32(f + np.float32(12582912.0))
    if v == 0 or not math.isfinite(v):
        return -0x400000
    m, e = math.frexp(abs(v))  # |v| = m·2^e, 0.5 <= m < 1: the mantissa field is (2m − 1)·2^23
    mantissa = np.int64((2.0 * m - 1.0) * 8388608.0) if e > -125 else np.int64(m * 2.0 ** (e + 149))
    return np.int64(mantissa & 0x7FFFFF) - 0x400000


@njit(nogil=True, cache=True)
def half_round(x):
    """(uint16 bits, float32 value) of float32 x rounded to a half float, nearest even (GGML_FP32_TO_FP16)."""
    x = np.float32(x)
    sign = 0x8000 if x < 0 or (x == 0 and math.copysign(1.0, x) < 0) else 0
    a = abs(np.float64(x))
    if a != a:
        return np.uint16(0x7E00), np.float32(np.nan)
    if a < 6.103515625e-05:  # half subnormal (or zero): units of 2^-24
        units = np.float64(np.rint(a * 16777216.0))
        value = units / 16777216.0
        bits = np.int64(units)
    else:
        m, e = math.frexp(a)  # a = m·2^e; the half's 11-bit significand is a·2^(11−e)
        significand = np.rint(a * 2.0 ** (11 - e))
        value = significand * 2.0 ** (e - 11)
        if value >= 65520.0 or e > 16:
            return np.uint16(sign | 0x7C00), np.float32(-np.inf if sign else np.inf)
        bits = ((e - 1 + 15) << 10) + np.int64(significand) - 1024
    return np.uint16(sign | bits), np.float32(-value if sign else value)


@njit(nogil=True, cache=True)
def put_half(out, r, pos, x):
    """Store x as a little-endian half at out[r, pos:pos+2]; return the half's float32 value."""
    bits, value = half_round(x)
    out[r, pos] = bits & 0xFF
    out[r, pos + 1] = bits >> 8
    return value


# --- the scale searches -------------------------------------------------------------------------------------

@njit(nogil=True, cache=True)
def make_qx_quants(n, nmax, x, L):
    """ggml's make_qx_quants with rmse_type 1 and no importance weights (weights x²): L = q + nmax."""
    fmax = F0
    amax = F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            fmax = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    fn = np.float32(nmax)
    iscale = np.float32(-fn / fmax)
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(np.float32(iscale * x[i]))))
        L[i] = l + nmax
        w = np.float32(x[i] * x[i])
        fl = np.float32(l)
        sumlx = np.float32(sumlx + np.float32(np.float32(w * x[i]) * fl))
        suml2 = np.float32(suml2 + np.float32(np.float32(w * fl) * fl))
    scale = np.float32(sumlx / suml2) if suml2 != 0 else F0
    best = np.float32(scale * sumlx)
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = np.float32(-np.float32(fn + np.float32(np.float32(0.1) * np.float32(step))) / fmax)
        sumlx = F0
        suml2 = F0
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nearest_int(np.float32(iscale * x[i]))))
            w = np.float32(x[i] * x[i])
            fl = np.float32(l)
            sumlx = np.float32(sumlx + np.float32(np.float32(w * x[i]) * fl))
            suml2 = np.float32(suml2 + np.float32(np.float32(w * fl) * fl))
        if suml2 > 0 and np.float32(sumlx * sumlx) > np.float32(best * suml2):
            for i in range(n):
                l = nearest_int(np.float32(iscale * x[i]))
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = np.float32(sumlx / suml2)
            best = np.float32(scale * sumlx)
    return scale


@njit(nogil=True, cache=True)
def make_q3_quants(n, nmax, x, L):
    """ggml's make_q3_quants with do_rmse: L = q + nmax."""
    fmax = F0
    amax = F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            fmax = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    iscale = np.float32(-np.float32(nmax) / fmax)
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(np.float32(iscale * x[i]))))
        L[i] = l
        w = np.float32(x[i] * x[i])
        sumlx = np.float32(sumlx + np.float32(np.float32(w * x[i]) * np.float32(l)))
        suml2 = np.float32(suml2 + np.float32(np.float32(w * np.float32(l)) * np.float32(l)))
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = np.float32(x[i] * x[i])
            fl = np.float32(L[i])
            slx = np.float32(sumlx - np.float32(np.float32(w * x[i]) * fl))
            if slx > 0:
                sl2 = np.float32(suml2 - np.float32(np.float32(w * fl) * fl))
                new_l = nearest_int(np.float32(np.float32(x[i] * sl2) / slx))
                new_l = max(-nmax, min(nmax - 1, new_l))
                if new_l != L[i]:
                    fnew = np.float32(new_l)
                    slx = np.float32(slx + np.float32(np.float32(w * x[i]) * fnew))
                    sl2 = np.float32(sl2 + np.float32(np.float32(w * fnew) * fnew))
                    if sl2 > 0 and np.float32(np.float32(slx * slx) * suml2) > np.float32(np.float32(sumlx * sumlx) * sl2):
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return np.float32(sumlx / suml2) if suml2 > 0 else F0


@njit(nogil=True, cache=True)
def make_qkx2_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """ggml's make_qkx2_quants: (scale, −min) of the weighted best fit x ≈ scale·L + min, L in 0..nmax."""
    fmin = x[0]
    fmax = x[0]
    sum_w = weights[0]
    sum_x = np.float32(sum_w * x[0])
    for i in range(1, n):
        if x[i] < fmin:
            fmin = x[i]
        if x[i] > fmax:
            fmax = x[i]
        w = weights[i]
        sum_w = np.float32(sum_w + w)
        sum_x = np.float32(sum_x + np.float32(w * x[i]))
    if fmin > 0:
        fmin = F0
    if fmax == fmin:
        for i in range(n):
            L[i] = 0
        return F0, np.float32(-fmin)
    fn = np.float32(nmax)
    iscale = np.float32(fn / np.float32(fmax - fmin))
    scale = np.float32(np.float32(1.0) / iscale)
    best_error = F0
    for i in range(n):
        l = nearest_int(np.float32(iscale * np.float32(x[i] - fmin)))
        L[i] = max(0, min(nmax, l))
        diff = np.float32(np.float32(np.float32(scale * np.float32(L[i])) + fmin) - x[i])
        diff = abs(diff) if use_mad else np.float32(diff * diff)
        best_error = np.float32(best_error + np.float32(weights[i] * diff))
    if nstep < 1:
        return scale, np.float32(-fmin)
    for step in range(nstep + 1):
        iscale = np.float32(np.float32(np.float32(rmin + np.float32(rdelta * np.float32(step))) + fn)
                            / np.float32(fmax - fmin))
        sum_l = F0
        sum_l2 = F0
        sum_xl = F0
        for i in range(n):
            l = max(0, min(nmax, nearest_int(np.float32(iscale * np.float32(x[i] - fmin)))))
            Laux[i] = l
            w = weights[i]
            fl = np.float32(l)
            sum_l = np.float32(sum_l + np.float32(w * fl))
            sum_l2 = np.float32(sum_l2 + np.float32(np.float32(w * fl) * fl))
            sum_xl = np.float32(sum_xl + np.float32(np.float32(w * fl) * x[i]))
        D = np.float32(np.float32(sum_w * sum_l2) - np.float32(sum_l * sum_l))
        if D > 0:
            this_scale = np.float32(np.float32(np.float32(sum_w * sum_xl) - np.float32(sum_x * sum_l)) / D)
            this_min = np.float32(np.float32(np.float32(sum_l2 * sum_x) - np.float32(sum_l * sum_xl)) / D)
            if this_min > 0:
                this_min = F0
                this_scale = np.float32(sum_xl / sum_l2)
            cur_error = F0
            for i in range(n):
                diff = np.float32(np.float32(np.float32(this_scale * np.float32(Laux[i])) + this_min) - x[i])
                diff = abs(diff) if use_mad else np.float32(diff * diff)
                cur_error = np.float32(cur_error + np.float32(weights[i] * diff))
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                fmin = this_min
    return scale, np.float32(-fmin)


@njit(nogil=True, cache=True)
def pack_2bit(L, out, r, pos):
    """Four 2-bit values per byte: byte 32n + l holds L[128n + l + 32j] in bits 2j (Q2_K and Q3_K)."""
    for n in range(2):
        for l in range(32):
            j = 128 * n + l
            out[r, pos + 32 * n + l] = L[j] | (L[j + 32] << 2) | (L[j + 64] << 4) | (L[j + 96] << 6)


# --- Q2_K: scales(16) qs(64) d dmin ---------------------------------------------------------------------------

@njit(parallel=True, nogil=True, cache=True)
def quantize_q2_k_rows(x, out):
    q4scale = np.float32(15.0)
    for r in prange(x.shape[0]):
        L = np.zeros(QK_K, dtype=np.int64)
        Laux = np.zeros(16, dtype=np.int64)
        weights = np.empty(16, dtype=np.float32)
        mins = np.empty(16, dtype=np.float32)
        scales = np.empty(16, dtype=np.float32)
        for b in range(x.shape[1] // QK_K):
            xb = x[r, b * QK_K:(b + 1) * QK_K]
            pos = b * 84
            max_scale = F0
            max_min = F0
            for j in range(16):
                for l in range(16):
                    weights[l] = abs(xb[16 * j + l])
                scales[j], mins[j] = make_qkx2_quants(16, 3, xb[16 * j:], weights, L[16 * j:], Laux,
                                                      np.float32(-0.5), np.float32(0.1), 15, True)
                if scales[j] > max_scale:
                    max_scale = scales[j]
                if mins[j] > max_min:
                    max_min = mins[j]
            if max_scale > 0:
                iscale = np.float32(q4scale / max_scale)
                for j in range(16):
                    out[r, pos + j] = nearest_int(np.float32(iscale * scales[j])) & 0xFF
                d = put_half(out, r, pos + 80, np.float32(max_scale / q4scale))
            else:
                for j in range(16):
                    out[r, pos + j] = 0
                d = put_half(out, r, pos + 80, F0)
            if max_min > 0:
                iscale = np.float32(q4scale / max_min)
                for j in range(16):
                    out[r, pos + j] |= (nearest_int(np.float32(iscale * mins[j])) << 4) & 0xFF
                dmin = put_half(out, r, pos + 82, np.float32(max_min / q4scale))
            else:
                dmin = put_half(out, r, pos + 82, F0)
            for j in range(16):
                dl = np.float32(d * np.float32(out[r, pos + j] & 0xF))
                if dl == 0:
                    continue
                dm = np.float32(dmin * np.float32(out[r, pos + j] >> 4))
                for ii in range(16):
                    l = nearest_int(np.float32(np.float32(xb[16 * j + ii] + dm) / dl))
                    L[16 * j + ii] = max(0, min(3, l))
            pack_2bit(L, out, r, pos + 16)


# --- Q3_K: hmask(32) qs(64) scales(12) d -----------------------------------------------------------------------

@njit(parallel=True, nogil=True, cache=True)
def quantize_q3_k_rows(x, out):
    for r in prange(x.shape[0]):
        L = np.zeros(QK_K, dtype=np.int64)
        scales = np.empty(16, dtype=np.float32)
        for b in range(x.shape[1] // QK_K):
            xb = x[r, b * QK_K:(b + 1) * QK_K]
            pos = b * 110
            max_scale = F0
            amax = F0
            for j in range(16):
                scales[j] = make_q3_quants(16, 4, xb[16 * j:], L[16 * j:])
                scale = abs(scales[j])
                if scale > amax:
                    amax = scale
                    max_scale = scales[j]
            sb = pos + 96
            for j in range(12):
                out[r, sb + j] = 0
            if max_scale != 0:
                iscale = np.float32(np.float32(-32.0) / max_scale)
                for j in range(16):
                    l = nearest_int(np.float32(iscale * scales[j]))
                    l = ((l + 128) & 0xFF) - 128  # int8_t
                    l = max(-32, min(31, l)) + 32
                    if j < 8:
                        out[r, sb + j] = l & 0xF
                    else:
                        out[r, sb + j - 8] |= (l & 0xF) << 4
                    l >>= 4
                    out[r, sb + 8 + j % 4] |= l << (2 * (j // 4))
                d_all = put_half(out, r, pos + 108, np.float32(np.float32(1.0) / iscale))
            else:
                d_all = put_half(out, r, pos + 108, F0)
            for j in range(16):
                low = np.int64(out[r, sb + j] & 0xF) if j < 8 else np.int64(out[r, sb + j - 8] >> 4)
                sc = (low | ((np.int64(out[r, sb + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4) - 32
                d = np.float32(d_all * np.float32(sc))
                if d == 0:
                    continue
                for ii in range(16):
                    l = nearest_int(np.float32(xb[16 * j + ii] / d))
                    L[16 * j + ii] = max(-4, min(3, l)) + 4
            for j in range(32):
                out[r, pos + j] = 0
            m = 0
            hm = 1
            for j in range(QK_K):
                if L[j] > 3:
                    out[r, pos + m] |= hm
                    L[j] -= 4
                m += 1
                if m == 32:
                    m = 0
                    hm <<= 1
            pack_2bit(L, out, r, pos + 32)


# --- Q4_K and Q5_K: d dmin scales(12) [qh(32)] qs(128) ------------------------------------------------------------

@njit(nogil=True, cache=True)
def _k4_scales(xb, L, Laux, weights, scales, mins, nmax, rmin, nstep, out, r, pos):
    """The sub-block search and 6-bit scale packing shared by Q4_K and Q5_K; requantizes L against the
    stored scales and returns nothing (the q bits are packed by the caller)."""
    max_scale = F0
    max_min = F0
    for j in range(8):
        sum_x2 = F0
        for l in range(32):
            sum_x2 = np.float32(sum_x2 + np.float32(xb[32 * j + l] * xb[32 * j + l]))
        av_x = np.float32(np.sqrt(np.float32(sum_x2 / np.float32(32.0))))
        for l in range(32):
            weights[l] = np.float32(av_x + abs(xb[32 * j + l]))
        scales[j], mins[j] = make_qkx2_quants(32, nmax, xb[32 * j:], weights, L[32 * j:], Laux,
                                              rmin, np.float32(0.1), nstep, False)
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = np.float32(np.float32(63.0) / max_scale) if max_scale > 0 else F0
    inv_min = np.float32(np.float32(63.0) / max_min) if max_min > 0 else F0
    sb = pos + 4
    for j in range(8):
        ls = min(63, nearest_int(np.float32(inv_scale * scales[j])) & 0xFF)
        lm = min(63, nearest_int(np.float32(inv_min * mins[j])) & 0xFF)
        if j < 4:
            out[r, sb + j] = ls
            out[r, sb + j + 4] = lm
        else:
            out[r, sb + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            out[r, sb + j - 4] |= (ls >> 4) << 6
            out[r, sb + j] |= (lm >> 4) << 6
    d_all = put_half(out, r, pos, np.float32(max_scale / np.float32(63.0)))
    dmin_all = put_half(out, r, pos + 2, np.float32(max_min / np.float32(63.0)))
    for j in range(8):
        if j < 4:
            sc = out[r, sb + j] & 63
            m = out[r, sb + j + 4] & 63
        else:
            sc = (out[r, sb + j + 4] & 0xF) | ((out[r, sb + j - 4] >> 6) << 4)
            m = (out[r, sb + j + 4] >> 4) | ((out[r, sb + j] >> 6) << 4)
        d = np.float32(d_all * np.float32(sc))
        if d == 0:
            continue
        dm = np.float32(dmin_all * np.float32(m))
        for ii in range(32):
            l = nearest_int(np.float32(np.float32(xb[32 * j + ii] + dm) / d))
            L[32 * j + ii] = max(0, min(nmax, l))


@njit(parallel=True, nogil=True, cache=True)
def quantize_q4_k_rows(x, out):
    for r in prange(x.shape[0]):
        L = np.zeros(QK_K, dtype=np.int64)
        Laux = np.zeros(32, dtype=np.int64)
        weights = np.empty(32, dtype=np.float32)
        mins = np.empty(8, dtype=np.float32)
        scales = np.empty(8, dtype=np.float32)
        for b in range(x.shape[1] // QK_K):
            pos = b * 144
            _k4_scales(x[r, b * QK_K:(b + 1) * QK_K], L, Laux, weights, scales, mins, 15,
                       np.float32(-1.0), 20, out, r, pos)
            for n in range(4):
                for l in range(32):
                    out[r, pos + 16 + 32 * n + l] = L[64 * n + l] | (L[64 * n + l + 32] << 4)


@njit(parallel=True, nogil=True, cache=True)
def quantize_q5_k_rows(x, out):
    for r in prange(x.shape[0]):
        L = np.zeros(QK_K, dtype=np.int64)
        Laux = np.zeros(32, dtype=np.int64)
        weights = np.empty(32, dtype=np.float32)
        mins = np.empty(8, dtype=np.float32)
        scales = np.empty(8, dtype=np.float32)
        for b in range(x.shape[1] // QK_K):
            pos = b * 176
            _k4_scales(x[r, b * QK_K:(b + 1) * QK_K], L, Laux, weights, scales, mins, 31,
                       np.float32(-0.5), 15, out, r, pos)
            for j in range(32):
                out[r, pos + 16 + j] = 0
            m1, m2 = 1, 2
            for n in range(4):
                for j in range(32):
                    l1 = L[64 * n + j]
                    if l1 > 15:
                        l1 -= 16
                        out[r, pos + 16 + j] |= m1
                    l2 = L[64 * n + j + 32]
                    if l2 > 15:
                        l2 -= 16
                        out[r, pos + 16 + j] |= m2
                    out[r, pos + 48 + 32 * n + j] = l1 | (l2 << 4)
                m1 <<= 2
                m2 <<= 2


# --- Q6_K: ql(128) qh(64) scales(16) d --------------------------------------------------------------------------

@njit(parallel=True, nogil=True, cache=True)
def quantize_q6_k_rows(x, out):
    for r in prange(x.shape[0]):
        L = np.zeros(QK_K, dtype=np.int64)
        scales = np.empty(16, dtype=np.float32)
        for b in range(x.shape[1] // QK_K):
            xb = x[r, b * QK_K:(b + 1) * QK_K]
            pos = b * 210
            max_scale = F0
            max_abs_scale = F0
            for ib in range(16):
                scale = make_qx_quants(16, 32, xb[16 * ib:], L[16 * ib:])
                scales[ib] = scale
                if abs(scale) > max_abs_scale:
                    max_abs_scale = abs(scale)
                    max_scale = scale
            if max_abs_scale < GROUP_MAX_EPS:
                for j in range(210):
                    out[r, pos + j] = 0
                continue
            iscale = np.float32(np.float32(-128.0) / max_scale)
            d_all = put_half(out, r, pos + 208, np.float32(np.float32(1.0) / iscale))
            for ib in range(16):
                out[r, pos + 192 + ib] = min(127, nearest_int(np.float32(iscale * scales[ib]))) & 0xFF
            for j in range(16):
                sc = np.int64(out[r, pos + 192 + j])
                sc = sc - 256 if sc > 127 else sc
                d = np.float32(d_all * np.float32(sc))
                if d == 0:
                    continue
                for ii in range(16):
                    l = nearest_int(np.float32(xb[16 * j + ii] / d))
                    L[16 * j + ii] = max(-32, min(31, l)) + 32
            for n in range(2):
                for l in range(32):
                    j = 128 * n + l
                    out[r, pos + 64 * n + l] = (L[j] & 0xF) | ((L[j + 64] & 0xF) << 4)
                    out[r, pos + 64 * n + l + 32] = (L[j + 32] & 0xF) | ((L[j + 96] & 0xF) << 4)
                    out[r, pos + 128 + 32 * n + l] = ((L[j] >> 4) | ((L[j + 32] >> 4) << 2)
                                                      | ((L[j + 64] >> 4) << 4) | ((L[j + 96] >> 4) << 6))
