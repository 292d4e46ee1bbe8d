"""Forward and backward of the llama model for LoRA training: gradients for the adapters' A and B only.

Everything is written once for a float dtype: float32 trains, float64 checks the gradients against
finite differences. The base weights stay frozen in their file type (tiles.py); activations are laid out
[batch * ctx, features], every sample starting at position 0 as llama.cpp's finetune runs them.

A LoRA pair patches y = x @ W.T into y = x @ W.T + ((x @ A.T) @ B.T) * s, with s = alpha / r (PEFT's order of
operations, so that float32 results follow transformers + PEFT closely). Parameters live in a dict keyed by
the GGUF adapter tensor names (`blk.0.attn_q.weight.lora_a` [r, n_in], `.lora_b` [n_out, r]).

DoRA (`--dora`) adds a magnitude `.lora_m` [n_out] per pair: y = g ⊙ z with z the LoRA output above and
g = m / ‖W + s·B·A‖ (each output row's norm, formed once per forward from W's tiles). As PEFT does (the DoRA
paper's section 4.3), the norm is a constant in the backward: dz = g ⊙ dy flows on as LoRA's dy, and
dm = Σ_tokens dy ⊙ z / ‖W + s·B·A‖.
"""

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from ..llama import LlamaConfig, rope_tables
from .blas import gemm
from .pointwise import (add_rms_norm, causal_scores, normalize_causal_rows, rms_norm_bwd_into,
                        softmax_bwd_rows, softmax_minus_onehot, swiglu_bwd, swiglu_fwd)
from .team import for_row_blocks, prerequisite, row_blocks, run_tasks
from .tiles import (BaseWeight, add_times_w, backward_tasks, base_weight, dequantize_tile, forward_tasks, rows,
                    tile_ranges, times_wt)

# llama.cpp finetune's names for the seven adapted weights (--rank-wq ... --rank-w3) → GGUF tensor parts.
LORA_TARGETS = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
                "w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass
class BaseModel:
    """The frozen model: weights in their file types, norms as vectors of the compute dtype."""

    config: LlamaConfig
    dtype: type
    token_embd: BaseWeight
    output: BaseWeight
    output_norm: np.ndarray
    layers: list = field(default_factory=list)  # per layer: dict part -> BaseWeight or norm vector


def load_base(config: LlamaConfig, tensors: dict, dtype=np.float32) -> BaseModel:
    from .. import kernels

    def norm(name):
        t = tensors[name]
        return kernels.dequantize(t.type, t.data, t.n_cols).reshape(-1).astype(dtype)

    embd = base_weight(tensors["token_embd.weight"])
    output = base_weight(tensors["output.weight"]) if "output.weight" in tensors else embd
    layers = []
    for i in range(config.n_layer):
        layer = {part: base_weight(tensors[f"blk.{i}.{part}.weight"]) for part in PROJECTIONS}
        layer["attn_norm"] = norm(f"blk.{i}.attn_norm.weight")
        layer["ffn_norm"] = norm(f"blk.{i}.ffn_norm.weight")
        layers.append(layer)
    return BaseModel(config, dtype, embd, output, norm("output_norm.weight"), layers)


def lora_shapes(config: LlamaConfig, ranks: dict) -> dict:
    """{GGUF weight name: (r, n_out, n_in)} of every adapted weight; ranks maps a part (attn_q, ...) to r (0: none)."""
    c = config
    kv_dim = c.n_head_kv * c.head_dim
    sizes = {"attn_q": (c.dim, c.dim), "attn_k": (kv_dim, c.dim), "attn_v": (kv_dim, c.dim),
             "attn_output": (c.dim, c.dim), "ffn_gate": (c.n_ff, c.dim), "ffn_up": (c.n_ff, c.dim),
             "ffn_down": (c.dim, c.n_ff)}
    shapes = {}
    for i in range(c.n_layer):
        for part in PROJECTIONS:
            r = int(ranks.get(part, 0))
            if r > 0:
                shapes[f"blk.{i}.{part}.weight"] = (r,) + sizes[part]
    return shapes


