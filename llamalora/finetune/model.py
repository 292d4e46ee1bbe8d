"""Forward and backward of the llama model for LoRA training: gradients for the adapters' A and B only.

Everything is written once for a float dtype: float32 trains, float64 checks the gradients against
finite differences. The base weights stay frozen in their file type (tiles.py); activations are laid out
[batch * ctx, features], every sample starting at position 0 as llama.cpp's finetune runs them.

A LoRA pair patches y = x @ W.T into y = x @ W.T + ((x @ A.T) @ B.T) * s, with s = alpha / r (PEFT's order of
operations, so that float32 results follow transformers + PEFT closely). Parameters live in a dict keyed by
the GGUF adapter tensor names (`blk.0.attn_q.weight.lora_a` [r, n_in], `.lora_b` [n_out, r]).
"""

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from ..llama import LlamaConfig, rope_tables
from .blas import gemm
from .pointwise import (add_rms_norm, causal_scores, normalize_causal_rows, rms_norm_bwd_into,
                        softmax_bwd_rows, softmax_minus_onehot, swiglu_bwd, swiglu_fwd)
from .tiles import BaseWeight, add_times_w, base_weight, rows, times_wt

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


def init_lora(config: LlamaConfig, ranks: dict, rng: np.random.Generator, dtype=np.float32) -> dict:
    """A as PEFT initialises it (kaiming-uniform, bound 1/sqrt(n_in)), B zero: training starts at the base model."""
    params = {}
    for name, (r, n_out, n_in) in lora_shapes(config, ranks).items():
        bound = 1.0 / math.sqrt(n_in)
        params[f"{name}.lora_a"] = rng.uniform(-bound, bound, size=(r, n_in)).astype(dtype)
        params[f"{name}.lora_b"] = np.zeros((n_out, r), dtype=dtype)
    return params


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
    add_rms_norm(x, residual, weight, x.dtype.type(eps), h, xn, rstd)
    return h, xn, rstd


def rms_norm_bwd(dy, weight, xn, rstd, out=None):
    """out + the input's gradient (out None: zeros), written into out."""
    if out is None:
        out = np.zeros_like(dy)
    rms_norm_bwd_into(dy, weight, xn, rstd, out)
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
    sig = np.negative(g)
    np.exp(sig, out=sig)
    sig += g.dtype.type(1.0)
    np.divide(g.dtype.type(1.0), sig, out=sig)
    act = np.empty_like(g)
    swiglu_fwd(g, up, sig, act)
    return sig, act


# ---- linear layers with an optional LoRA pair ----

def linear_fwd(w: BaseWeight, x, lora):
    """y and the LoRA intermediate x @ A.T (None without an adapter)."""
    y = times_wt(w, x)
    if lora is None:
        return y, None
    a, b, s = lora
    u = gemm(x, a.T, np.empty((x.shape[0], a.shape[0]), dtype=x.dtype))
    gemm(u, b.T, y, s, 1.0)  # y += s · u @ B.T in one pass over y
    return y, u


def linear_bwd(w: BaseWeight, x, u, dy, lora, name, grads, dx, accumulate=True):
    """dx += dy @ (W + s·B·A) (dx None: not wanted; accumulate False: dx's old values are ignored); the
    adapter's gradients added into grads."""
    if dx is not None:
        add_times_w(w, dy, dx, accumulate)
    if lora is None:
        return
    a, b, s = lora
    gemm(dy.T, u, grads[f"{name}.lora_b"], s, 1.0)
    du = gemm(dy, b, np.empty((dy.shape[0], b.shape[1]), dtype=dy.dtype), s)
    gemm(du.T, x, grads[f"{name}.lora_a"], 1.0, 1.0)
    if dx is not None:
        gemm(du, a, dx, 1.0, 1.0)


# ---- attention over [batch, ctx] samples, grouped-query, causal ----

def heads_layout(x, n_batch, n_ctx, n_kv, group, head_dim):
    """[n, n_kv * group * head_dim] -> [batch, n_kv, group * ctx, head_dim] (queries of a kv head together)."""
    x = x.reshape(n_batch, n_ctx, n_kv, group, head_dim).transpose(0, 2, 3, 1, 4)
    return np.ascontiguousarray(x).reshape(n_batch, n_kv, group * n_ctx, head_dim)


