"""`llamalora quantize`: llama.cpp's choice of types per tensor, bytes equal to gguf.quants, a model that runs."""

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants
from tiny_model import make_tiny_llama

from llamalora import kernels
from llamalora.cli import cli
from llamalora.loader import load_model
from llamalora.model_file import load_model_file


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize("target,qtype", [("q4_0", T.Q4_0), ("q4_1", T.Q4_1), ("q8_0", T.Q8_0), ("f16", T.F16)])
def test_types_and_bytes_follow_llama_cpp(tmp_path, target, qtype):
    src = make_tiny_llama(tmp_path / "f32.gguf", qtype=T.F32, tied=True)
    out = str(tmp_path / f"{target}.gguf")
    r = run("quantize", str(src), out, target)
    assert r.exit_code == 0, r.output
    source = load_model_file(str(src)).tensors
    reader = GGUFReader(out)
    assert len(reader.tensors) == len(source)
    for t in reader.tensors:
        w = kernels.dequantize(source[t.name].type, source[t.name].data, source[t.name].n_cols)
        if len(source[t.name].shape) == 1:
            want = T.F32  # norms stay float
        elif t.name == "token_embd.weight" and qtype in (T.Q4_0, T.Q4_1):
            want = T.Q8_0  # tied output projection; rows of 64 are not whole 256-blocks, so Q8_0 not Q6_K
        else:
            want = qtype
        assert t.tensor_type == want, t.name
        expected = quants.quantize(w, want) if want not in (T.F32,) else w
        assert np.asarray(t.data).tobytes() == np.ascontiguousarray(expected).tobytes(), t.name
    assert reader.fields["general.file_type"].parts[-1][0] == {"q4_0": 2, "q4_1": 3, "q8_0": 7, "f16": 1}[target]
    assert "MiB" in r.output


def test_quantized_model_runs_close_to_its_source(tmp_path):
    src = make_tiny_llama(tmp_path / "f32.gguf", qtype=T.F32)
    out = str(tmp_path / "q8.gguf")
    assert run("quantize", str(src), out, "q8_0").exit_code == 0
    ids = [1, 40, 41, 42, 43]
    logits = []
    for path in (str(src), out):
        lm = load_model(path, progress=False)
        logits.append(lm.model.forward(ids, lm.model.new_cache(16)))
    assert 0 < np.abs(logits[0] - logits[1]).max() < 0.05  # 8-bit weights: close, not equal


def test_quantize_errors(tmp_path):
    src = make_tiny_llama(tmp_path / "f32.gguf", qtype=T.F32)
    r = CliRunner().invoke(cli, ["quantize", str(src), str(tmp_path / "x.gguf"), "q3_xs"])
    assert r.exit_code == 1 and "unknown type 'q3_xs'" in r.output
    r = CliRunner().invoke(cli, ["quantize", str(src), str(src), "q8_0"])
    assert r.exit_code == 1 and "must not overwrite" in r.output
    assert not (tmp_path / "x.gguf").exists()