def init_lora(config: LlamaConfig, ranks: dict, rng: np.random.Generator, dtype=np.float32,
              base: "BaseModel | None" = None) -> dict:
    """A as PEFT initialises it (kaiming-uniform, bound 1/sqrt(n_in)), B zero: training starts at the base model.
    With the base model given, DoRA's magnitudes too: m = ‖W‖ per output row (PEFT's ‖W + s·B·A‖ with B zero)."""
    params = {}
    for name, (r, n_out, n_in) in lora_shapes(config, ranks).items():
        bound = 1.0 / math.sqrt(n_in)
        params[f"{name}.lora_a"] = rng.uniform(-bound, bound, size=(r, n_in)).astype(dtype)
        params[f"{name}.lora_b"] = np.zeros((n_out, r), dtype=dtype)
        if base is not None:
            _, i, part, _ = name.split(".")
            params[f"{name}.lora_m"] = weight_norms(base.layers[int(i)][part], params[f"{name}.lora_a"],
                                                    params[f"{name}.lora_b"], 0.0, dtype)
    return params


def weight_norms(w: BaseWeight, a, b, s, dtype=np.float32) -> np.ndarray:
    """‖W + s·B·A‖ of each output row (DoRA's weight norm), in dtype; W widened tile by tile."""
    out = np.empty(w.n_rows, dtype=dtype)
    for r0, r1 in tile_ranges(w):
        tile = np.array(dequantize_tile(w, r0, r1, np.empty((r1 - r0) * w.n_cols, np.float32)), dtype=dtype)
        if s != 0:
            gemm(np.ascontiguousarray(b[r0:r1]), a, tile, s, 1.0)  # tile += s · B @ A
        np.sqrt(np.einsum("ij,ij->i", tile, tile), out=out[r0:r1])
    return out


def dora_scales(base: "BaseModel", params: dict, scales: dict) -> dict:
    """{weight name: (g, ‖W + s·B·A‖)} of every DoRA pair in params (those with a .lora_m), g = m / the norm;
    one task per weight for the thread team."""
    names = [name[: -len(".lora_m")] for name in params if name.endswith(".lora_m")]
    found = {}

    def one(name):
        _, i, part, _ = name.split(".")
        norms = weight_norms(base.layers[int(i)][part], params[f"{name}.lora_a"], params[f"{name}.lora_b"],
                             scales[name], base.dtype)
        found[name] = (params[f"{name}.lora_m"] / norms, norms)

    run_tasks([(lambda name=name: one(name)) for name in names])
    return found


def lora_scales(params: dict, alpha: float) -> dict:
    """{weight name: alpha / r}, r read from each pair's shape (llama.cpp's rule, and PEFT's for one alpha)."""
    return {name[: -len(".lora_a")]: (alpha / a.shape[0] if alpha > 0 else 1.0)
            for name, a in params.items() if name.endswith(".lora_a")}


# ---- elementwise pieces ----

def rms_norm_fwd(x, weight, eps, residual=None):
    """h = RMSNorm(x) · weight, with xn and rstd for the backward; residual given, x += residual first (in place:
    x then holds the sum)."""
    h, xn = np.empty_like(x), np.empty_like(x)
    rstd = np.empty((x.shape[0], 1), dtype=x.dtype)
    eps = x.dtype.type(eps)

    def part(r0, r1):
        add_rms_norm(x[r0:r1], None if residual is None else residual[r0:r1], weight, eps, h[r0:r1], xn[r0:r1],
                     rstd[r0:r1])

    for_row_blocks(x.shape[0], part, min_rows=32)
    return h, xn, rstd


def rms_norm_bwd(dy, weight, xn, rstd, out=None):
    """out + the input's gradient (out None: zeros), written into out."""
    if out is None:
        out = np.zeros_like(dy)
    for_row_blocks(dy.shape[0], lambda r0, r1: rms_norm_bwd_into(dy[r0:r1], weight, xn[r0:r1], rstd[r0:r1],
                                                                 out[r0:r1]), min_rows=32)
    return out


def rope(x, cos, sin, rope_dim, inverse=False):
    """Rotate adjacent pairs of the first rope_dim features of every head of x [n, heads, head_dim] in place
    (GGUF's layout) and return x; inverse rotates back (the backward of a rotation is its transpose)."""
    rotate_pairs(x, cos, sin, rope_dim, x.dtype.type(-1.0 if inverse else 1.0))
    return x


