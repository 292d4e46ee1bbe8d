"""Model files: GGUF v2/v3 (and the legacy ggjt v3 `.bin`) → metadata and tensors.

The file is memory-mapped and every tensor's data is a view on it: nothing is copied until something
must change it. Everything about the file is checked before it is used: magic, version, every length
against the file's size, every tensor's type and extent; a problem becomes one ModelFileError that
names the file and what is wrong.
"""

import os
import struct
from dataclasses import dataclass, field

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from . import kernels
from .errors import ModelFileError
from .tensor import Tensor

GGUF_MAGIC = b"GGUF"
GGJT_MAGIC = b"tjgg"  # "ggjt" as a little-endian uint32
DEFAULT_ALIGNMENT = 32

SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
SCALAR_DTYPES = {t: np.dtype(f) for t, f in SCALAR_FORMATS.items()}


@dataclass
class ModelFile:
    path: str
    format: str  # "gguf" or "ggjt"
    version: int
    metadata: dict = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    # GGUF value type of each metadata key (and of its elements, for arrays), so a writer can keep them.
    metadata_types: dict[str, tuple] = field(default_factory=dict)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")


def load_model_file(path: str, use_mmap: bool = True) -> ModelFile:
    """Read a GGUF or ggjt model file; tensors are views on the mapped (or, with use_mmap=False, read) bytes."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise ModelFileError(f"{path}: the file is empty")
        buf = np.memmap(path, dtype=np.uint8, mode="r") if use_mmap else np.fromfile(path, dtype=np.uint8)
    except ModelFileError:
        raise
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read the model file: {e.strerror or e}") from None
    magic = bytes(buf[:4])
    if magic == GGUF_MAGIC:
        return read_gguf(path, buf)
    if magic == GGJT_MAGIC:
        from .ggjt import read_ggjt

        return read_ggjt(path, buf)
    raise ModelFileError(f"{path}: not a GGUF or ggjt model file (magic {magic!r})")


class Cursor:
    """Reads little-endian values from the buffer, failing cleanly at the end of the file."""

    def __init__(self, path: str, buf: np.ndarray, offset: int = 0):
        self.path, self.buf, self.offset = path, buf, offset
        self.view = memoryview(buf)
        self.size = len(buf)

    def truncated(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: the file is truncated (reading {what} at byte {self.offset})")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        if self.offset + n > self.size:
            raise self.truncated(what)
        value = struct.unpack_from(fmt, self.view, self.offset)[0]
        self.offset += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        if self.offset + n > self.size:
            raise self.truncated(what)
        raw = self.view[self.offset : self.offset + n]
        self.offset += n
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise ModelFileError(f"{self.path}: {what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str):
        try:
            vtype = GGUFValueType(vtype)
        except ValueError:
            raise ModelFileError(f"{self.path}: {what} has unknown value type {vtype}") from None
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype != GGUFValueType.ARRAY:
            return self.scalar(SCALAR_FORMATS[vtype], what)
        etype = self.scalar("<I", what)
        count = self.scalar("<Q", what)
        try:
            etype = GGUFValueType(etype)
        except ValueError:
            raise ModelFileError(f"{self.path}: {what} has unknown element type {etype}") from None
        if etype in SCALAR_DTYPES:
            nbytes = count * SCALAR_DTYPES[etype].itemsize
            if self.offset + nbytes > self.size:
                raise self.truncated(what)
            values = np.frombuffer(self.view, SCALAR_DTYPES[etype], count, self.offset).tolist()
            self.offset += nbytes
            return values
        if count > self.size - self.offset:
            raise self.truncated(what)
        return [self.value(etype, what) for _ in range(count)]


def read_gguf(path: str, buf: np.ndarray) -> ModelFile:
    cur = Cursor(path, buf, 4)
    version = cur.scalar("<I", "the version")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise ModelFileError(f"{path}: GGUF version {version} is not supported (2 and 3 are){hint}")
    n_tensors = cur.scalar("<Q", "the tensor count")
    n_kv = cur.scalar("<Q", "the metadata count")
    metadata, metadata_types = {}, {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        vtype = cur.scalar("<I", f"the type of {key}")
        at = cur.offset
        metadata[key] = cur.value(vtype, f"metadata {key}")
        etype = struct.unpack_from("<I", cur.view, at)[0] if vtype == GGUFValueType.ARRAY else None
        metadata_types[key] = (GGUFValueType(vtype), None if etype is None else GGUFValueType(etype))
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name {i}")
        n_dims = cur.scalar("<I", f"tensor {name}")
        if n_dims > 4:
            raise ModelFileError(f"{path}: tensor {name} has {n_dims} dimensions (at most 4)")
        dims = [cur.scalar("<Q", f"tensor {name}") for _ in range(n_dims)]
        raw_type = cur.scalar("<I", f"tensor {name}")
        offset = cur.scalar("<Q", f"tensor {name}")
        infos.append((name, dims, raw_type, offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(f"{path}: general.alignment {alignment!r} is not a power of two")
    data_start = -(-cur.offset // alignment) * alignment
    tensors = {}
    for name, dims, raw_type, offset in infos:
        if name in tensors:
            raise ModelFileError(f"{path}: tensor {name} appears twice")
        tensors[name] = tensor_view(path, buf, name, list(reversed(dims)), raw_type, data_start + offset)
    return ModelFile(path, "gguf", version, metadata, tensors, metadata_types)


def tensor_view(path: str, buf: np.ndarray, name: str, shape: list[int], raw_type: int, start: int) -> Tensor:
    """The Tensor whose bytes start at `start`: its type and extent checked against the file."""
    try:
        ggml_type = GGMLQuantizationType(raw_type)
    except ValueError:
        raise ModelFileError(f"{path}: tensor {name} has unknown type {raw_type}") from None
    if ggml_type not in kernels.TYPES:
        raise ModelFileError(f"{path}: tensor {name} has type {ggml_type.name}, which is not supported "
                             f"(supported: {kernels.type_names()})")
    if not shape or any(d <= 0 for d in shape):
        raise ModelFileError(f"{path}: tensor {name} has an invalid shape {tuple(shape)}")
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    n_cols = shape[-1]
    if n_cols % block:
        raise ModelFileError(f"{path}: tensor {name} has rows of {n_cols} values, not whole {ggml_type.name} blocks of {block}")
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    row_nbytes = n_cols // block * type_size
    end = start + n_rows * row_nbytes
    if end > len(buf):
        raise ModelFileError(f"{path}: tensor {name} runs past the end of the file "
                             f"(bytes {start}..{end}, file size {len(buf)})")
    data = buf[start:end].reshape(n_rows, row_nbytes)
    return Tensor(name, ggml_type, tuple(shape), data)
