"""Model files: reading GGUF and legacy ggjt, writing GGUF, and one clean error line for every broken file."""

import os
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as GGMLType
from gguf import GGUFValueType
from tiny_model import make_tiny_llama

from llamalora.cli import cli
from llamalora.errors import ModelFileError
from llamalora.ggjt import ggjt_tensor_name, gguf_tensor_name, write_ggjt
from llamalora.loader import load_model
from llamalora.model_file import load_model_file
from llamalora.model_writer import write_gguf
from llamalora.tensor import Tensor

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def skip_value(data: bytes, off: int, vtype: int) -> int:
    if vtype in SCALAR_SIZES:
        return off + SCALAR_SIZES[vtype]
    if vtype == GGUFValueType.STRING:
        return off + 8 + struct.unpack_from("<Q", data, off)[0]
    etype, count = struct.unpack_from("<IQ", data, off)
    off += 12
    for _ in range(count):
        off = skip_value(data, off, etype)
    return off


def gguf_layout(path) -> tuple[bytes, dict, dict]:
    """The file's bytes, key -> (key start, value start, value end), tensor -> (type field at, offset field at)."""
    data = open(path, "rb").read()
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    off, keys, tensors = 24, {}, {}
    for _ in range(n_kv):
        start = off
        n = struct.unpack_from("<Q", data, off)[0]
        key = data[off + 8 : off + 8 + n].decode()
        vtype = struct.unpack_from("<I", data, off + 8 + n)[0]
        value_start = off + 12 + n
        off = skip_value(data, value_start, vtype)
        keys[key] = (start, value_start, off)
    for _ in range(n_tensors):
        n = struct.unpack_from("<Q", data, off)[0]
        name = data[off + 8 : off + 8 + n].decode()
        off += 8 + n
        n_dims = struct.unpack_from("<I", data, off)[0]
        off += 4 + 8 * n_dims
        tensors[name] = (off, off + 4)
        off += 12
    return data, keys, tensors


def memmap_of(array: np.ndarray):
    """The np.memmap of the whole file an array is a view of (the last memmap down its base chain), if any."""
    found = None
    while isinstance(array, np.ndarray):
        if isinstance(array, np.memmap) and getattr(array, "filename", None):
            found = array
        array = array.base
    return found


# SmolLM2 as shipped: GGUF v3


@pytest.fixture(scope="module")
def smollm2_file(smollm2_path):
    return load_model_file(smollm2_path)


