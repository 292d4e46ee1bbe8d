"""PyTorch checkpoints (`torch.save` zip files such as adapter_model.bin) read without torch.

A pickle can call any importable function, so it is unpickled with an Unpickler that resolves only the
few names a saved state dict uses to build tensors (torch._utils._rebuild_tensor_v2, the typed storage
classes, collections.OrderedDict). Anything else the pickle asks for is refused before it is imported,
so a hostile file cannot run code. Tensors come back as numpy arrays that own their memory.
"""

import collections
import pickle
import zipfile
import zlib

import numpy as np

from ..errors import AdapterError

# what zipfile raises on a damaged archive (a mangled name, version, offset, size or compressed stream)
DAMAGED_ZIP = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, NotImplementedError, UnicodeDecodeError, EOFError,
               ValueError, OSError)

# torch storage class -> numpy dtype of one element; BFloat16 is read as raw uint16 and widened below.
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": np.uint16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class StorageType:
    """Stands in for torch.FloatStorage & co. inside the pickle: only its name matters."""

    def __init__(self, name: str):
        self.name = name


class Storage:
    """The flat bytes of one archive/data/<key> entry as a 1-D numpy array."""

    def __init__(self, values: np.ndarray, bfloat16: bool):
        self.values = values
        self.bfloat16 = bfloat16


def load_torch_file(path: str) -> dict[str, np.ndarray]:
    """name -> numpy array for every tensor of a torch.save'd state dict (zip format, torch >= 1.6)."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise AdapterError(f"{path}: not a zip-format PyTorch checkpoint (legacy torch.save files are not "
                           "supported; re-save it with torch >= 1.6 or as safetensors)") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise AdapterError(f"{path}: cannot read it: {e.strerror or e}") from None
    except DAMAGED_ZIP as e:
        raise AdapterError(f"{path}: the zip archive is damaged ({type(e).__name__}: {e})") from None
    with archive:
        try:
            state = read_state(path, archive)
        except AdapterError:
            raise
        except DAMAGED_ZIP as e:
            raise AdapterError(f"{path}: the zip archive is damaged ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise AdapterError(f"{path}: the pickle holds a {type(state).__name__}, not a state dict")
    out = {}
    for name, value in state.items():
        if not isinstance(value, np.ndarray):
            raise AdapterError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        out[str(name)] = value
    return out


def read_state(path: str, archive: zipfile.ZipFile):
    """The unpickled data.pkl of the archive."""
    pkl_names = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkl_names) != 1:
        raise AdapterError(f"{path}: expected one data.pkl in the archive, found {len(pkl_names)}")
    prefix = pkl_names[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in archive.namelist():
        byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
    if byteorder not in ("little", "big"):
        raise AdapterError(f"{path}: unknown byteorder {byteorder!r}")
    unpickler = RestrictedUnpickler(archive, prefix, path, "<" if byteorder == "little" else ">")
    try:
        return unpickler.load()
    except AdapterError:
        raise
    except Exception as e:  # a malformed pickle fails in many ways; all of them mean a bad file
        raise AdapterError(f"{path}: cannot unpickle {pkl_names[0]}: {type(e).__name__}: {e}") from None


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: str, endian: str):
        super().__init__(archive.open(prefix + "data.pkl"))
        self.archive, self.prefix, self.path, self.endian = archive, prefix, path, endian
        self.storages: dict[str, Storage] = {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self.rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)
        raise AdapterError(f"{self.path}: pickle asks for {module}.{name}, refused "
                           "(only tensors and dicts may be unpickled)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], StorageType)):
            raise AdapterError(f"{self.path}: unsupported persistent id in the pickle: {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if key not in self.storages:
            entry = f"{self.prefix}data/{key}"
            try:
                raw = self.archive.read(entry)
            except KeyError:
                raise AdapterError(f"{self.path}: storage {entry} is missing from the archive") from None
            dtype = np.dtype(STORAGE_DTYPES[storage_type.name]).newbyteorder(self.endian)
            if len(raw) < int(numel) * dtype.itemsize:
                raise AdapterError(f"{self.path}: storage {entry} holds {len(raw)} bytes, "
                                   f"{int(numel) * dtype.itemsize} expected")
            values = np.frombuffer(raw, dtype=dtype, count=int(numel))
            self.storages[key] = Storage(values, storage_type.name == "BFloat16Storage")
        return self.storages[key]

    def rebuild_tensor(self, storage, storage_offset, size, stride, *_ignored) -> np.ndarray:
        """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])."""
        if not isinstance(storage, Storage):
            raise AdapterError(f"{self.path}: a tensor in the pickle is not backed by a storage")
        size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset)
        values = storage.values
        if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
            raise AdapterError(f"{self.path}: tensor with size {size}, stride {stride}, offset {offset} is invalid")
        if 0 not in size:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= len(values):
                raise AdapterError(f"{self.path}: tensor with size {size}, stride {stride} and offset {offset} "
                                   f"reaches past its storage of {len(values)} elements")
        item = values.itemsize
        view = np.lib.stride_tricks.as_strided(values[offset:] if 0 not in size else values[:0], shape=size,
                                               strides=tuple(s * item for s in stride), writeable=False)
        array = np.array(view, dtype=values.dtype.newbyteorder("="))  # own copy, native byte order
        if storage.bfloat16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


def rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """torch._utils._rebuild_parameter: a Parameter is its tensor here."""
    return data
