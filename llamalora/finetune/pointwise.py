"""The training step's row-wise arithmetic as compiled loops, for float32 and float64 alike: each replaces a chain
of numpy expressions that made a temporary and a pass over memory per operation.

Row sums are the only reassociated operations (`fastmath` reassoc on the dot products alone, so that they run
in vector lanes as numpy's own sums do); everything else is computed in the written order.
"""

import numpy as np
from numba import njit


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def row_dot(a, b):
    total = a.dtype.type(0.0)
    for j in range(a.shape[0]):
        total += a[j] * b[j]
    return total


@njit(nogil=True, cache=True)
def add_rms_norm(x, residual, weight, eps, h, xn, rstd):
    """x += residual (residual None: x as it is), then h = xn * weight with xn = x * rstd and
    rstd = 1 / sqrt(mean(x²) + eps), row by row; xn and rstd [n, 1] are kept for the backward."""
    n_cols = x.shape[1]
    one = x.dtype.type(1.0)
    n = x.dtype.type(n_cols)
    for i in range(x.shape[0]):
        row = x[i]
        if residual is not None:
            for j in range(n_cols):
                row[j] += residual[i, j]
        r = one / np.sqrt(row_dot(row, row) / n + eps)
        rstd[i, 0] = r
        for j in range(n_cols):
            v = row[j] * r
            xn[i, j] = v
            h[i, j] = v * weight[j]


@njit(nogil=True, cache=True)
def rms_norm_bwd_into(dy, weight, xn, rstd, out):
    """out += rstd * (dxn - xn * mean(dxn * xn)), dxn = dy * weight: the input's gradient added to out."""
    n_cols = dy.shape[1]
    n = dy.dtype.type(n_cols)
    dxn = np.empty(n_cols, dtype=dy.dtype)
    for i in range(dy.shape[0]):
        for j in range(n_cols):
            dxn[j] = dy[i, j] * weight[j]
        mean = row_dot(dxn, xn[i]) / n
        r = rstd[i, 0]
        for j in range(n_cols):
            out[i, j] += r * (dxn[j] - xn[i, j] * mean)


@njit(nogil=True, cache=True)
def swiglu_fwd(g, up, sig, act):
    """act = (g * sig) * up with sig = sigmoid(g) already in sig."""
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            act[i, j] = (g[i, j] * sig[i, j]) * up[i, j]


@njit(nogil=True, cache=True)
def swiglu_bwd(dact, g, up, sig, one, dg):
    """dg and dup of act = silu(g) * up, dg written into dg and dup over dact (which is not needed after)."""
    for i in range(dact.shape[0]):
        for j in range(dact.shape[1]):
            a = dact[i, j]
            sg = sig[i, j]
            x = g[i, j]
            dg[i, j] = a * up[i, j] * sg * (one + x * (one - sg))
            dact[i, j] = a * (x * sg)


@njit(nogil=True, cache=True)
def softmax_bwd_rows(p, dp, scale, n_ctx):
    """dp = scale * p * (dp - sum(dp * p)) row by row (the causal softmax's backward, scaled), in place; the keys
    after the query's position (p 0) get 0."""
    rows = p.reshape(-1, p.shape[-1])
    grads = dp.reshape(-1, dp.shape[-1])
    zero = dp.dtype.type(0.0)
    for i in range(rows.shape[0]):
        last = i % n_ctx
        total = row_dot(grads[i][: last + 1], rows[i][: last + 1])
        for j in range(last + 1):
            grads[i, j] = scale * (rows[i, j] * (grads[i, j] - total))
        for j in range(last + 1, rows.shape[1]):
            grads[i, j] = zero


@njit(nogil=True, cache=True)
def causal_scores(scores, scale, n_ctx):
    """scores [..., rows, n_ctx] (row i: the query at position i % n_ctx) → scale * scores - the row's maximum
    over the keys up to that position, -inf for later keys: ready for exp."""
    rows = scores.reshape(-1, scores.shape[-1])
    minus_inf = scores.dtype.type(-np.inf)
    for i in range(rows.shape[0]):
        last = i % n_ctx
        row = rows[i]
        top = minus_inf
        for j in range(last + 1):
            v = row[j] * scale
            row[j] = v
            top = max(top, v)
        for j in range(last + 1):
            row[j] -= top
        for j in range(last + 1, row.shape[0]):
            row[j] = minus_inf


@njit(nogil=True, cache=True)
def normalize_causal_rows(p, n_ctx):
    """Each row of exponentials divided by its sum (the keys after the query's position are 0 already)."""
    rows = p.reshape(-1, p.shape[-1])
    for i in range(rows.shape[0]):
        last = i % n_ctx
        total = row_sum(rows[i][: last + 1])
        for j in range(last + 1):
            rows[i, j] /= total


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def row_sum(a):
    total = a.dtype.type(0.0)
    for j in range(a.shape[0]):
        total += a[j]
    return total


@njit(nogil=True, cache=True)
def softmax_minus_onehot(exps, targets, picked, scale, losses):
    """Rows of exponentials → (softmax - one-hot of the target) * scale in place; losses[i] = log(sum) - picked[i]
    in float64."""
    one = exps.dtype.type(1.0)
    for i in range(exps.shape[0]):
        row = exps[i]
        # summed in float64: the vocabulary's 49152 terms in a few vector lanes would lose the digits that the
        # gradient (softmax - one-hot, which nearly cancels) keeps
        total = exps.dtype.type(row_sum_wide(row))
        losses[i] = np.log(np.float64(total)) - np.float64(picked[i])
        t = targets[i]
        target_p = row[t] / total
        for j in range(row.shape[0]):
            row[j] = (row[j] / total) * scale
        row[t] = (target_p - one) * scale


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def row_sum_wide(a):
    total = 0.0
    for j in range(a.shape[0]):
        total += np.float64(a[j])
    return total
