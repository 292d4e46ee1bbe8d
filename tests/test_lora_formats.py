"""Adapter file formats: PyTorch pickles read without torch, PEFT folders, ggla and GGUF adapters written by
scripts/convert_lora_to_ggml.py and read back, the q/k row permutation, and every refusal."""

import collections
import importlib.util
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import types
import zipfile

import gguf
import numpy as np
import pytest
from conftest import data_path
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file, save_file
from tiny_model import make_tiny_llama

from llamalora.errors import AdapterError
from llamalora.lora.adapter import check_adapter, load_adapter
from llamalora.lora.ggla import read_ggla, write_ggla
from llamalora.lora.gguf_adapter import read_gguf_adapter, write_gguf_adapter
from llamalora.lora.peft import permute_rows, read_peft
from llamalora.lora.torch_pickle import load_torch_file
from llamalora.model_file import load_model_file

ADAPTER = data_path("lora-fortunes")
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "convert_lora_to_ggml.py")
SMOLLM2_HEADS = {"general.architecture": "llama", "llama.attention.head_count": 9,
                 "llama.attention.head_count_kv": 3}


def load_script():
    spec = importlib.util.spec_from_file_location("convert_lora_to_ggml", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(capsys, *args) -> tuple[int, str, str]:
    code = load_script().main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama.cpp's q/k permutation, written independently of peft.permute_rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def assert_same_adapter(got, want, exact=True):
    assert list(got.tensors) == list(want.tensors) or sorted(got.tensors) == sorted(want.tensors)
    for name, w in want.tensors.items():
        g = got.tensors[name]
        assert g.a.shape == w.a.shape and g.b.shape == w.b.shape, name
        if exact:
            np.testing.assert_array_equal(g.a, w.a, err_msg=name)
            np.testing.assert_array_equal(g.b, w.b, err_msg=name)
            assert g.scale == w.scale, name
        else:  # a file that keeps one alpha folds the tensor's own scale into B, rounded to float32
            want_delta = w.scale * (w.b.astype(np.float64) @ w.a)
            np.testing.assert_allclose(g.scale * (g.b.astype(np.float64) @ g.a), want_delta,
                                       rtol=0, atol=1e-6 * np.abs(want_delta).max(), err_msg=name)
            np.testing.assert_array_equal(g.a, w.a, err_msg=name)


# ---------------------------------------------------------------- PyTorch pickles without torch

def test_bin_and_safetensors_hold_identical_arrays():
    from_bin = load_torch_file(os.path.join(ADAPTER, "adapter_model.bin"))
    from_st = load_file(os.path.join(ADAPTER, "adapter_model.safetensors"))
    assert len(from_bin) == 120 and sorted(from_bin) == sorted(from_st)
    for name, value in from_st.items():
        assert from_bin[name].dtype == value.dtype and from_bin[name].flags.owndata
        np.testing.assert_array_equal(from_bin[name], value, err_msg=name)
    assert "torch" not in sys.modules


def test_peft_folder_reads_the_same_from_bin_and_safetensors(tmp_path):
    only_bin = tmp_path / "bin"
    only_bin.mkdir()
    for name in ("adapter_config.json", "adapter_model.bin"):
        shutil.copy(os.path.join(ADAPTER, name), only_bin / name)
    assert_same_adapter(read_peft(str(only_bin), SMOLLM2_HEADS), read_peft(ADAPTER, SMOLLM2_HEADS))


class Marker:
    """Unpickling this runs `touch <path>` through os.system in a plain pickle.load."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def write_checkpoint(path, pickle_bytes: bytes, storages: dict | None = None, prefix="archive"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{prefix}/data.pkl", pickle_bytes)
        z.writestr(f"{prefix}/byteorder", "little")
        for key, raw in (storages or {}).items():
            z.writestr(f"{prefix}/data/{key}", raw)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "adapter_model.bin"
    write_checkpoint(bad, pickle.dumps({"x": Marker(marker)}, protocol=2))
    with pytest.raises(AdapterError, match=r"pickle asks for (posix|os|nt)\.system, refused"):
        load_torch_file(str(bad))
    assert not marker.exists()
    # a stock unpickler would have run it: the test would notice if the file were harmless
    with zipfile.ZipFile(bad) as z:
        pickle.loads(z.read("archive/data.pkl"))
    assert marker.exists()


def test_pickle_of_builtins_eval_is_refused(tmp_path):
    bad = tmp_path / "eval.bin"
    payload = b"\x80\x02cbuiltins\neval\nX\x0b\x00\x00\x00print(12345)\x85R."
    write_checkpoint(bad, payload)
    with pytest.raises(AdapterError, match=r"eval.bin: pickle asks for builtins\.eval, refused"):
        load_torch_file(str(bad))


@pytest.fixture
def fake_torch(monkeypatch):
    """Stand-ins registered as torch.FloatStorage & co. so a test can write real torch.save pickles."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while pickling")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ("FloatStorage", "HalfStorage", "BFloat16Storage"):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


