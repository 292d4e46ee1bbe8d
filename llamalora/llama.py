"""The LLaMA forward pass: token ids in, logits out, with a KV cache.

RMSNorm, RoPE in GGUF's layout (adjacent pairs rotate together: the converter permuted the q/k rows
for it), grouped-query attention and a SwiGLU feed-forward. Activations stay in float32 throughout;
the weights stay in their file type and are read by llamalora.kernels block by block.

Qwen2 is the same network with biases on the q, k and v projections and llama.cpp's NEOX RoPE: its
converter leaves q/k rows in Hugging Face's order, so feature i pairs with feature i + rope_dim/2.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from . import decode, kernels
from .errors import ModelFileError
from .ops import attention, rms_norm, rope_inplace, rope_tables, swiglu  # noqa: F401 (rope_tables: finetune)
from .tensor import Tensor

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# Architectures whose q/k rows are in Hugging Face's order (llama.cpp's LLAMA_ROPE_TYPE_NEOX).
NEOX_ROPE_ARCHITECTURES = ("qwen2",)
# Biases an architecture must have (llama.cpp requires them for qwen2; a llama file may carry them too).
REQUIRED_BIASES = {"qwen2": ("attn_q", "attn_k", "attn_v")}
BIAS_PARTS = ("attn_q", "attn_k", "attn_v")


@dataclass(frozen=True)
class LlamaConfig:
    n_vocab: int
    dim: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    rope_base: float
    rope_dim: int
    rms_eps: float
    architecture: str = "llama"
    rope_neox: bool = False  # rotate pairs (i, i + rope_dim/2) instead of (2i, 2i + 1)
    rope_factors: tuple | None = None  # per-frequency divisors (linear scaling, llama 3's rope_freqs), or None

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @classmethod
    def from_metadata(cls, metadata: dict, path: str, n_vocab: int, rope_freqs: Tensor | None = None) -> "LlamaConfig":
        """The hyperparameters of a model file; rope_freqs is its rope_freqs.weight tensor, if it has one."""
        arch = metadata.get("general.architecture")
        if arch is None:
            raise ModelFileError(f"{path}: metadata has no general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelFileError(
                f"{path}: architecture '{arch}' is not supported (we run: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )

        def need(key):
            value = metadata.get(f"{arch}.{key}")
            if value is None:
                raise ModelFileError(f"{path}: missing hyperparameter {arch}.{key}")
            return value

        dim = int(need("embedding_length"))
        n_head = int(need("attention.head_count"))
        n_head_kv = int(metadata.get(f"{arch}.attention.head_count_kv", n_head))
        config = cls(
            n_vocab=n_vocab,
            dim=dim,
            n_layer=int(need("block_count")),
            n_head=n_head,
            n_head_kv=n_head_kv,
            n_ff=int(need("feed_forward_length")),
            n_ctx_train=int(need("context_length")),
            rope_base=float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_dim=int(metadata.get(f"{arch}.rope.dimension_count", dim // n_head)),
            rms_eps=float(need("attention.layer_norm_rms_epsilon")),
            architecture=arch,
            rope_neox=arch in NEOX_ROPE_ARCHITECTURES,
        )
        if n_head <= 0 or dim % n_head or n_head_kv <= 0 or n_head % n_head_kv:
            raise ModelFileError(
                f"{path}: head counts do not fit: embedding {dim}, heads {n_head}, kv heads {n_head_kv}"
            )
        if config.rope_dim > config.head_dim or config.rope_dim % 2:
            raise ModelFileError(f"{path}: rope dimension {config.rope_dim} does not fit head size {config.head_dim}")
        for key in ("attention.key_length", "attention.value_length"):
            value = metadata.get(f"{arch}.{key}")
            if value is not None and int(value) != config.head_dim:
                raise ModelFileError(f"{path}: {arch}.{key} is {value}; we run heads of embedding / heads = "
                                     f"{config.head_dim} values only")
        return dataclasses.replace(config, rope_factors=rope_factors(metadata, arch, path, config.rope_dim, rope_freqs))


def rope_factors(metadata: dict, arch: str, path: str, rope_dim: int, rope_freqs: Tensor | None) -> tuple | None:
    """The divisors of the rope_dim / 2 RoPE frequencies, as llama.cpp applies them: linear scaling's factor
    (`rope.scaling.type` linear, or the older `rope.scale_linear`) times llama 3's per-frequency factors (the
    rope_freqs tensor). Other scalings (YaRN, LongRoPE) are refused: they also change the attention itself."""
    kind = str(metadata.get(f"{arch}.rope.scaling.type", "none"))
    if kind not in ("none", "linear"):
        raise ModelFileError(f"{path}: {arch}.rope.scaling.type '{kind}' is not supported (we run none and linear)")
    linear = float(metadata.get(f"{arch}.rope.scaling.factor", 1.0) if kind == "linear"
                   else metadata.get(f"{arch}.rope.scale_linear", 1.0))
    if not (np.isfinite(linear) and linear > 0):
        raise ModelFileError(f"{path}: RoPE scaling factor {linear} is not a positive number")
    factors = np.full(rope_dim // 2, linear, dtype=np.float32)
    if rope_freqs is not None:
        values = as_f32_vector(rope_freqs)
        if values.shape != factors.shape or not np.all(np.isfinite(values) & (values > 0)):
            raise ModelFileError(f"{path}: tensor rope_freqs.weight must hold {rope_dim // 2} positive numbers "
                                 f"(it has shape {tuple(rope_freqs.shape)})")
        factors *= values
    return None if np.all(factors == 1) else tuple(float(f) for f in factors)


class KVCache:
    """Keys and values of every layer for positions 0..n-1; keys are stored already rotated."""

    def __init__(self, config: LlamaConfig, n_ctx: int):
        shape = (config.n_layer, n_ctx, config.n_head_kv, config.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.n_ctx = n_ctx
        self.n = 0
        self.config = config

    def clear(self, n: int = 0) -> None:
        """Forget every position from n on (the cache then holds the first n)."""
        self.n = min(self.n, n)

    def shift(self, n_keep: int, n_discard: int) -> None:
        """Drop positions [n_keep, n_keep + n_discard) and move the rest down, as llama.cpp's context shift.

        Moved keys are rotated back by n_discard positions (RoPE is a rotation, so this equals
        recomputing them at their new positions up to rounding).
        """
        start, end = n_keep + n_discard, self.n
        count = end - start
        if count > 0:
            c = self.config
            self.k[:, n_keep : n_keep + count] = self.k[:, start:end]
            self.v[:, n_keep : n_keep + count] = self.v[:, start:end]
            cos, sin = rope_tables(np.full(1, -n_discard, dtype=np.int64), c.rope_dim, c.rope_base, c.rope_factors)
            for layer in range(c.n_layer):
                block = self.k[layer, n_keep : n_keep + count]
                rope_inplace(block.reshape(count, -1, c.head_dim), np.repeat(cos, count, 0), np.repeat(sin, count, 0),
                             c.rope_neox)
        self.n = n_keep + max(count, 0)


class LoraDelta(NamedTuple):
    """One weight's run-time adapter delta: out = g ⊙ (W·x + s·B·(A·x)), g only for DoRA."""
    a: np.ndarray         # float32[r, n_cols]: A of every adapter on this weight, stacked along the rank
    packed_b: np.ndarray  # s·B stacked the same way, packed by kernels.pack_scaled_b
    g: np.ndarray | None = None  # DoRA's per-output scale m / ‖W + s·B·A‖, float32[n_rows]; None for LoRA