def test_smollm2_gguf_header_and_metadata(smollm2_file):
    f = smollm2_file
    assert (f.format, f.version, f.architecture) == ("gguf", 3, "llama")
    assert len(f.tensors) == 272
    m = f.metadata
    assert m["llama.block_count"] == 30
    assert m["llama.embedding_length"] == 576
    assert m["llama.feed_forward_length"] == 1536
    assert (m["llama.attention.head_count"], m["llama.attention.head_count_kv"]) == (9, 3)
    assert m["llama.rope.freq_base"] == 100000.0
    assert m["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert m["tokenizer.ggml.model"] == "gpt2"
    assert len(m["tokenizer.ggml.tokens"]) == 49152
    assert m["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert f.metadata_types["llama.block_count"] == (GGUFValueType.UINT32, None)
    assert f.metadata_types["tokenizer.ggml.token_type"] == (GGUFValueType.ARRAY, GGUFValueType.INT32)


def test_smollm2_tensor_shapes_and_types(smollm2_file):
    t = smollm2_file.tensors
    assert t["token_embd.weight"].shape == (49152, 576)
    assert t["blk.0.attn_q.weight"].shape == (576, 576)
    assert t["blk.0.attn_k.weight"].shape == (192, 576)
    assert t["blk.29.ffn_down.weight"].shape == (576, 1536)
    assert t["output_norm.weight"].type == GGMLType.F32
    assert t["blk.0.attn_q.weight"].type == GGMLType.Q4_1
    # Q4_1: 32 values in 20 bytes
    assert t["blk.0.attn_q.weight"].data.shape == (576, 576 // 32 * 20)
    assert "output.weight" not in t  # tied embeddings


def test_smollm2_tensors_are_views_on_the_mapped_file(smollm2_file, smollm2_path):
    for name in ("token_embd.weight", "blk.7.ffn_up.weight", "output_norm.weight"):
        mapped = memmap_of(smollm2_file.tensors[name].data)
        assert mapped is not None, name
        assert os.path.samefile(mapped.filename, smollm2_path)
        assert mapped.nbytes == os.path.getsize(smollm2_path)  # the whole file, not a copy of the tensor


def test_no_mmap_reads_the_same_bytes(smollm2_file, smollm2_path):
    read = load_model_file(smollm2_path, use_mmap=False)
    assert read.metadata == smollm2_file.metadata
    assert list(read.tensors) == list(smollm2_file.tensors)
    assert memmap_of(read.tensors["token_embd.weight"].data) is None
    for name, tensor in smollm2_file.tensors.items():
        other = read.tensors[name]
        assert (other.type, other.shape) == (tensor.type, tensor.shape)
        assert np.array_equal(other.data, tensor.data), name


# Writing GGUF


def test_write_gguf_round_trip_of_smollm2(smollm2_file, tmp_path):
    out = str(tmp_path / "copy.gguf")
    write_gguf(out, smollm2_file.metadata, smollm2_file.tensors, smollm2_file.metadata_types)
    assert os.listdir(tmp_path) == ["copy.gguf"]
    copy = load_model_file(out)
    assert copy.metadata == smollm2_file.metadata
    assert copy.metadata_types == smollm2_file.metadata_types
    assert list(copy.tensors) == list(smollm2_file.tensors)
    for name, tensor in smollm2_file.tensors.items():
        other = copy.tensors[name]
        assert (other.type, other.shape) == (tensor.type, tensor.shape), name
        assert np.array_equal(other.data, tensor.data), name


def test_write_gguf_infers_value_types(tmp_path):
    x = np.arange(64, dtype=np.float32).reshape(2, 32)
    metadata = {"general.architecture": "llama", "a.uint": 7, "a.int": -7, "a.float": 0.5, "a.bool": True,
                "a.str": "é", "a.strs": ["x", "y"], "a.ints": [1, 2, 3], "a.floats": [0.25, -1.0]}
    out = write_gguf(str(tmp_path / "t.gguf"), metadata, [Tensor("w", GGMLType.F32, (2, 32), x.view(np.uint8))])
    f = load_model_file(out)
    assert f.metadata == metadata
    assert f.metadata_types == {
        "general.architecture": (GGUFValueType.STRING, None),
        "a.uint": (GGUFValueType.UINT32, None), "a.int": (GGUFValueType.INT32, None),
        "a.float": (GGUFValueType.FLOAT32, None), "a.bool": (GGUFValueType.BOOL, None),
        "a.str": (GGUFValueType.STRING, None), "a.strs": (GGUFValueType.ARRAY, GGUFValueType.STRING),
        "a.ints": (GGUFValueType.ARRAY, GGUFValueType.INT32), "a.floats": (GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
    }
    assert np.array_equal(f.tensors["w"].data.view(np.float32), x)


def test_write_gguf_keeps_given_types(tmp_path):
    metadata = {"general.architecture": "llama", "k": 3, "arr": [1, 2]}
    types = {"k": (GGUFValueType.UINT64, None), "arr": (GGUFValueType.ARRAY, GGUFValueType.UINT8)}
    f = load_model_file(write_gguf(str(tmp_path / "t.gguf"), metadata, [], types))
    assert f.metadata == metadata
    assert f.metadata_types["k"] == (GGUFValueType.UINT64, None)
    assert f.metadata_types["arr"] == (GGUFValueType.ARRAY, GGUFValueType.UINT8)


def test_write_gguf_failure_leaves_no_file(tmp_path):
    bad = Tensor("w", GGMLType.Q4_1, (4, 32), np.zeros((3, 20), dtype=np.uint8))  # 3 rows for a 4-row shape
    with pytest.raises(ModelFileError, match="tensor w"):
        write_gguf(str(tmp_path / "t.gguf"), {"general.architecture": "llama"}, [bad])
    assert os.listdir(tmp_path) == []


def test_tiny_model_is_reproducible(tmp_path):
    a = make_tiny_llama(tmp_path / "a.gguf", seed=3)
    b = make_tiny_llama(tmp_path / "b.gguf", seed=3)
    c = make_tiny_llama(tmp_path / "c.gguf", seed=4)
    assert open(a, "rb").read() == open(b, "rb").read()
    assert open(a, "rb").read() != open(c, "rb").read()
    f = load_model_file(a)
    assert f.tensors["blk.1.attn_k.weight"].shape == (32, 64)
    assert f.tensors["blk.1.attn_k.weight"].type == GGMLType.Q4_1


# Legacy ggjt


@pytest.fixture(scope="module")
def ggjt_twins(tmp_path_factory):
    """The same tiny model as GGUF and as ggjt v3 (kv heads = heads: ggjt cannot store fewer)."""
    d = tmp_path_factory.mktemp("twins")
    gguf_path = make_tiny_llama(d / "tiny.gguf", n_head_kv=4, seed=1)
    source = load_model_file(gguf_path)
    ggjt_path = write_ggjt(str(d / "tiny.bin"), source.metadata, source.tensors)
    return gguf_path, ggjt_path


def test_ggjt_reads_as_the_same_model(ggjt_twins):
    gguf_path, ggjt_path = ggjt_twins
    a, b = load_model_file(gguf_path), load_model_file(ggjt_path)
    assert (b.format, b.version) == ("ggjt", 3)
    assert open(ggjt_path, "rb").read(4) == b"tjgg"
    assert list(b.tensors) == list(a.tensors)
    for name, tensor in a.tensors.items():
        assert (b.tensors[name].type, b.tensors[name].shape) == (tensor.type, tensor.shape), name
        assert np.array_equal(b.tensors[name].data, tensor.data), name
    assert memmap_of(b.tensors["blk.0.ffn_up.weight"].data) is not None
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                "llama.feed_forward_length", "llama.attention.head_count_kv", "llama.context_length",
                "llama.attention.layer_norm_rms_epsilon"):
        assert b.metadata[key] == a.metadata[key], key


def test_ggjt_twin_gives_identical_logits(ggjt_twins):
    gguf_path, ggjt_path = ggjt_twins
    a, b = load_model(gguf_path, progress=False), load_model(ggjt_path, progress=False)
    assert a.model.config == b.model.config
    text = "hello world, the tiny llama was a story"
    tokens = a.vocab.tokenize(text)
    assert tokens == b.vocab.tokenize(text)
    assert len(tokens) > 5
    la = a.model.forward(np.array(tokens), a.model.new_cache(64), all_logits=True)
    lb = b.model.forward(np.array(tokens), b.model.new_cache(64), all_logits=True)
    assert la.shape == (len(tokens), a.vocab.n_vocab)
    assert la.std() > 0.05  # not a degenerate model
    assert np.array_equal(la, lb)


def test_ggjt_converts_to_gguf_with_its_types(ggjt_twins, tmp_path):
    ggjt = load_model_file(ggjt_twins[1])
    out = write_gguf(str(tmp_path / "converted.gguf"), ggjt.metadata, ggjt.tensors, ggjt.metadata_types)
    converted = load_model_file(out)
    assert converted.format == "gguf"
    assert converted.metadata == ggjt.metadata
    assert converted.metadata_types == ggjt.metadata_types
    assert converted.metadata_types["llama.context_length"] == (GGUFValueType.UINT32, None)
    for name, tensor in ggjt.tensors.items():
        assert np.array_equal(converted.tensors[name].data, tensor.data), name


def test_ggjt_names_match_the_gguf_package_map():
    # The gguf package's own LLaMA name map (what llama.cpp's ggml-to-gguf converter uses), as an independent check.
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3)
    ggjt_names = ["tok_embeddings.weight", "norm.weight", "output.weight"] + [
        f"layers.{i}.{part}.weight" for i in range(3)
        for part in ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "attention_norm",
                     "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "ffn_norm")]
    for name in ggjt_names:
        expected = name_map.get_name(name, try_suffixes=(".weight",))
        assert gguf_tensor_name(name) == expected, name
        assert ggjt_tensor_name(expected) == name
    assert gguf_tensor_name("layers.0.attention.wq.bias") is None


def test_ggjt_v2_quantized_is_refused(ggjt_twins, tmp_path):
    data = bytearray(open(ggjt_twins[1], "rb").read())
    data[4:8] = struct.pack("<I", 2)
    path = tmp_path / "v2.bin"
    path.write_bytes(data)
    with pytest.raises(ModelFileError, match=r"v2\.bin: tensor tok_embeddings\.weight is Q4_1 in a ggjt v2 file"):
        load_model_file(str(path))


def test_ggjt_unknown_tensor_name(tmp_path):
    gguf_path = make_tiny_llama(tmp_path / "t.gguf", n_head_kv=4)
    data = bytearray(open(write_ggjt(str(tmp_path / "t.bin"), **ggjt_args(gguf_path)), "rb").read())
    at = data.index(b"layers.1.feed_forward.w3.weight")
    data[at : at + 8] = b"lazers.1"
    (tmp_path / "t.bin").write_bytes(data)
    with pytest.raises(ModelFileError, match=r"t\.bin: tensor lazers\.1\.feed_forward\.w3\.weight is not a LLaMA tensor"):
        load_model_file(str(tmp_path / "t.bin"))


def ggjt_args(gguf_path):
    f = load_model_file(gguf_path)
    return {"metadata": f.metadata, "tensors": f.tensors}


# Broken files through the CLI: one line naming the file and the fault, exit code 1, nothing written


def patched(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


def bad_magic(src):
    data, _, _ = gguf_layout(src)
    return patched(data, 0, b"GGUX"), "not a GGUF or ggjt model file"


def truncated_header(src):
    data, _, _ = gguf_layout(src)
    return data[:12], "truncated (reading the tensor count"


def truncated_metadata(src):
    data, keys, _ = gguf_layout(src)
    _, start, end = keys["tokenizer.ggml.tokens"]
    return data[: (start + end) // 2], "truncated (reading metadata tokenizer.ggml.tokens"


def tensor_past_end(src):
    data, _, tensors = gguf_layout(src)
    return patched(data, tensors["blk.1.ffn_up.weight"][1], struct.pack("<Q", len(data))), \
        "tensor blk.1.ffn_up.weight runs past the end of the file"


def unknown_tensor_type(src):
    data, _, tensors = gguf_layout(src)
    return patched(data, tensors["blk.0.attn_v.weight"][0], struct.pack("<I", 99)), \
        "tensor blk.0.attn_v.weight has unknown type 99"


def unsupported_tensor_type(src):
    data, _, tensors = gguf_layout(src)
    return patched(data, tensors["blk.0.attn_v.weight"][0], struct.pack("<I", int(GGMLType.IQ2_XXS))), \
        "tensor blk.0.attn_v.weight has type IQ2_XXS, which is not supported"


def missing_hyperparameter(src):
    data, keys, _ = gguf_layout(src)
    start = keys["llama.block_count"][0]
    return patched(data, start + 8, b"llama.blocx_count"), "missing hyperparameter llama.block_count"


def foreign_architecture(src):
    data, keys, _ = gguf_layout(src)
    _, value_start, value_end = keys["general.architecture"]
    assert data[value_start + 8 : value_end] == b"llama"
    return patched(data, value_start + 8, b"mamba"), "architecture 'mamba' is not supported"


def ggjt_bytes(src) -> bytes:
    f = load_model_file(src)
    path = write_ggjt(src + ".bin", f.metadata, f.tensors)
    data = open(path, "rb").read()
    os.remove(path)
    return data


def truncated_ggjt(src):
    data = ggjt_bytes(src)
    return data[: len(data) // 2], "runs past the end of the file"


def garbled_ggjt_vocab(src):
    # The first token's length field (after magic, version and seven hyperparameters) made huge.
    return patched(ggjt_bytes(src), 36, struct.pack("<I", 0x7FFFFFFF)), "truncated (reading vocabulary token 0"


BROKEN_FILES = [bad_magic, truncated_header, truncated_metadata, tensor_past_end, unknown_tensor_type,
                unsupported_tensor_type, missing_hyperparameter, foreign_architecture, truncated_ggjt,
                garbled_ggjt_vocab]


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("src") / "tiny.gguf", n_head_kv=4)


@pytest.mark.parametrize("breaker", BROKEN_FILES, ids=lambda f: f.__name__)
def test_broken_file_gives_one_error_line(breaker, tiny_source, tmp_path):
    data, problem = breaker(tiny_source)
    bad = tmp_path / f"{breaker.__name__}.gguf"
    bad.write_bytes(data)
    before = sorted(os.listdir(tmp_path))
    result = CliRunner().invoke(cli, ["main", "-m", str(bad), "-p", "hi", "-n", "1"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if not line.startswith("llamalora: first run")]
    assert lines == [lines[0]] and lines[0].startswith("error: "), result.stderr
    assert str(bad) in lines[0]
    assert problem in lines[0]
    assert result.stdout == ""
    assert sorted(os.listdir(tmp_path)) == before