class FakeStorage:
    def __init__(self, storage_type, key, numel):
        self.pid = ("storage", storage_type, key, "cpu", numel)


class FakeTensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (sys.modules["torch._utils"]._rebuild_tensor_v2, self.args)


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, FakeStorage) else None


def test_strided_offset_half_and_bfloat16_tensors(tmp_path, fake_torch):
    base = np.arange(24, dtype=np.float32) / 8
    halfs = (np.arange(6, dtype=np.float16) - 2.5)
    bf16 = (np.array([1.5, -2.25, 3e-3, 7.0], dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    f32 = FakeStorage(fake_torch.FloatStorage, "0", 24)
    f16 = FakeStorage(fake_torch.HalfStorage, "1", 6)
    b16 = FakeStorage(fake_torch.BFloat16Storage, "2", 4)
    state = collections.OrderedDict([
        ("transposed", FakeTensor(f32, 2, (3, 4), (1, 3))),  # a .T view starting at element 2
        ("plain", FakeTensor(f32, 0, (4, 6), (6, 1))),
        ("half", FakeTensor(f16, 0, (2, 3), (3, 1))),
        ("bf16", FakeTensor(b16, 0, (2, 2), (2, 1))),
    ])
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(state)
    path = tmp_path / "ckpt.bin"
    write_checkpoint(path, buf.getvalue(), {"0": base.tobytes(), "1": halfs.tobytes(), "2": bf16.tobytes()},
                     prefix="ckpt")
    got = load_torch_file(str(path))
    np.testing.assert_array_equal(got["transposed"], base[2:14].reshape(4, 3).T)
    np.testing.assert_array_equal(got["plain"], base.reshape(4, 6))
    assert got["half"].dtype == np.float16
    np.testing.assert_array_equal(got["half"], halfs.reshape(2, 3))
    assert got["bf16"].dtype == np.float32
    np.testing.assert_array_equal(got["bf16"], np.array([[1.5, -2.25], [0.0029907227, 7.0]], dtype=np.float32))


def test_tensor_reaching_past_its_storage_is_refused(tmp_path, fake_torch):
    storage = FakeStorage(fake_torch.FloatStorage, "0", 4)
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump({"w": FakeTensor(storage, 1, (2, 2), (2, 1))})
    path = tmp_path / "short.bin"
    write_checkpoint(path, buf.getvalue(), {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(AdapterError, match=r"short.bin: tensor with size \(2, 2\).*reaches past its storage of 4"):
        load_torch_file(str(path))


def test_legacy_and_broken_checkpoints_are_refused(tmp_path):
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(AdapterError, match="legacy.bin: not a zip-format PyTorch checkpoint"):
        load_torch_file(str(legacy))
    missing = tmp_path / "missing.bin"
    write_checkpoint(missing, b"\x80\x02}q\x00(X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\n"
                              b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x009X\x03\x00\x00\x00"
                              b"cpuK\x04tQK\x00K\x04\x85K\x01\x85\x89tRu.")
    with pytest.raises(AdapterError, match="storage archive/data/9 is missing"):
        load_torch_file(str(missing))


# ---------------------------------------------------------------- the q/k permutation

def test_permutation_is_llama_cpps_and_inverts():
    rows = np.arange(8, dtype=np.float32)[:, None]
    # per head of 4 rows, llama.cpp interleaves the two rotary halves: 0 2 1 3
    assert permute_rows(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    rows = np.arange(8, dtype=np.float32)[:, None]
    assert permute_rows(rows, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]  # k: n_head_kv = 1 head of 8 rows
    w = np.random.default_rng(0).standard_normal((576, 16)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, 9), 9), w)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w[:192], 3), 3), w[:192])


