"""GGUF LoRA adapters as llama.cpp reads them today (convert_lora_to_gguf.py's output), written and read.

Metadata: general.architecture, general.type = 'adapter', adapter.type = 'lora', adapter.lora.alpha (float).
Tensors `<weight name>.lora_a` (numpy [r, n_in], ggml ne [n_in, r]) and `.lora_b` (numpy [n_out, r]).
llama.cpp scales each pair by alpha / r, r taken from that pair's own shape, so rank_pattern needs
nothing special; a tensor whose scale differs from that (alpha_pattern, rsLoRA) has the ratio folded into B.
"""

import numpy as np
from gguf import GGMLQuantizationType as GGMLType

from .. import kernels
from ..errors import AdapterError, ModelFileError
from ..model_file import load_model_file
from .adapter import LoraAdapter, LoraTensor, b_for_file_scale


def write_gguf_adapter(path: str, adapter: LoraAdapter, architecture: str = "llama", dtype=np.float32) -> None:
    import gguf

    alpha = float(adapter.alpha)
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, t in adapter.tensors.items():
        r = t.a.shape[0]
        file_scale = alpha / r if alpha > 0 else 1.0  # llama.cpp: no alpha means scale 1
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(t.a, dtype=dtype))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b_for_file_scale(t, file_scale), dtype=dtype))
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
    halves: dict[str, dict[str, np.ndarray]] = {}
    for name, t in adapter_file.tensors.items():
        if name.endswith(".lora_a") or name.endswith(".lora_b"):
            base, which = name[: -len(".lora_a")], name[-1].upper()
        else:
            raise AdapterError(f"{path}: tensor {name} is neither a .lora_a nor a .lora_b")
        if t.type not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16) or len(t.shape) != 2:
            raise AdapterError(f"{path}: tensor {name} is {t.type.name} with {len(t.shape)} dims; "
                               "LoRA matrices must be 2-D F32, F16 or BF16")
        halves.setdefault(base, {})[which] = np.array(kernels.dequantize(t.type, t.data, t.n_cols), dtype=np.float32)
    ranks = set()
    adapter = LoraAdapter(path, alpha=alpha)
    for base, part in halves.items():
        if "A" not in part or "B" not in part:
            raise AdapterError(f"{path}: {base} has no lora_{'b' if 'B' not in part else 'a'}")
        a, b = part["A"], part["B"]
        r = a.shape[0]
        ranks.add(r)
        adapter.tensors[base] = LoraTensor(a, b, alpha / r if alpha > 0 else 1.0)
    adapter.r = ranks.pop() if len(ranks) == 1 else 0
    return adapter