@njit(nogil=True, cache=True)
def rotate_pairs(x, cos, sin, rope_dim, sign):
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            for p in range(rope_dim // 2):
                c = cos[t, p]
                s = sign * sin[t, p]
                x0 = x[t, h, 2 * p]
                x1 = x[t, h, 2 * p + 1]
                x[t, h, 2 * p] = x0 * c - x1 * s
                x[t, h, 2 * p + 1] = x0 * s + x1 * c


def swiglu_parts(g, up):
    """sigmoid(g) and act = silu(g) * up: the sigmoid by numpy's vector exp, its four passes in place on one
    buffer."""
    sig, act = np.empty_like(g), np.empty_like(g)
    one = g.dtype.type(1.0)

    def part(r0, r1):
        s = sig[r0:r1]
        np.negative(g[r0:r1], out=s)
        np.exp(s, out=s)
        s += one
        np.divide(one, s, out=s)
        swiglu_fwd(g[r0:r1], up[r0:r1], s, act[r0:r1])

    for_row_blocks(g.shape[0], part, min_rows=16)
    return sig, act


def swiglu_grads(dact, g, up, sig):
    """dg and dup of act = silu(g) * up, dup written over dact (which is not needed after)."""
    dg = np.empty_like(dact)
    one = dact.dtype.type(1.0)
    for_row_blocks(dact.shape[0], lambda r0, r1: swiglu_bwd(dact[r0:r1], g[r0:r1], up[r0:r1], sig[r0:r1], one,
                                                            dg[r0:r1]), min_rows=16)
    return dg, dact


# ---- linear layers with an optional LoRA pair ----
#
# The products sharing an input (q, k, v; gate, up) run as one task list for the thread team, with the LoRA terms
# added on each task's own part of the result.

def _lora_fwd_after(y, u, b, s, wait):
    def after(r0, r1):
        wait()
        gemm(u, b[r0:r1].T, y[:, r0:r1], s, 1.0)  # y += s · u @ B.T on the tile's columns
    return after


def linears_fwd(x, weights, loras):
    """[(y, u)] for each base weight and its LoRA pair (or None): y = x @ W.T + s · u @ B.T with the LoRA
    intermediate u = x @ A.T (None without an adapter). The u are one task, ahead of the products' tasks.
    A DoRA pair (a, b, s, (g, norms)) scales y by g and keeps (u, z), z the output before the scaling."""
    results, products, firsts = [], [], []
    first, wait = prerequisite(lambda: [gemm(x, a.T, u) for a, u in firsts])
    for w, lora in zip(weights, loras):
        y = np.empty((x.shape[0], w.n_rows), dtype=x.dtype)
        u = after = None
        if lora is not None:
            a, b, s = lora[:3]
            u = np.empty((x.shape[0], a.shape[0]), dtype=x.dtype)
            firsts.append((a, u))
            after = _lora_fwd_after(y, u, b, s, wait)
        products.append((w, y, after))
        results.append((y, u))
    run_tasks(([first] if firsts else []) + forward_tasks(products, x))
    for k, lora in enumerate(loras):
        if lora is not None and lora[3] is not None:
            y, u = results[k]
            z = y.copy()
            y *= lora[3][0]
            results[k] = (y, (u, z))
    return results


def linear_fwd(w: BaseWeight, x, lora):
    """y and the LoRA intermediate x @ A.T (None without an adapter)."""
    return linears_fwd(x, [w], [lora])[0]


def _lora_bwd_after(x, du, a, ga, dx, wait):
    def after(c0, c1):
        wait()
        gemm(du, a[:, c0:c1], dx[:, c0:c1], 1.0, 1.0)          # dx += du @ A
        gemm(du.T, x[:, c0:c1], ga[:, c0:c1], 1.0, 1.0)        # dA += du.T @ x
    return after


def linears_bwd(x, products, grads, dx, accumulate=True):
    """dx += sum of dy @ (W + s·B·A) over products, a list of (w, u, dy, lora, name) whose forward read x (dx None:
    not wanted; accumulate False: dx's old values are ignored); the adapters' gradients added into grads. The
    du = s · dy @ B are one task, ahead of the others."""
    band_products, lora_tasks, firsts = [], [], []
    first, wait = prerequisite(lambda: [gemm(dy, b, du, s) for dy, b, du, s in firsts])
    for w, u, dy, lora, name in products:
        after = None
        if lora is not None and lora[3] is not None:  # DoRA: y = g ⊙ z, the norm a constant
            g, norms = lora[3]
            u, z = u
            grads[f"{name}.lora_m"] += np.einsum("ij,ij->j", dy, z) / norms
            dy = dy * g
        if lora is not None:
            a, b, s = lora[:3]
            ga, gb = grads[f"{name}.lora_a"], grads[f"{name}.lora_b"]
            du = np.empty((dy.shape[0], b.shape[1]), dtype=dy.dtype)
            firsts.append((dy, b, du, s))
            lora_tasks.append(lambda dy=dy, u=u, gb=gb, s=s: gemm(dy.T, u, gb, s, 1.0))  # dB += s · dy.T @ u
            if dx is None:
                lora_tasks.append(lambda du=du, ga=ga: (wait(), gemm(du.T, x, ga, 1.0, 1.0)))
            else:
                after = _lora_bwd_after(x, du, a, ga, dx, wait)
        band_products.append((w, dy, after))
    tasks = backward_tasks(band_products, dx, accumulate) if dx is not None else []
    run_tasks(([first] if firsts else []) + tasks + lora_tasks)


# ---- attention over [batch, ctx] samples, grouped-query, causal ----

def heads_layout(x, n_batch, n_ctx, n_kv, group, head_dim):
    """[n, n_kv * group * head_dim] -> [batch, n_kv, group * ctx, head_dim] (queries of a kv head together)."""
    x = x.reshape(n_batch, n_ctx, n_kv, group, head_dim).transpose(0, 2, 3, 1, 4)
    return np.ascontiguousarray(x).reshape(n_batch, n_kv, group * n_ctx, head_dim)


def write_tokens(x, out, n_kv, group):
    """x [batch, n_kv, group * ctx, head_dim] (heads_layout) written into out [batch * ctx, n_kv * group *
    head_dim]."""
    n_batch, head_dim = x.shape[0], x.shape[-1]
    n_ctx = out.shape[0] // n_batch
    np.copyto(out.reshape(n_batch, n_ctx, n_kv, group, head_dim),
              x.reshape(n_batch, n_kv, group, n_ctx, head_dim).transpose(0, 3, 1, 2, 4))


def attention_fwd(q, k, v, n_batch, n_ctx, config, tables):
    """RoPE on q and k (in place), then each sequence's causal attention: the output [n, n_head * head_dim] and
    what the backward needs. The sequences are independent: blocks of them are tasks for the thread team."""
    c = config
    group = c.n_head // c.n_head_kv
    cos, sin = tables
    scale = q.dtype.type(1.0 / math.sqrt(c.head_dim))
    out = np.empty_like(q)
    blocks = row_blocks(n_batch, min_rows=1)
    saved = [None] * len(blocks)

    def sequences(i, b0, b1):
        rows, nb = slice(b0 * n_ctx, b1 * n_ctx), b1 - b0
        rope(q[rows].reshape(nb * n_ctx, c.n_head, c.head_dim), cos[rows], sin[rows], c.rope_dim)
        rope(k[rows].reshape(nb * n_ctx, c.n_head_kv, c.head_dim), cos[rows], sin[rows], c.rope_dim)
        qh = heads_layout(q[rows], nb, n_ctx, c.n_head_kv, group, c.head_dim)
        kh = heads_layout(k[rows], nb, n_ctx, c.n_head_kv, 1, c.head_dim)
        vh = heads_layout(v[rows], nb, n_ctx, c.n_head_kv, 1, c.head_dim)
        scores = qh @ kh.swapaxes(-1, -2)
        # the causal softmax: scale, mask and the maximum in one compiled pass, numpy's vector exp, then the sums
        causal_scores(scores, scale, n_ctx)
        np.exp(scores, out=scores)
        normalize_causal_rows(scores, n_ctx)
        write_tokens(scores @ vh, out[rows], c.n_head_kv, group)
        saved[i] = (qh, kh, vh, scores)

    run_tasks([(lambda i=i, b0=b0, b1=b1: sequences(i, b0, b1)) for i, (b0, b1) in enumerate(blocks)])
    return out, (blocks, saved)


def attention_bwd(dout, saved, n_batch, n_ctx, config, tables):
    """dq, dk, dv (before RoPE) from the output's gradient, by the forward's blocks of sequences as tasks for the
    thread team."""
    c = config
    group = c.n_head // c.n_head_kv
    cos, sin = tables
    scale = dout.dtype.type(1.0 / math.sqrt(c.head_dim))
    n = dout.shape[0]
    dq = np.empty_like(dout)
    dk = np.empty((n, c.n_head_kv * c.head_dim), dtype=dout.dtype)
    dv = np.empty_like(dk)
    blocks, kept = saved

    def sequences(i, b0, b1):
        rows, nb = slice(b0 * n_ctx, b1 * n_ctx), b1 - b0
        qh, kh, vh, p = kept[i]
        do = heads_layout(dout[rows], nb, n_ctx, c.n_head_kv, group, c.head_dim)
        dp = do @ vh.swapaxes(-1, -2)
        write_tokens(p.swapaxes(-1, -2) @ do, dv[rows], c.n_head_kv, 1)
        softmax_bwd_rows(p, dp, scale, n_ctx)
        ds = dp
        write_tokens(ds @ kh, dq[rows], c.n_head_kv, group)
        write_tokens(ds.swapaxes(-1, -2) @ qh, dk[rows], c.n_head_kv, 1)
        rope(dq[rows].reshape(nb * n_ctx, c.n_head, c.head_dim), cos[rows], sin[rows], c.rope_dim, inverse=True)
        rope(dk[rows].reshape(nb * n_ctx, c.n_head_kv, c.head_dim), cos[rows], sin[rows], c.rope_dim, inverse=True)

    run_tasks([(lambda i=i, b0=b0, b1=b1: sequences(i, b0, b1)) for i, (b0, b1) in enumerate(blocks)])
    return dq, dk, dv


# ---- one transformer block ----

def rope_for(config: LlamaConfig, n_batch, n_ctx, dtype):
    positions = np.tile(np.arange(n_ctx, dtype=np.int64), n_batch)
    if dtype == np.float32:
        return rope_tables(positions, config.rope_dim, config.rope_base, config.rope_factors)
    inv_freq = 1.0 / (config.rope_base ** (np.arange(0, config.rope_dim, 2, dtype=np.float64) / config.rope_dim))
    if config.rope_factors is not None:
        inv_freq = inv_freq / np.asarray(config.rope_factors, dtype=np.float64)
    angles = positions[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def block_fwd(layer, loras, x, n_batch, n_ctx, config, tables):
    """The block's output and what its backward needs."""
    c = config
    h1, xn1, rstd1 = rms_norm_fwd(x, layer["attn_norm"], c.rms_eps)
    (q, uq), (k, uk), (v, uv) = linears_fwd(h1, [layer["attn_q"], layer["attn_k"], layer["attn_v"]],
                                            [loras["attn_q"], loras["attn_k"], loras["attn_v"]])
    o, att = attention_fwd(q, k, v, n_batch, n_ctx, c, tables)
    x2, uo = linear_fwd(layer["attn_output"], o, loras["attn_output"])
    h2, xn2, rstd2 = rms_norm_fwd(x2, layer["ffn_norm"], c.rms_eps, residual=x)  # x2 = x + attention
    (g, ug), (up, uu) = linears_fwd(h2, [layer["ffn_gate"], layer["ffn_up"]], [loras["ffn_gate"], loras["ffn_up"]])
    sig, act = swiglu_parts(g, up)
    down, ud = linear_fwd(layer["ffn_down"], act, loras["ffn_down"])
    saved = dict(h1=h1, xn1=xn1, rstd1=rstd1, uq=uq, uk=uk, uv=uv, att=att, o=o, uo=uo, h2=h2, xn2=xn2,
                 rstd2=rstd2, ug=ug, uu=uu, g=g, up=up, sig=sig, act=act, ud=ud)
    down += x2
    return down, saved


def block_bwd(layer, loras, names, saved, dx3, n_batch, n_ctx, config, tables, grads, need_dx=True):
    """Gradient of the block's input from that of its output (computed in dx3's memory, which is overwritten);
    adapter gradients added into grads. need_dx False (the first block: the embeddings are frozen) skips the
    products that only serve dx."""
    s = saved

    def product(part, u, dy):
        return layer[part], s[u], dy, loras[part], names[part]

    dact = np.empty_like(s["act"])
    linears_bwd(s["act"], [product("ffn_down", "ud", dx3)], grads, dact, False)
    dg, dup = swiglu_grads(dact, s["g"], s["up"], s["sig"])
    dh2 = np.empty_like(s["h2"])
    linears_bwd(s["h2"], [product("ffn_gate", "ug", dg), product("ffn_up", "uu", dup)], grads, dh2, False)
    dx2 = rms_norm_bwd(dh2, layer["ffn_norm"], s["xn2"], s["rstd2"], out=dx3)  # dx3 is not needed after
    do = np.empty_like(s["o"])
    linears_bwd(s["o"], [product("attn_output", "uo", dx2)], grads, do, False)
    dq, dk, dv = attention_bwd(do, s["att"], n_batch, n_ctx, config, tables)
    dh1 = np.empty_like(s["h1"]) if need_dx else None
    linears_bwd(s["h1"], [product("attn_q", "uq", dq), product("attn_k", "uk", dk), product("attn_v", "uv", dv)],
                grads, dh1, False)
    if not need_dx:
        return None
    return rms_norm_bwd(dh1, layer["attn_norm"], s["xn1"], s["rstd1"], out=dx2)


def layer_loras(params: dict, scales: dict, i: int, dora: dict):
    """{part: (A, B, s, DoRA's (g, norms) or None) or None} and {part: weight name} of layer i."""
    names = {part: f"blk.{i}.{part}.weight" for part in PROJECTIONS}
    loras = {part: ((params[f"{name}.lora_a"], params[f"{name}.lora_b"], scales[name], dora.get(name))
                    if f"{name}.lora_a" in params else None) for part, name in names.items()}
    return loras, names


# ---- the whole model ----

# Rows of logits taken together while they stay in the cache: the exponentials by numpy's vector exp between
# two compiled passes, so that the [tokens, vocabulary] array goes through memory once instead of once per operation.
CROSS_ENTROPY_ROWS = 8


def cross_entropy(logits, targets, grad_scale=1.0):
    """Mean negative log-likelihood and its gradient wrt logits, (softmax - one-hot) · grad_scale / n, computed
    in place, blocks of rows as tasks for the thread team."""
    n = logits.shape[0]
    targets = np.ascontiguousarray(targets, dtype=np.int64)
    scale = logits.dtype.type(1.0 / n if grad_scale == 1.0 else grad_scale / n)
    picked = np.empty(n, dtype=logits.dtype)
    losses = np.empty(n, dtype=np.float64)

    def part(p0, p1):
        for r0 in range(p0, p1, CROSS_ENTROPY_ROWS):
            rows = slice(r0, min(p1, r0 + CROSS_ENTROPY_ROWS))
            block = logits[rows]
            block -= block.max(axis=-1, keepdims=True)
            picked[rows] = block[np.arange(block.shape[0]), targets[rows]]
            np.exp(block, out=block)
            softmax_minus_onehot(block, targets[rows], picked[rows], scale, losses[rows])

    for_row_blocks(n, part, min_rows=CROSS_ENTROPY_ROWS, multiple=CROSS_ENTROPY_ROWS)
    return float(np.mean(losses)), logits


def forward_backward(base: BaseModel, params: dict, alpha: float, tokens, targets, grads: dict | None = None,
                     grad_scale: float = 1.0, checkpointing: bool = False):
    """Mean cross-entropy of targets given tokens (both int [batch, ctx]) and, with grads given, the adapter
    gradients of grad_scale · loss added into grads (a dict of arrays shaped as params).

    checkpointing keeps only each block's input and recomputes the block before its backward (less memory,
    one more forward)."""
    c = base.config
    dtype = base.dtype
    tokens = np.asarray(tokens)
    n_batch, n_ctx = tokens.shape
    scales = lora_scales(params, alpha)
    dora = dora_scales(base, params, scales)
    tables = rope_for(c, n_batch, n_ctx, dtype)
    x = rows(base.token_embd, tokens.reshape(-1)).astype(dtype, copy=False)
    kept = []
    for i, layer in enumerate(base.layers):
        loras, _ = layer_loras(params, scales, i, dora)
        x_next, saved = block_fwd(layer, loras, x, n_batch, n_ctx, c, tables)
        if grads is not None:
            kept.append(x if checkpointing else saved)
        x = x_next
    hf, xnf, rstdf = rms_norm_fwd(x, base.output_norm, c.rms_eps)
    del x
    logits = times_wt(base.output, hf)
    loss, dlogits = cross_entropy(logits, np.asarray(targets).reshape(-1), grad_scale)
    if grads is None:
        return loss
    dhf = np.empty_like(hf)
    add_times_w(base.output, dlogits, dhf, False)
    del dlogits, logits
    dx = rms_norm_bwd(dhf, base.output_norm, xnf, rstdf)
    for i in reversed(range(c.n_layer)):
        layer = base.layers[i]
        loras, names = layer_loras(params, scales, i, dora)
        saved = kept.pop()
        if checkpointing:
            _, saved = block_fwd(layer, loras, saved, n_batch, n_ctx, c, tables)
        dx = block_bwd(layer, loras, names, saved, dx, n_batch, n_ctx, c, tables, grads, need_dx=i > 0)
        del saved
    return loss


def zeros_like_params(params: dict) -> dict:
    return {name: np.zeros_like(p) for name, p in params.items()}
