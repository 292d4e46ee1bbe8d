"""Seeded mutation fuzzing of what users hand us: a model file's header, and adapters in each of their forms.

Every mutated input either loads or is refused with our one error type (LlamaLoraError, one line); any other
exception is a bug. Each run is seeded by its index, so a failure names the seed that reproduces it; the runs of
a family stop after MAX_RUNS or SECONDS, whichever comes first.
"""

import io
import os
import shutil
import time
import zipfile

import gguf
import numpy as np
import pytest
from conftest import data_path
from tiny_model import make_tiny_llama

from llamalora.errors import LlamaLoraError
from llamalora.loader import load_model
from llamalora.lora.adapter import check_adapter, load_adapter
from llamalora.lora.gguf_adapter import write_gguf_adapter
from llamalora.model_file import load_model_file

MAX_RUNS = 300
SECONDS = 4.0


def mutated(data: bytes, spans: list[tuple[int, int]], seed: int) -> bytes:
    """data with 1 to 8 bytes inside spans changed: a bit flipped, a random byte, or a boundary value (0x00, 0xff,
    0x7f, 0x80, which turn lengths and counts into huge or negative numbers)."""
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        lo, hi = spans[int(rng.integers(len(spans)))]
        i = int(rng.integers(lo, hi))
        kind = int(rng.integers(3))
        if kind == 0:
            out[i] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            out[i] = int(rng.integers(256))
        else:
            out[i] = (0x00, 0xFF, 0x7F, 0x80)[int(rng.integers(4))]
    return bytes(out)


def fuzz(what: str, run_one) -> int:
    """run_one(seed) for seed 0, 1, ...: it must return or raise LlamaLoraError with a one-line message."""
    start, seed = time.perf_counter(), 0
    while seed < MAX_RUNS and time.perf_counter() - start < SECONDS:
        try:
            run_one(seed)
        except LlamaLoraError as e:
            assert "\n" not in str(e).strip(), f"{what}, seed {seed}: the error is not one line: {e}"
        except Exception as e:  # noqa: BLE001 - any other exception is what the fuzzer looks for
            pytest.fail(f"{what}, seed {seed}: {type(e).__name__}: {e}")
        seed += 1
    return seed


@pytest.mark.parametrize("vocab", ["bpe", "spm"])
def test_mutated_model_headers_load_or_are_refused(tmp_path, vocab):
    path = make_tiny_llama(tmp_path / "tiny.gguf", vocab=vocab)
    data = open(path, "rb").read()
    header = gguf.GGUFReader(path).data_offset

    def run_one(seed):
        # a new name each time: the previous model may still map its file
        target = tmp_path / f"mutated-{seed}.gguf"
        target.write_bytes(mutated(data, [(0, header)], seed))
        try:
            loaded = load_model(str(target), progress=False)
            ids = loaded.vocab.tokenize("Hello world, 12 cats!")
            loaded.vocab.detokenize(ids)
        finally:
            target.unlink()

    assert fuzz(f"{vocab} model header", run_one) >= 20


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny model and one small adapter in each form: PEFT folder (safetensors, and the PyTorch .bin of the
    reference adapter), ggla, GGUF adapter."""
    from test_lora_formats import TINY_HEADS, peft_folder

    from llamalora.lora.ggla import write_ggla
    from llamalora.lora.peft import read_peft

    folder = tmp_path_factory.mktemp("fuzz")
    model = load_model_file(make_tiny_llama(folder / "tiny.gguf"))
    peft = peft_folder(folder / "peft", ["q_proj", "k_proj", "v_proj"], r=2)
    adapter = read_peft(peft, TINY_HEADS)
    write_ggla(str(folder / "a.bin"), adapter, TINY_HEADS)
    write_gguf_adapter(str(folder / "a.gguf"), adapter)
    return model, peft, str(folder / "a.bin"), str(folder / "a.gguf")


def check_loads(path: str, model) -> None:
    adapter = load_adapter(path, model.metadata)
    check_adapter(adapter, model.tensors)


@pytest.mark.parametrize("form", ["ggla", "gguf"])
def test_mutated_adapter_files_load_or_are_refused(tmp_path, adapters, form):
    model, _, ggla, gguf_path = adapters
    source = ggla if form == "ggla" else gguf_path
    data = open(source, "rb").read()
    spans = [(0, len(data))] if form == "ggla" else [(0, gguf.GGUFReader(source).data_offset)]

    def run_one(seed):
        target = tmp_path / f"mutated-{seed}.{form}"
        target.write_bytes(mutated(data, spans, seed))
        check_loads(str(target), model)

    assert fuzz(f"{form} adapter", run_one) >= 20


def test_mutated_safetensors_and_config_load_or_are_refused(tmp_path, adapters):
    model, peft, _, _ = adapters
    tensors = open(os.path.join(peft, "adapter_model.safetensors"), "rb").read()
    config = open(os.path.join(peft, "adapter_config.json"), "rb").read()
    header_end = 8 + int.from_bytes(tensors[:8], "little")

    def run_one(seed):
        folder = tmp_path / f"mutated-{seed}"
        folder.mkdir()
        mutate_config = seed % 3 == 0
        (folder / "adapter_model.safetensors").write_bytes(tensors if mutate_config else
                                                           mutated(tensors, [(0, header_end)], seed))
        (folder / "adapter_config.json").write_bytes(mutated(config, [(0, len(config))], seed) if mutate_config
                                                     else config)
        check_loads(str(folder), model)

    assert fuzz("PEFT safetensors folder", run_one) >= 20


def test_mutated_pytorch_pickles_load_or_are_refused(tmp_path):
    """The reference adapter's adapter_model.bin: its pickle mutated inside a well-formed zip (what the unpickler
    sees), or the zip's own bytes mutated (local headers, central directory)."""
    source = data_path("lora-fortunes")
    raw = open(os.path.join(source, "adapter_model.bin"), "rb").read()
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        members = [(info, z.read(info)) for info in z.infolist()]
    pickle_name = next(info.filename for info, _ in members if info.filename.endswith("data.pkl"))
    metadata = {"general.architecture": "llama", "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3}

    def run_one(seed):
        folder = tmp_path / f"mutated-{seed}"
        folder.mkdir()
        shutil.copy(os.path.join(source, "adapter_config.json"), folder / "adapter_config.json")
        if seed % 2 == 0:
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w") as z:
                for info, content in members:
                    z.writestr(info, mutated(content, [(0, len(content))], seed) if info.filename == pickle_name
                               else content)
            data = buffer.getvalue()
        else:
            data = mutated(raw, [(0, 4096), (len(raw) - 8192, len(raw))], seed)
        (folder / "adapter_model.bin").write_bytes(data)
        load_adapter(str(folder), metadata)

    assert fuzz("PyTorch .bin", run_one) >= 20