class LoraDeltas(dict):
    """{weight name: LoraDelta} of an adapter set, and the invocation tokens of an activated LoRA among them (None:
    the deltas apply to every position; generate.Context reads it)."""

    def __init__(self, deltas=(), invocation: tuple | None = None):
        super().__init__(deltas)
        self.invocation = invocation


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    attn_q: kernels.Weight
    attn_k: kernels.Weight
    attn_v: kernels.Weight
    attn_output: kernels.Weight
    ffn_norm: np.ndarray
    ffn_gate: kernels.Weight
    ffn_up: kernels.Weight
    ffn_down: kernels.Weight
    bias: dict = field(default_factory=dict)  # part name -> float32[n_rows] added after that linear (none for llama)


LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def layer_tensor_names(config: LlamaConfig) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"]
    for i in range(config.n_layer):
        names += [f"blk.{i}.{part}.weight" for part in LAYER_TENSORS]
        names += [f"blk.{i}.{part}.bias" for part in REQUIRED_BIASES.get(config.architecture, ())]
    return names


def expected_shape(name: str, config: LlamaConfig) -> tuple[int, ...]:
    c = config
    kv_dim = c.n_head_kv * c.head_dim
    part = name.split(".")[-2] if name.startswith("blk.") else name.rsplit(".", 1)[0]
    shape = {
        "token_embd": (c.n_vocab, c.dim),
        "output": (c.n_vocab, c.dim),
        "output_norm": (c.dim,),
        "attn_norm": (c.dim,),
        "ffn_norm": (c.dim,),
        "attn_q": (c.dim, c.dim),
        "attn_k": (kv_dim, c.dim),
        "attn_v": (kv_dim, c.dim),
        "attn_output": (c.dim, c.dim),
        "ffn_gate": (c.n_ff, c.dim),
        "ffn_up": (c.n_ff, c.dim),
        "ffn_down": (c.dim, c.n_ff),
    }[part]
    return shape[:1] if name.endswith(".bias") else shape


