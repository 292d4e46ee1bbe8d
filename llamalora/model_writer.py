"""Writing GGUF model files: metadata with its value types, tensors as their raw bytes.

Tensors are written exactly as they lie in memory (Tensor.data, already in their ggml type), so
reading a file and writing it back gives the same bytes. The file is written next to its final path
and renamed into place at the end: a failure never leaves a half-written model behind.
"""

import os

import numpy as np
from gguf import GGUFValueType, GGUFWriter

from .errors import ModelFileError
from .tensor import Tensor

# Keys GGUFWriter writes itself (the architecture comes from its constructor, the alignment from
# add_custom_alignment), and GGUFReader's pseudo keys that describe the file rather than the model.
WRITER_KEYS = ("general.architecture", "general.alignment")
PSEUDO_KEY_PREFIX = "GGUF."


def infer_value_type(value) -> tuple[GGUFValueType, GGUFValueType | None]:
    """The GGUF type a python value is written as when the caller gives none (as llama.cpp's converters write it)."""
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL, None
    if isinstance(value, (int, np.integer)):
        return int_value_type([int(value)], unsigned_default=True), None
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32, None
    if isinstance(value, (str, bytes)):
        return GGUFValueType.STRING, None
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
        if not items:
            return GGUFValueType.ARRAY, None
        first = items[0]
        if isinstance(first, (bool, np.bool_)):
            return GGUFValueType.ARRAY, GGUFValueType.BOOL
        if isinstance(first, (int, np.integer)):
            # Integer arrays (token types) are INT32 in llama.cpp's files.
            return GGUFValueType.ARRAY, int_value_type([int(v) for v in items], unsigned_default=False)
        element, _ = infer_value_type(first)
        return GGUFValueType.ARRAY, element
    raise TypeError(f"cannot write a {type(value).__name__} as GGUF metadata")


def int_value_type(values: list[int], unsigned_default: bool) -> GGUFValueType:
    low, high = min(values), max(values)
    if low >= 0 and unsigned_default:
        return GGUFValueType.UINT32 if high < 2**32 else GGUFValueType.UINT64
    if -(2**31) <= low and high < 2**31:
        return GGUFValueType.INT32
    if low >= 0:
        return GGUFValueType.UINT64
    return GGUFValueType.INT64


def python_value(value, vtype: GGUFValueType):
    """The value as GGUFWriter packs it (plain python scalars, lists for arrays)."""
    if vtype == GGUFValueType.ARRAY:
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_gguf(path: str, metadata: dict, tensors, metadata_types: dict | None = None) -> str:
    """Write a GGUF v3 file: `metadata` (GGUF key -> python value) and `tensors` (dict or list of Tensor).

    metadata_types (key -> (GGUFValueType, element type or None), as ModelFile.metadata_types) keeps each
    key's type; keys it does not cover get one inferred from the value (non-negative int → UINT32,
    float → FLOAT32, integer arrays → INT32). Empty arrays are left out: GGUFWriter cannot write them.
    """
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(f"{path}: cannot write a model without general.architecture")
    tensor_list = list(tensors.values()) if isinstance(tensors, dict) else list(tensors)
    metadata_types = metadata_types or {}
    tmp_path = path + ".tmp"
    writer = GGUFWriter(tmp_path, arch)
    try:
        alignment = metadata.get("general.alignment")
        if alignment is not None:
            writer.add_custom_alignment(int(alignment))
        for key, value in metadata.items():
            if key in WRITER_KEYS or key.startswith(PSEUDO_KEY_PREFIX):
                continue
            vtype, element = metadata_types.get(key) or infer_value_type(value)
            vtype = GGUFValueType(vtype)
            if vtype == GGUFValueType.ARRAY and len(value) == 0:
                continue
            writer.add_key_value(key, python_value(value, vtype), vtype,
                                 sub_type=None if element is None else GGUFValueType(element))
        for tensor in tensor_list:
            add_raw_tensor(writer, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_path, path)
    except BaseException as e:
        writer.close()
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        if isinstance(e, OSError):
            raise ModelFileError(f"{path}: cannot write the model file: {e.strerror or e}") from None
        raise
    return path


def add_raw_tensor(writer: GGUFWriter, tensor: Tensor) -> None:
    """Queue the tensor's bytes as they are; GGUFWriter turns the byte shape back into values per row."""
    data = np.asarray(tensor.data, dtype=np.uint8)
    expected_rows = tensor.n_rows
    if data.ndim != 2 or data.shape[0] != expected_rows:
        raise ModelFileError(f"tensor {tensor.name}: data of shape {data.shape} does not hold {expected_rows} rows "
                             f"of shape {tuple(tensor.shape)}")
    # The byte shape: numpy shape with the last dimension in bytes (GGUFWriter reverses it into GGUF's ne order).
    byte_shape = (*tensor.shape[:-1], data.shape[1])
    writer.add_tensor(tensor.name, data.reshape(byte_shape), raw_shape=byte_shape, raw_dtype=tensor.type)