def tokens_layout(x, n_batch, n_ctx, n_kv, group, head_dim):
    x = x.reshape(n_batch, n_kv, group, n_ctx, head_dim).transpose(0, 3, 1, 2, 4)
    return np.ascontiguousarray(x).reshape(n_batch * n_ctx, n_kv * group * head_dim)


def attention_fwd(q, k, v, n_batch, n_ctx, config):
    c = config
    group = c.n_head // c.n_head_kv
    qh = heads_layout(q, n_batch, n_ctx, c.n_head_kv, group, c.head_dim)
    kh = heads_layout(k, n_batch, n_ctx, c.n_head_kv, 1, c.head_dim)
    vh = heads_layout(v, n_batch, n_ctx, c.n_head_kv, 1, c.head_dim)
    scores = qh @ kh.swapaxes(-1, -2)
    # the causal softmax: scale, mask and the maximum in one compiled pass, numpy's vector exp, then the sums
    causal_scores(scores, q.dtype.type(1.0 / math.sqrt(c.head_dim)), n_ctx)
    np.exp(scores, out=scores)
    normalize_causal_rows(scores, n_ctx)
    out = tokens_layout(scores @ vh, n_batch, n_ctx, c.n_head_kv, group, c.head_dim)
    return out, (qh, kh, vh, scores)


def attention_bwd(dout, saved, n_batch, n_ctx, config):
    c = config
    group = c.n_head // c.n_head_kv
    qh, kh, vh, p = saved
    do = heads_layout(dout, n_batch, n_ctx, c.n_head_kv, group, c.head_dim)
    dp = do @ vh.swapaxes(-1, -2)
    dv = p.swapaxes(-1, -2) @ do
    softmax_bwd_rows(p, dp, dout.dtype.type(1.0 / math.sqrt(c.head_dim)), n_ctx)
    ds = dp
    dq = ds @ kh
    dk = ds.swapaxes(-1, -2) @ qh
    return (tokens_layout(dq, n_batch, n_ctx, c.n_head_kv, group, c.head_dim),
            tokens_layout(dk, n_batch, n_ctx, c.n_head_kv, 1, c.head_dim),
            tokens_layout(dv, n_batch, n_ctx, c.n_head_kv, 1, c.head_dim))


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
    n = x.shape[0]
    cos, sin = tables
    h1, xn1, rstd1 = rms_norm_fwd(x, layer["attn_norm"], c.rms_eps)
    q, uq = linear_fwd(layer["attn_q"], h1, loras["attn_q"])
    k, uk = linear_fwd(layer["attn_k"], h1, loras["attn_k"])
    v, uv = linear_fwd(layer["attn_v"], h1, loras["attn_v"])
    q = rope(q.reshape(n, c.n_head, c.head_dim), cos, sin, c.rope_dim).reshape(n, -1)
    k = rope(k.reshape(n, c.n_head_kv, c.head_dim), cos, sin, c.rope_dim).reshape(n, -1)
    o, att = attention_fwd(q, k, v, n_batch, n_ctx, c)
    x2, uo = linear_fwd(layer["attn_output"], o, loras["attn_output"])
    h2, xn2, rstd2 = rms_norm_fwd(x2, layer["ffn_norm"], c.rms_eps, residual=x)  # x2 = x + attention
    g, ug = linear_fwd(layer["ffn_gate"], h2, loras["ffn_gate"])
    up, uu = linear_fwd(layer["ffn_up"], h2, loras["ffn_up"])
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
    c = config
    n = dx3.shape[0]
    cos, sin = tables
    s = saved
    dact = np.empty_like(s["act"])
    linear_bwd(layer["ffn_down"], s["act"], s["ud"], dx3, loras["ffn_down"], names["ffn_down"], grads, dact, False)
    dg, dup = swiglu_bwd(dact, s["g"], s["up"], s["sig"], dact.dtype.type(1.0))
    dh2 = np.empty_like(s["h2"])
    linear_bwd(layer["ffn_gate"], s["h2"], s["ug"], dg, loras["ffn_gate"], names["ffn_gate"], grads, dh2, False)
    linear_bwd(layer["ffn_up"], s["h2"], s["uu"], dup, loras["ffn_up"], names["ffn_up"], grads, dh2)
    dx2 = rms_norm_bwd(dh2, layer["ffn_norm"], s["xn2"], s["rstd2"], out=dx3)  # dx3 is not needed after
    do = np.empty_like(s["o"])
    linear_bwd(layer["attn_output"], s["o"], s["uo"], dx2, loras["attn_output"], names["attn_output"], grads, do,
               False)
    dq, dk, dv = attention_bwd(do, s["att"], n_batch, n_ctx, c)
    dq = rope(dq.reshape(n, c.n_head, c.head_dim), cos, sin, c.rope_dim, inverse=True).reshape(n, -1)
    dk = rope(dk.reshape(n, c.n_head_kv, c.head_dim), cos, sin, c.rope_dim, inverse=True).reshape(n, -1)
    dh1 = np.empty_like(s["h1"]) if need_dx else None
    linear_bwd(layer["attn_q"], s["h1"], s["uq"], dq, loras["attn_q"], names["attn_q"], grads, dh1, False)
    linear_bwd(layer["attn_k"], s["h1"], s["uk"], dk, loras["attn_k"], names["attn_k"], grads, dh1)
    linear_bwd(layer["attn_v"], s["h1"], s["uv"], dv, loras["attn_v"], names["attn_v"], grads, dh1)
    if not need_dx:
        return None
    return rms_norm_bwd(dh1, layer["attn_norm"], s["xn1"], s["rstd1"], out=dx2)


