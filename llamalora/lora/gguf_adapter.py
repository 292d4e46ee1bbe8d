"""GGUF LoRA adapters as llama.cpp reads them today (convert_lora_to_gguf.py's output), written and read.

Metadata: general.architecture, general.type = 'adapter', adapter.type = 'lora', adapter.lora.alpha (float).
Tensors `<weight name>.lora_a` (numpy [r, n_in], ggml ne [n_in, r]) and `.lora_b` (numpy [n_out, r]).
llama.cpp scales each pair by alpha / r, r taken from that pair's own shape, so rank_pattern needs
nothing special; a tensor whose scale differs from that (alpha_pattern, rsLoRA) has the ratio folded into B.

token_embd.weight's pair is stored as llama.cpp's converter stores it, laid out for the row lookup: lora_a numpy
[n_vocab, r] (our B: the delta of token t is s·lora_a[t]·lora_bᵀ) and lora_b numpy [n_embd, r] (our A transposed).

An activated LoRA carries adapter.alora.invocation_tokens (an array of token ids), the key llama.cpp reads.

DoRA adapters add `<weight name>.lora_m`, the magnitude vector (F32, numpy [n_out], in the GGUF file's row order:
q and k permuted like B's rows). llama.cpp has no DoRA: its adapter loader stops on the unknown suffix instead of
running the pair as plain LoRA.
"""

import numpy as np
from gguf import GGMLQuantizationType as GGMLType

from .. import kernels
from ..errors import AdapterError, ModelFileError
from ..model_file import load_model_file
from .adapter import LoraAdapter, LoraTensor, b_for_file_scale

EMBEDDINGS = "token_embd.weight"


def write_gguf_adapter(path: str, adapter: LoraAdapter, architecture: str = "llama", dtype=np.float32) -> None:
    import gguf

    alpha = float(adapter.alpha)
    if adapter.replaced:
        raise AdapterError(f"{path}: a GGUF adapter holds LoRA pairs, not the whole tensors this adapter replaces "
                           f"({', '.join(sorted(adapter.replaced))}); keep the PEFT folder")
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    if adapter.invocation is not None:
        writer.add_array(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, [int(t) for t in adapter.invocation])
    for name, t in adapter.tensors.items():
        r = t.a.shape[0]
        file_scale = alpha / r if alpha > 0 else 1.0  # llama.cpp: no alpha means scale 1
        a, b = t.a, b_for_file_scale(t, file_scale)
        if name == EMBEDDINGS:
            a, b = b, a.T
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=dtype))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=dtype))
        if t.magnitude is not None:  # (float32 whatever dtype is: g = m / ‖W + s·B·A‖ scales every output)
            writer.add_tensor(f"{name}.lora_m", np.ascontiguousarray(t.magnitude, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_gguf_adapter(path: str, architecture: str | None = None) -> LoraAdapter:
    """Read a GGUF adapter (through the model file parser, which checks every length and extent); with
    `architecture` given, refuse an adapter made for another one."""
    try:
        adapter_file = load_model_file(path)
    except ModelFileError as e:
        raise AdapterError(str(e)) from None
    if adapter_file.format != "gguf":
        raise AdapterError(f"{path}: not a GGUF adapter (a {adapter_file.format} file)")
    fields = adapter_file.metadata
    file_type = fields.get("general.type")
    if file_type != "adapter":
        raise AdapterError(f"{path}: general.type is {file_type!r}, not 'adapter' (a model, not a LoRA adapter?)")
    if fields.get("adapter.type") != "lora":
        raise AdapterError(f"{path}: adapter.type is {fields.get('adapter.type')!r}, only 'lora' is supported")
    arch = fields.get("general.architecture")
    if architecture and arch != architecture:
        raise AdapterError(f"{path}: adapter is for architecture {arch!r}, the model is {architecture!r}")
    alpha = fields.get("adapter.lora.alpha") or 0.0
    if not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or alpha < 0:
        raise AdapterError(f"{path}: adapter.lora.alpha is {alpha!r}, not a non-negative number")
    alpha = float(alpha)
    invocation = fields.get("adapter.alora.invocation_tokens")
    if invocation is not None and (not isinstance(invocation, list) or not invocation
                                   or not all(isinstance(t, int) and t >= 0 for t in invocation)):
        raise AdapterError(f"{path}: adapter.alora.invocation_tokens is not a non-empty array of token ids")
    halves: dict[str, dict[str, np.ndarray]] = {}
    for name, t in adapter_file.tensors.items():
        if name.endswith((".lora_a", ".lora_b", ".lora_m")):
            base, which = name[: -len(".lora_a")], name[-1].upper()
        else:
            raise AdapterError(f"{path}: tensor {name} is neither a .lora_a nor a .lora_b (nor DoRA's .lora_m)")
        dims = 1 if which == "M" else 2
        if t.type not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16) or len(t.shape) != dims:
            raise AdapterError(f"{path}: tensor {name} is {t.type.name} with {len(t.shape)} dims; "
                               + ("a DoRA magnitude must be a 1-D" if dims == 1 else "LoRA matrices must be 2-D")
                               + " F32, F16 or BF16")
        halves.setdefault(base, {})[which] = np.array(kernels.dequantize(t.type, t.data, t.n_cols),
                                                      dtype=np.float32).reshape(t.shape)
    ranks = set()
    adapter = LoraAdapter(path, alpha=alpha, invocation=None if invocation is None else tuple(int(t) for t in invocation))
    for base, part in halves.items():
        if "A" not in part or "B" not in part:
            raise AdapterError(f"{path}: {base} has no lora_{'b' if 'B' not in part else 'a'}")
        a, b, magnitude = part["A"], part["B"], part.get("M")
        if base == EMBEDDINGS:
            a, b = np.ascontiguousarray(b.T), np.ascontiguousarray(a)
        r = a.shape[0]
        ranks.add(r)
        if magnitude is not None and magnitude.shape != (b.shape[0],):
            raise AdapterError(f"{path}: {base}.lora_m has shape {magnitude.shape}, lora_b has {b.shape[0]} rows")
        adapter.tensors[base] = LoraTensor(a, b, alpha / r if alpha > 0 else 1.0, magnitude)
    adapter.r = ranks.pop() if len(ranks) == 1 else 0
    return adapter