class LlamaModel:
    """Weights of a llama model and its forward pass. `tensors` maps GGUF names to Tensor."""

    def __init__(self, config: LlamaConfig, tensors: dict[str, Tensor], path: str = "<model>"):
        self.config = config
        self.path = path
        optional = [name for name in ["output.weight"] + bias_names(config) if name in tensors]
        for name in dict.fromkeys(layer_tensor_names(config) + optional):
            if name not in tensors:
                raise ModelFileError(f"{path}: tensor {name} is missing")
            want = expected_shape(name, config)
            if tuple(tensors[name].shape) != want:
                raise ModelFileError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {want}")
        self.tensors = tensors
        self.lora: dict = {}  # run-time adapter deltas by weight name (set_lora)
        self._stacked: dict = {}  # ids of A factors -> (the factors, their stack): stacked_a
        self._rope_rows: dict = {}  # position -> its rope tables (rope_row)
        self._decode_plan, self._decode_plan_layers = None, None
        self.token_embd = tensors["token_embd.weight"]
        # Tied embeddings: a model without output.weight projects with token_embd. The projection is named
        # output.weight all the same, so that a run-time delta of the embeddings (keyed token_embd.weight) stays on
        # the looked-up rows, as PEFT keeps lm_head's base matrix.
        self.output = dataclasses.replace(kernels.prepare(tensors.get("output.weight", self.token_embd)),
                                          name="output.weight")
        self.output_norm = as_f32_vector(tensors["output_norm.weight"])
        self.layers = [
            LayerWeights(
                **{
                    part: (as_f32_vector(t) if part.endswith("norm") else kernels.prepare(t))
                    for part in LAYER_TENSORS
                    for t in [tensors[f"blk.{i}.{part}.weight"]]
                },
                bias={
                    part: as_f32_vector(tensors[name])
                    for part in BIAS_PARTS
                    for name in [f"blk.{i}.{part}.bias"]
                    if name in tensors
                },
            )
            for i in range(config.n_layer)
        ]

    def new_cache(self, n_ctx: int) -> KVCache:
        return KVCache(self.config, n_ctx)

    def embed(self, tokens: np.ndarray, deltas: dict | None = None) -> np.ndarray:
        """The embedding rows of tokens (+ a run-time LoRA delta of token_embd: s·B[token]·A, PEFT's
        lora_embedding)."""
        t = self.token_embd
        tokens = np.asarray(tokens, dtype=np.int64)
        x = kernels.dequantize_rows(t.type, t.data, t.n_cols, tokens)
        delta = deltas.get(t.name) if deltas else None
        if delta is not None:
            r = delta.a.shape[0]
            scaled_b = delta.packed_b.reshape(-1, r, 16)[tokens // 16, :, tokens % 16]  # rows of s·B
            x += scaled_b @ delta.a
        return x

    def forward(self, tokens, cache: KVCache, all_logits: bool = False, lora: dict | None = None) -> np.ndarray:
        """Evaluate tokens at positions cache.n, cache.n+1, ...; returns logits float32[b or 1, n_vocab].

        lora: run-time adapter deltas for this call alone (from lora_deltas); None uses the model's own.
        """
        deltas = self.lora if lora is None else lora
        c = self.config
        tokens = np.asarray(tokens, dtype=np.int64)
        b = len(tokens)
        n_past = cache.n
        if n_past + b > cache.n_ctx:
            raise ValueError(f"{b} tokens at position {n_past} overflow the context of {cache.n_ctx}")
        if b <= decode.COLUMN_TOKENS:  # (the rows the one-token step takes, one per position)
            rows = [self.rope_row(p) for p in range(n_past, n_past + b)]
            cos, sin = (np.ascontiguousarray(np.concatenate([r[i] for r in rows])) for i in (0, 1))
        else:
            cos, sin = rope_tables(np.arange(n_past, n_past + b, dtype=np.int64), c.rope_dim, c.rope_base,
                                   c.rope_factors)
        x = np.ascontiguousarray(self.embed(tokens, deltas), dtype=np.float32)
        if 1 < b <= decode.COLUMN_TOKENS:  # a short chunk: its tokens as columns of the one-token step
            as_columns = (self.decode_plan(), x, [cache] * b, np.arange(n_past, n_past + b), cos, sin, c,
                          [deltas] * b)
            if not decode.columns_ready(*as_columns):
                logits = [self.forward(tokens[i:i + 1], cache, lora=deltas) for i in range(b)]
                decode.columns_ready(*as_columns)  # (the one-token step is compiled now: the columns' may start)
                return np.concatenate(logits) if all_logits else logits[-1]
            decode.run_columns(*as_columns)
        elif b == 1:
            decode.run_layers(self.decode_plan(), x[0], cache, cos, sin, c, deltas)
        else:
            self.forward_batch(x, cache, cos, sin, deltas)
        cache.n = n_past + b
        if not all_logits:
            x = x[-1:]
        h = rms_norm(x, self.output_norm, c.rms_eps)
        if 1 < len(h) <= decode.COLUMN_TOKENS:  # a short chunk's logits as its tokens one by one would get them
            out = np.empty((len(h), self.output.n_rows), dtype=np.float32)
            decode.linear_rows(self.output, h, out, [deltas] * len(h))
            return out
        return self.linear(self.output, h, deltas)

    def forward_batch(self, x: np.ndarray, cache: KVCache, cos, sin, deltas: dict) -> None:
        """x float32[b, dim] ← the hidden states after every layer, op by op (a prompt batch)."""
        self.forward_segments(x, [(cache, 0, x.shape[0], deltas)], cos, sin)

    def forward_segments(self, x: np.ndarray, segments: list, cos, sin) -> None:
        """forward_batch for the tokens of several sequences at once: segment (cache, start, end, deltas) holds rows
        start … end - 1 of x, at positions cache.n …, and its own run-time deltas (cos, sin: each row's position).
        Each weight's product runs once for all the rows, and every row's sums are those it gets alone (the matmul
        path sums token by token); each segment's deltas go on its own rows, its attention over its own cache.
        The caches' n are the caller's to move."""
        c = self.config
        b = x.shape[0]
        parts = [(start, end, deltas) for _, start, end, deltas in segments]
        attn_out = np.empty((b, c.n_head, c.head_dim), dtype=np.float32)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.attn_norm, c.rms_eps)
            q = self.linear(layer.attn_q, h, None, layer.bias.get("attn_q"), parts).reshape(b, c.n_head, c.head_dim)
            k = self.linear(layer.attn_k, h, None, layer.bias.get("attn_k"), parts).reshape(b, c.n_head_kv, c.head_dim)
            v = self.linear(layer.attn_v, h, None, layer.bias.get("attn_v"), parts).reshape(b, c.n_head_kv, c.head_dim)
            rope_inplace(q, cos, sin, c.rope_neox)
            rope_inplace(k, cos, sin, c.rope_neox)
            for cache, start, end, _ in segments:
                n_past = cache.n
                cache.k[i, n_past : n_past + end - start] = k[start:end]
                cache.v[i, n_past : n_past + end - start] = v[start:end]
                attention(q[start:end], cache.k[i], cache.v[i], n_past, attn_out[start:end])
            x += self.linear(layer.attn_output, attn_out.reshape(b, c.dim), None, layer.bias.get("attn_output"), parts)
            h = rms_norm(x, layer.ffn_norm, c.rms_eps)
            gate = self.linear(layer.ffn_gate, h, None, layer.bias.get("ffn_gate"), parts)
            up = self.linear(layer.ffn_up, h, None, layer.bias.get("ffn_up"), parts)
            x += self.linear(layer.ffn_down, swiglu(gate, up), None, layer.bias.get("ffn_down"), parts)

    def rope_row(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """rope_tables of one position, kept (a decode step would otherwise spend more on them than on its norms)."""
        row = self._rope_rows.get(position)
        if row is None:
            c = self.config
            row = self._rope_rows[position] = rope_tables(np.full(1, position, dtype=np.int64), c.rope_dim,
                                                          c.rope_base, c.rope_factors)
        return row

    def decode_plan(self) -> decode.LayerPlan:
        """The layers as the one-token step reads them, built on first use (and again if the layers change)."""
        if self._decode_plan is None or self._decode_plan_layers is not self.layers:
            self._decode_plan, self._decode_plan_layers = decode.LayerPlan(self.layers), self.layers
        return self._decode_plan

    def linear(self, weight: kernels.Weight, x: np.ndarray, deltas: dict | None, bias: np.ndarray | None = None,
               parts: list | None = None) -> np.ndarray:
        """y = x @ W.T (+ Σ s·(x @ A.T) @ B.T for run-time adapters) (+ bias); W stays in its file type.
        parts: [(start, end, deltas)], rows start … end - 1 with their own deltas (several sequences' tokens at once;
        None: every row with `deltas`)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], weight.n_rows), dtype=np.float32)
        if x.shape[0] == 1:
            kernels.matvec(weight, x[0], out[0])
        else:
            kernels.matmul(weight, x, out)
        for start, end, part_deltas in parts if parts is not None else [(0, x.shape[0], deltas)]:
            delta = part_deltas.get(weight.name) if part_deltas else None
            if delta is not None:
                if end - start == 1:
                    kernels.add_low_rank_matvec(delta.a, delta.packed_b, x[start], out[start])
                else:
                    kernels.add_low_rank_matmul(delta.a, delta.packed_b, x[start:end], out[start:end])
                if delta.g is not None:
                    out[start:end] *= delta.g
        if bias is not None:
            out += bias
        return out

    def lora_deltas(self, adapters, scales=None) -> dict:
        """Run-time deltas {weight name: LoraDelta} for adapters at scales (default: each adapter's own). Cheap for
        LoRA (no weight is touched, so any request may have its own); a DoRA tensor's g takes one pass over its W
        (lora/dora.py)."""
        from .lora import dora

        from .lora.replace import check_scales

        scales = [1.0] * len(adapters) if scales is None else list(scales)
        dora.check_combination(adapters, scales)
        check_scales(adapters, scales)
        deltas = LoraDeltas(invocation=activation(adapters, scales))
        names = {name for adapter in adapters for name in adapter.tensors}
        scratch = None
        for name in sorted(names):
            used = [(t, t.scale * user) for adapter, user in zip(adapters, scales)
                    for t in [adapter.tensors.get(name)] if t is not None and t.scale * user != 0]
            if not used:
                continue
            g = None
            if used[0][0].magnitude is not None:  # check_combination: a DoRA tensor is alone on its weight
                t, scale = used[0]
                tensor = self.tensors[name]
                if scratch is None or scratch.size < tensor.n_rows * tensor.n_cols:
                    scratch = np.empty(tensor.n_rows * tensor.n_cols, dtype=np.float32)
                g = dora.row_scale(tensor, t, scale, scratch)
            deltas[name] = LoraDelta(self.stacked_a([t.a for t, _ in used]),
                                     kernels.pack_scaled_b(np.concatenate([np.float32(s) * t.b for t, s in used],
                                                                          axis=1)), g)
        return deltas

    def stacked_a(self, factors: list) -> np.ndarray:
        """The A factors stacked along the rank, float32 C order: the same array for the same factors whatever the
        scales, so that a batched step's sequences of one adapter at different scales share each pass over A
        (kernels/int_columns.py groups them by A's address). Kept while the factors live (the key holds them)."""
        if len(factors) == 1:
            return np.ascontiguousarray(factors[0], dtype=np.float32)  # (the adapter's own array when it can be)
        key = tuple(id(a) for a in factors)
        found = self._stacked.get(key)
        if found is None or any(a is not b for a, b in zip(found[0], factors)):
            while len(self._stacked) >= 64:
                self._stacked.pop(next(iter(self._stacked)))
            found = self._stacked[key] = (list(factors), np.ascontiguousarray(np.concatenate(factors),
                                                                               dtype=np.float32))
        return found[1]

    def set_lora(self, adapters, scales=None) -> None:
        """Apply adapters unmerged from now on (y = W·x + Σ s·B·(A·x)); an empty list removes them."""
        self.lora = self.lora_deltas(adapters, scales)


def activation(adapters, scales) -> tuple | None:
    """The invocation tokens of the one active activated LoRA, None if no active adapter is one; an activated LoRA
    beside other active adapters is refused (each would start at another position)."""
    from .errors import AdapterError

    active = [adapter for adapter, scale in zip(adapters, scales) if scale != 0]
    activated = [adapter for adapter in active if adapter.invocation is not None]
    if not activated:
        return None
    if len(active) > 1:
        raise AdapterError(f"{activated[0].path}: an activated LoRA (alora_invocation_tokens) runs alone; "
                           f"{len(active) - 1} other adapter(s) are active beside it")
    return activated[0].invocation


def bias_names(config: LlamaConfig) -> list[str]:
    return [f"blk.{i}.{part}.bias" for i in range(config.n_layer) for part in BIAS_PARTS]


def as_f32_vector(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(kernels.dequantize(t.type, t.data, t.n_cols).reshape(-1), dtype=np.float32)