def layer_loras(params: dict, scales: dict, i: int):
    names = {part: f"blk.{i}.{part}.weight" for part in PROJECTIONS}
    loras = {part: ((params[f"{name}.lora_a"], params[f"{name}.lora_b"], scales[name])
                    if f"{name}.lora_a" in params else None) for part, name in names.items()}
    return loras, names


# ---- the whole model ----

# Rows of logits taken together while they stay in the cache: the exponentials by numpy's vector exp between
# two compiled passes, so that the [tokens, vocabulary] array goes through memory once instead of once per operation.
CROSS_ENTROPY_ROWS = 8


def cross_entropy(logits, targets, grad_scale=1.0):
    """Mean negative log-likelihood and its gradient wrt logits, (softmax - one-hot) · grad_scale / n, computed
    in place."""
    n = logits.shape[0]
    targets = np.ascontiguousarray(targets, dtype=np.int64)
    scale = logits.dtype.type(1.0 / n if grad_scale == 1.0 else grad_scale / n)
    picked = np.empty(n, dtype=logits.dtype)
    losses = np.empty(n, dtype=np.float64)
    for r0 in range(0, n, CROSS_ENTROPY_ROWS):
        rows = slice(r0, min(n, r0 + CROSS_ENTROPY_ROWS))
        block = logits[rows]
        block -= block.max(axis=-1, keepdims=True)
        picked[rows] = block[np.arange(block.shape[0]), targets[rows]]
        np.exp(block, out=block)
        softmax_minus_onehot(block, targets[rows], picked[rows], scale, losses[rows])
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
    tables = rope_for(c, n_batch, n_ctx, dtype)
    x = rows(base.token_embd, tokens.reshape(-1)).astype(dtype, copy=False)
    kept = []
    for i, layer in enumerate(base.layers):
        loras, _ = layer_loras(params, scales, i)
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
        loras, names = layer_loras(params, scales, i)
        saved = kept.pop()
        if checkpointing:
            _, saved = block_fwd(layer, loras, saved, n_batch, n_ctx, c, tables)
        dx = block_bwd(layer, loras, names, saved, dx, n_batch, n_ctx, c, tables, grads, need_dx=i > 0)
        del saved
    return loss


def zeros_like_params(params: dict) -> dict:
    return {name: np.zeros_like(p) for name, p in params.items()}