def test_q_delta_in_gguf_order_unpermutes_to_peft_b_times_a():
    raw = load_file(os.path.join(ADAPTER, "adapter_model.safetensors"))
    adapter = read_peft(ADAPTER, SMOLLM2_HEADS)
    prefix = "base_model.model.model.layers.0.self_attn"
    q = adapter.tensors["blk.0.attn_q.weight"]
    hf_delta = raw[f"{prefix}.q_proj.lora_B.weight"] @ raw[f"{prefix}.q_proj.lora_A.weight"]
    np.testing.assert_allclose(unpermute_rows(q.b @ q.a, 9), hf_delta, rtol=1e-6, atol=1e-8)
    assert np.abs(q.b @ q.a - hf_delta).max() > 1e-3  # the reorder is not a no-op on this adapter
    v = adapter.tensors["blk.0.attn_v.weight"]
    np.testing.assert_array_equal(v.b, raw[f"{prefix}.v_proj.lora_B.weight"])  # v is not permuted
    assert q.scale == v.scale == 2.0 and adapter.r == 16 and adapter.alpha == 32.0


# ---------------------------------------------------------------- conversion and read-back

@pytest.fixture(scope="module")
def converted(tmp_path_factory, smollm2_path):
    folder = tmp_path_factory.mktemp("conv") / "lora-fortunes"
    shutil.copytree(ADAPTER, folder)
    script = load_script()
    assert script.main([str(folder), "--base", smollm2_path]) == 0
    assert script.main([str(folder), "--gguf", "--n-head", "9", "--n-head-kv", "3"]) == 0
    return folder


def test_converted_files_equal_the_peft_folder(converted, smollm2_path):
    metadata = load_model_file(smollm2_path).metadata
    peft = load_adapter(ADAPTER, metadata)
    ggla = load_adapter(str(converted / "ggml-adapter-model.bin"), metadata)
    gguf_adapter = load_adapter(str(converted / "ggml-adapter-model.gguf"), metadata)
    assert len(peft.tensors) == 60
    for adapter in (ggla, gguf_adapter):
        assert_same_adapter(adapter, peft)
        assert (adapter.r, adapter.alpha) == (16, 32.0)
        assert {t.scale for t in adapter.tensors.values()} == {2.0}
    assert load_adapter(str(converted / "ggml-adapter-model.bin"), metadata, 0.25).tensors[
        "blk.3.attn_v.weight"].scale == 0.5


def test_ggla_bytes_follow_the_original_converter(converted):
    raw = load_file(os.path.join(ADAPTER, "adapter_model.safetensors"))
    data = (converted / "ggml-adapter-model.bin").read_bytes()
    assert data[:4] == b"algg" and struct.unpack_from("<iii", data, 4) == (1, 16, 32)
    pos, seen = 16, {}
    while pos < len(data):
        n_dims, name_len, ftype = struct.unpack_from("<iii", data, pos)
        dims = struct.unpack_from(f"<{n_dims}i", data, pos + 12)
        name = data[pos + 12 + 4 * n_dims: pos + 12 + 4 * n_dims + name_len].decode()
        pos = pos + 12 + 4 * n_dims + name_len
        pos += -pos % 32
        count = int(np.prod(dims))
        seen[name] = (dims, np.frombuffer(data, np.float32, count, pos).reshape(dims[::-1]))
        assert (n_dims, ftype) == (2, 0) and pos % 32 == 0
        pos += 4 * count
    assert len(seen) == 120 and pos == len(data)
    a_dims, a = seen["blk.0.attn_v.weight.loraA"]
    b_dims, b = seen["blk.0.attn_v.weight.loraB"]
    prefix = "base_model.model.model.layers.0.self_attn.v_proj"
    assert a_dims == (16, 576) and b_dims == (16, 192)  # ggml order: A written transposed, [n_in, r] in numpy
    np.testing.assert_array_equal(a, raw[f"{prefix}.lora_A.weight"].T)
    np.testing.assert_array_equal(b, raw[f"{prefix}.lora_B.weight"])
    _, q_b = seen["blk.0.attn_q.weight.loraB"]  # q as PEFT holds it: Hugging Face's row order, as that script wrote it
    np.testing.assert_array_equal(q_b, raw["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])
    # and the whole file is the one llama.cpp's convert-lora-to-ggml.py wrote from the same folder
    assert data == open(data_path("ggla-lora-fortunes.bin"), "rb").read()


def test_the_original_converters_ggla_runs_like_transformers(smollm2_path):
    """ggla-lora-fortunes.bin was written by llama.cpp's own convert-lora-to-ggml.py: q's lora_B in Hugging Face's
    row order, which the reader puts into GGUF's."""
    from llamalora.loader import load_model
    from reference_checks import check_against_reference

    loaded = load_model(smollm2_path, adapters=[(data_path("ggla-lora-fortunes.bin"), 1.0)], progress=False)
    check_against_reference(loaded.model, np.load(data_path("logits_lora-fortunes.npz")))
    assert_same_adapter(loaded.adapters[0], load_adapter(ADAPTER, loaded.file.metadata), exact=False)


def test_the_original_converters_ggla_through_main(tmp_path):
    """`llamalora main --lora` on that file continues a reference prompt as transformers + PEFT does."""
    from llamalora.loader import load_model

    ref = np.load(data_path("logits_lora-fortunes.npz"))
    vocab = load_model(None, progress=False).vocab
    prompt, want = str(ref["prompts"][1]), ref["p1_greedy_ids"].tolist()[:16]
    r = subprocess.run([sys.executable, "-m", "llamalora.cli", "main", "--lora", data_path("ggla-lora-fortunes.bin"),
                        "-p", prompt, "-n", str(len(want)), "--temp", "0"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.removesuffix("\n") == prompt + vocab.detokenize(want)  # main ends its output with a newline


def test_gguf_adapter_metadata_is_what_llama_cpp_reads(converted):
    reader = gguf.GGUFReader(str(converted / "ggml-adapter-model.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 32.0
    shapes = {t.name: (t.tensor_type, t.shape.tolist()) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == (T.F32, [576, 16])  # ggml ne: [n_in, r]
    assert shapes["blk.0.attn_q.weight.lora_b"] == (T.F32, [16, 576])  # [r, n_out]
    assert shapes["blk.29.attn_v.weight.lora_b"] == (T.F32, [16, 192]) and len(shapes) == 120


def test_converted_files_run_like_transformers_on_q4_1(converted, smollm2_path):
    from llamalora.loader import load_model

    ref = np.load(data_path("logits_lora-fortunes.npz"))
    ids = ref["p0_ids"].tolist()
    base = load_model(smollm2_path, progress=False).model
    base_err = np.abs(base.forward(ids, base.new_cache(len(ids)))[-1] - ref["p0_logits_last"]).max()
    for name in ("ggml-adapter-model.bin", "ggml-adapter-model.gguf"):
        model = load_model(smollm2_path, adapters=[(str(converted / name), 1.0)], lora_mode="runtime",
                           progress=False).model
        err = np.abs(model.forward(ids, model.new_cache(len(ids)))[-1] - ref["p0_logits_last"]).max()
        assert err < 1e-3 < 0.1 < base_err, (name, err, base_err)


def test_f16_output(tmp_path, capsys):
    folder = tmp_path / "lf"
    shutil.copytree(ADAPTER, folder)
    code, out, _ = run_script(capsys, folder, "--n-head", 9, "--n-head-kv", 3, "--outtype", "f16",
                              "--outfile", tmp_path / "half.bin")
    assert code == 0 and "ggla f16" in out
    half = read_ggla(str(tmp_path / "half.bin"), SMOLLM2_HEADS)
    full = read_peft(str(folder), SMOLLM2_HEADS)
    for name, t in full.tensors.items():
        np.testing.assert_array_equal(half.tensors[name].b, t.b.astype(np.float16).astype(np.float32))
    assert os.path.getsize(tmp_path / "half.bin") < 0.6 * os.path.getsize(os.path.join(ADAPTER, "adapter_model.bin"))


# ---------------------------------------------------------------- synthetic PEFT folders

DIMS = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
        "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
TINY_HEADS = {"general.architecture": "llama", "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2}


def peft_folder(folder, modules, r=8, alpha=16, seed=0, ranks=None, extra_config=None, extra_tensors=None):
    """A PEFT folder for make_tiny_llama's shapes; `ranks` gives some modules another rank."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for layer in range(2):
        for module in modules:
            n_out, n_in = DIMS[module]
            rank = (ranks or {}).get(module, r)
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, n_in)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((n_out, rank)).astype(np.float32)
    tensors.update(extra_tensors or {})
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": modules, "bias": "none",
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False,
              "rank_pattern": {}, "alpha_pattern": {}}
    config.update(extra_config or {})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


def round_trips(tmp_path, folder, metadata=TINY_HEADS):
    peft = read_peft(folder, metadata)
    write_ggla(str(tmp_path / "a.bin"), peft, metadata)
    write_gguf_adapter(str(tmp_path / "a.gguf"), peft)
    return peft, read_ggla(str(tmp_path / "a.bin"), metadata), read_gguf_adapter(str(tmp_path / "a.gguf"), "llama")


def test_all_seven_modules_with_float_alpha(tmp_path):
    modules = list(DIMS)
    peft, ggla, gguf_adapter = round_trips(tmp_path, peft_folder(tmp_path / "p", modules, r=4, alpha=6.5))
    assert len(peft.tensors) == 14 and {t.scale for t in peft.tensors.values()} == {6.5 / 4}
    raw = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    k = peft.tensors["blk.1.attn_k.weight"]
    np.testing.assert_array_equal(k.b, permute_rows(raw["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"],
                                                    2))
    assert_same_adapter(gguf_adapter, peft)  # GGUF keeps a float alpha: bit-exact
    assert_same_adapter(ggla, peft, exact=False)  # ggla's alpha is an int32: the scale moves into B
    with open(tmp_path / "a.bin", "rb") as f:
        assert struct.unpack("<4xiii", f.read(16)) == (1, 4, 4)


def test_rslora(tmp_path):
    peft, ggla, gguf_adapter = round_trips(
        tmp_path, peft_folder(tmp_path / "p", ["v_proj", "o_proj"], r=16, alpha=8, extra_config={"use_rslora": True}))
    assert {t.scale for t in peft.tensors.values()} == {8 / 4.0}
    assert_same_adapter(ggla, peft, exact=False)
    assert_same_adapter(gguf_adapter, peft, exact=False)
    assert ggla.tensors["blk.0.attn_v.weight"].scale == 0.5  # the file's alpha/r, B carries the factor 4


def test_rank_and_alpha_patterns(tmp_path):
    folder = peft_folder(tmp_path / "p", ["q_proj", "v_proj", "up_proj"], r=8, alpha=16, ranks={"v_proj": 4},
                         extra_config={"rank_pattern": {"v_proj": 4},
                                       "alpha_pattern": {"model.layers.1.mlp.up_proj": 4, r"layers\.0\.self_attn\.q_proj": 2}})
    peft, ggla, gguf_adapter = round_trips(tmp_path, folder)
    scales = {name: t.scale for name, t in peft.tensors.items()}
    assert scales["blk.0.attn_v.weight"] == 16 / 4 and scales["blk.1.attn_v.weight"] == 16 / 4
    assert scales["blk.1.ffn_up.weight"] == 4 / 8 and scales["blk.0.ffn_up.weight"] == 2.0
    assert scales["blk.0.attn_q.weight"] == 2 / 8 and scales["blk.1.attn_q.weight"] == 2.0
    assert peft.tensors["blk.0.attn_v.weight"].a.shape == (4, 64)
    assert_same_adapter(ggla, peft, exact=False)
    assert_same_adapter(gguf_adapter, peft, exact=False)
    # GGUF readers take r from each tensor: a rank pattern alone needs no folding
    np.testing.assert_array_equal(gguf_adapter.tensors["blk.1.attn_v.weight"].b, peft.tensors["blk.1.attn_v.weight"].b)


def test_rank_pattern_that_disagrees_with_the_tensors_is_refused(tmp_path):
    folder = peft_folder(tmp_path / "p", ["v_proj"], r=8, extra_config={"rank_pattern": {"v_proj": 4}})
    with pytest.raises(AdapterError, match=r"v_proj: lora_A \(8, 64\) and lora_B \(32, 8\) do not have the rank 4"):
        read_peft(folder, TINY_HEADS)


def test_fan_in_fan_out_gives_the_same_delta(tmp_path):
    plain = read_peft(peft_folder(tmp_path / "a", ["q_proj", "down_proj"], seed=3), TINY_HEADS)
    fan = read_peft(peft_folder(tmp_path / "b", ["q_proj", "down_proj"], seed=3,
                                extra_config={"fan_in_fan_out": True}), TINY_HEADS)
    assert_same_adapter(fan, plain)
    model = load_model_file(make_tiny_llama(tmp_path / "m.gguf", qtype=T.F32))
    check_adapter(fan, model.tensors)


def test_adapter_name_in_tensor_keys(tmp_path):
    """PEFT can save keys with the adapter's name (lora_A.default.weight)."""
    folder = peft_folder(tmp_path / "p", ["o_proj"])
    st = os.path.join(folder, "adapter_model.safetensors")
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in load_file(st).items()}
    save_file(renamed, st)
    assert sorted(read_peft(folder, TINY_HEADS).tensors) == ["blk.0.attn_output.weight", "blk.1.attn_output.weight"]


# ---------------------------------------------------------------- refusals

SCRIPT_REFUSALS = [
    ({"modules_to_save": ["lm_head"]}, None, "lists modules_to_save ['lm_head'] but the adapter holds none"),
    ({"modules_to_save": ["lm_head"]}, {"base_model.model.lm_head.weight": np.zeros((400, 64), np.float32)},
     "a ggla file holds LoRA pairs of the linear layers only, not whole tensors (modules_to_save)"),
    ({"bias": "lora_only"}, None, "bias 'lora_only' is not supported"),
    ({"use_dora": True}, {f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_magnitude_vector":
                          np.ones(32, np.float32) for i in range(2)},
     "a ggla file holds lora_A and lora_B only, not DoRA's magnitude vectors; write a GGUF adapter (--gguf)"),
    ({"peft_type": "LOHA"}, None, "peft_type LOHA is not LORA"),
    ({"lora_bias": True}, None, "lora_bias"),
    ({}, {"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((8, 64), np.float32)},
     "embed_tokens has no lora_embedding_B"),
    ({}, {"base_model.model.model.layers.0.self_attn.rotary_emb.lora_A.weight": np.zeros((8, 64), np.float32)},
     "rotary_emb.lora_A.weight does not map to a llama weight"),
]


@pytest.mark.parametrize("config,names,message", SCRIPT_REFUSALS, ids=[r[2][:24] for r in SCRIPT_REFUSALS])
def test_script_refuses_what_it_cannot_honour(tmp_path, capsys, config, names, message):
    folder = peft_folder(tmp_path / "bad", ["v_proj"], extra_config=config, extra_tensors=names)
    before = sorted(os.listdir(folder))
    code, out, err = run_script(capsys, folder, "--n-head", 4, "--n-head-kv", 2)
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert sorted(os.listdir(folder)) == before


def test_script_on_a_bad_dir_exits_1_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (empty, tmp_path / "nowhere"):
        r = subprocess.run([sys.executable, SCRIPT, str(target)], capture_output=True, text=True)
        assert r.returncode == 1 and r.stdout == "", r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {target}:"), r.stderr
    assert "no adapter_config.json" in subprocess.run([sys.executable, SCRIPT, str(empty)], capture_output=True,
                                                      text=True).stderr


def test_q_and_k_need_head_counts_v_does_not(tmp_path, capsys):
    qk = peft_folder(tmp_path / "qk", ["k_proj"])
    code, out, err = run_script(capsys, qk)
    assert code == 1 and "k_proj" in err and "--base MODEL.gguf or --n-head" in err and len(err.splitlines()) == 1
    v = peft_folder(tmp_path / "v", ["v_proj", "gate_proj"])
    code, out, err = run_script(capsys, v, "--gguf")
    assert code == 0 and os.path.exists(tmp_path / "v" / "ggml-adapter-model.gguf")
    code, out, err = run_script(capsys, v, "--arch", "falcon")
    assert code == 1 and "only llama" in err


def test_script_checks_shapes_against_base(tmp_path, capsys):
    model = make_tiny_llama(tmp_path / "m.gguf")
    good = peft_folder(tmp_path / "good", ["q_proj", "k_proj"])
    assert run_script(capsys, good, "--base", model)[0] == 0
    with_k = read_ggla(str(tmp_path / "good" / "ggml-adapter-model.bin"), TINY_HEADS)
    assert_same_adapter(with_k, read_peft(good, TINY_HEADS))  # the base's head counts: 4 and 2
    wide = tmp_path / "wide"
    shutil.copytree(good, wide)
    st = wide / "adapter_model.safetensors"
    tensors = load_file(str(st))
    tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"] = np.zeros((48, 8), np.float32)
    save_file(tensors, str(st))
    (wide / "ggml-adapter-model.bin").unlink()
    code, out, err = run_script(capsys, wide, "--base", model)
    assert code == 1 and "blk.1.attn_k.weight" in err and "(48, 64)" in err and "(32, 64)" in err
    assert not (wide / "ggml-adapter-model.bin").exists()


def test_broken_adapter_files_are_refused(tmp_path, smollm2_path):
    folder = peft_folder(tmp_path / "p", ["v_proj"])
    adapter = read_peft(folder, TINY_HEADS)
    write_ggla(str(tmp_path / "a.bin"), adapter, TINY_HEADS)
    data = (tmp_path / "a.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-100])
    with pytest.raises(AdapterError, match=r"cut.bin: tensor blk.1.attn_v.weight.loraB is truncated"):
        load_adapter(str(tmp_path / "cut.bin"), TINY_HEADS)
    (tmp_path / "v2.bin").write_bytes(data[:4] + struct.pack("<i", 2) + data[8:])
    with pytest.raises(AdapterError, match="v2.bin: ggla version 2 is not supported"):
        read_ggla(str(tmp_path / "v2.bin"), TINY_HEADS)
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="junk.bin: not a LoRA adapter"):
        load_adapter(str(tmp_path / "junk.bin"), TINY_HEADS)
    with pytest.raises(AdapterError, match="general.type is 'model', not 'adapter'"):
        load_adapter(smollm2_path, TINY_HEADS)
    write_gguf_adapter(str(tmp_path / "a.gguf"), adapter)
    with pytest.raises(AdapterError, match="adapter is for architecture 'llama', the model is 'qwen2'"):
        load_adapter(str(tmp_path / "a.gguf"), {"general.architecture": "qwen2"})
