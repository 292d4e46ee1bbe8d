"""LoRA on the fly against transformers + PEFT: the reference adapter run unmerged and merged, two adapters,
scale 0, --lora-base, and every refusal before anything is touched."""

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import data_path
from gguf import GGMLQuantizationType as T
from safetensors.numpy import save_file
from tiny_model import make_tiny_llama

from llamalora import kernels
from llamalora.cli import cli
from llamalora.errors import AdapterError
from llamalora.llama import LlamaConfig, LlamaModel
from llamalora.loader import load_model
from llamalora.lora.adapter import check_adapter, load_adapter
from llamalora.lora.merge import merge_adapters
from llamalora.model_file import load_model_file
from llamalora.tensor import Tensor

ADAPTER = data_path("lora-fortunes")
REF = np.load(data_path("logits_lora-fortunes.npz"))
PROMPTS = range(len(REF["prompts"]))


def greedy(model, ids, n, eos=2):
    cache = model.new_cache(len(ids) + n + 1)
    logits = model.forward(ids, cache)[-1]
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        if out[-1] == eos:
            break
        logits = model.forward([out[-1]], cache)[-1]
    return out


def check_against_reference(model, bound=0.05):
    for k in PROMPTS:
        ids = REF[f"p{k}_ids"].tolist()
        logits = model.forward(ids, model.new_cache(len(ids)), all_logits=True)
        assert np.abs(logits[-1] - REF[f"p{k}_logits_last"]).max() < bound, k
        assert (logits.argmax(axis=1) == REF[f"p{k}_top10_ids"][:, 0]).all(), k
        want = REF[f"p{k}_greedy_ids"].tolist()[:16]
        assert greedy(model, ids, len(want)) == want, k


def float32_tensors(model_file) -> dict:
    """Every tensor of the model widened to F32 in memory: the float32 model transformers evaluated."""
    out = {}
    for name, t in model_file.tensors.items():
        w = kernels.dequantize(t.type, t.data, t.n_cols)
        out[name] = Tensor(name, T.F32, t.shape, np.ascontiguousarray(w).view(np.uint8).reshape(t.n_rows, -1))
    return out


@pytest.fixture(scope="module")
def smollm2_file(smollm2_path):
    return load_model_file(smollm2_path)


def test_peft_folder_at_run_time_on_q4_1_equals_transformers(smollm2_path):
    loaded = load_model(smollm2_path, adapters=[(ADAPTER, 1.0)], progress=False)  # auto: Q4_1 runs unmerged
    assert loaded.model.lora and all(t.type == T.Q4_1 for t in [loaded.file.tensors["blk.0.attn_q.weight"]])
    check_against_reference(loaded.model)


def test_peft_folder_merged_into_float32_equals_transformers(smollm2_file):
    tensors = float32_tensors(smollm2_file)
    adapter = load_adapter(ADAPTER, smollm2_file.metadata)
    check_adapter(adapter, tensors)
    tensors.update(merge_adapters(tensors, [adapter], progress=False))
    config = LlamaConfig.from_metadata(smollm2_file.metadata, smollm2_file.path, n_vocab=49152)
    check_against_reference(LlamaModel(config, tensors))


def test_merge_into_q4_1_loses_part_of_the_adapter(smollm2_path):
    """Requantizing W + s·B·A to 4 bits: the reason run-time mode is the default on quantized weights."""
    merged = load_model(smollm2_path, adapters=[(ADAPTER, 1.0)], lora_mode="merge", progress=False).model
    runtime = load_model(smollm2_path, adapters=[(ADAPTER, 1.0)], lora_mode="runtime", progress=False).model
    ids = REF["p0_ids"].tolist()
    want = REF["p0_logits_last"]
    err_merged = np.abs(merged.forward(ids, merged.new_cache(16))[-1] - want).max()
    err_runtime = np.abs(runtime.forward(ids, runtime.new_cache(16))[-1] - want).max()
    assert err_runtime < 1e-3 < 0.1 < err_merged


def test_two_adapters_add_and_scale_zero_is_the_base(tmp_path):
    path = make_tiny_llama(tmp_path / "f32.gguf", qtype=T.F32)
    model_file = load_model_file(path)
    rng = np.random.default_rng(0)
    first = write_peft(tmp_path / "a", rng, ["q_proj", "v_proj", "down_proj"])
    second = write_peft(tmp_path / "b", rng, ["q_proj", "up_proj"], r=4, alpha=2.0)
    adapters = [load_adapter(first, model_file.metadata, 0.5), load_adapter(second, model_file.metadata, 2.0)]
    merged = merge_adapters(model_file.tensors, adapters, progress=False)
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight"):
        base = kernels.dequantize(T.F32, model_file.tensors[name].data, 64 if "down" not in name else 128)
        want = base.astype(np.float64)
        for adapter in adapters:
            t = adapter.tensors.get(name)
            if t is not None:
                want = want + t.scale * (t.b.astype(np.float64) @ t.a)
        got = kernels.dequantize(T.F32, merged[name].data, merged[name].n_cols)
        np.testing.assert_allclose(got, want, atol=1e-5)
    zero = load_model(path, adapters=[(first, 0.0)], lora_mode="merge", progress=False)
    base = load_model(path, progress=False)
    ids = [1, 50, 60, 70]
    np.testing.assert_array_equal(zero.model.forward(ids, zero.model.new_cache(8)),
                                  base.model.forward(ids, base.model.new_cache(8)))


def write_peft(folder, rng, modules, r=8, alpha=16.0, n_layer=2, dims=None, config_extra=None, names=None):
    """A PEFT folder for the tiny model: lora_A/B for `modules` in every layer."""
    dims = dims or {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
                    "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for layer in range(n_layer):
        for module in modules:
            n_out, n_in = dims[module]
            part = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, n_in)).astype(np.float32) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((n_out, r)).astype(np.float32) * 0.1
    tensors.update(names or {})
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": modules, "bias": "none",
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False,
              "rank_pattern": {}, "alpha_pattern": {}}
    config.update(config_extra or {})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


def test_rslora_and_patterns(tmp_path):
    rng = np.random.default_rng(1)
    meta = load_model_file(make_tiny_llama(tmp_path / "m.gguf", qtype=T.F32)).metadata
    rs = load_adapter(write_peft(tmp_path / "rs", rng, ["v_proj"], r=4, alpha=8.0, config_extra={"use_rslora": True}),
                      meta)
    assert rs.tensors["blk.0.attn_v.weight"].scale == pytest.approx(8.0 / 2.0)
    pat = write_peft(tmp_path / "pat", rng, ["v_proj"], r=4, alpha=8.0,
                     config_extra={"alpha_pattern": {"v_proj": 2.0}})
    assert load_adapter(pat, meta).tensors["blk.1.attn_v.weight"].scale == pytest.approx(0.5)


REFUSALS = [
    ({"use_dora": True}, None, "DoRA"),
    ({"bias": "all"}, None, "bias 'all' is not supported"),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ({"peft_type": "IA3"}, None, "peft_type IA3 is not LORA"),
    ({}, {"base_model.model.lm_head.lora_A.weight": np.zeros((8, 64), np.float32)}, "does not map to a llama weight"),
    ({"r": 4}, None, "do not have the rank 4"),
]


@pytest.mark.parametrize("extra,names,message", REFUSALS, ids=[r[2][:20] for r in REFUSALS])
def test_refusals_through_the_cli(tmp_path, extra, names, message):
    model = make_tiny_llama(tmp_path / "m.gguf")
    folder = write_peft(tmp_path / "bad", np.random.default_rng(2), ["q_proj"], config_extra=extra, names=names)
    before = sorted(os.listdir(tmp_path))
    r = CliRunner().invoke(cli, ["main", "-m", model, "--lora", folder, "-p", "hi", "-n", "1"])
    assert r.exit_code == 1
    error_lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0] and "Traceback" not in r.output
    assert sorted(os.listdir(tmp_path)) == before


def test_shape_and_missing_tensor_refusals(tmp_path):
    model = make_tiny_llama(tmp_path / "m.gguf")
    meta = load_model_file(model)
    wrong = write_peft(tmp_path / "wide", np.random.default_rng(3), ["q_proj"], dims={"q_proj": (64, 96)})
    with pytest.raises(AdapterError, match=r"blk.0.attn_q.weight: adapter delta is \(64, 96\).*\(64, 64\)"):
        check_adapter(load_adapter(wrong, meta.metadata), meta.tensors)
    deep = write_peft(tmp_path / "deep", np.random.default_rng(4), ["v_proj"], n_layer=3)
    with pytest.raises(AdapterError, match="blk.2.attn_v.weight, which the model does not have"):
        check_adapter(load_adapter(deep, meta.metadata), meta.tensors)


def test_lora_base_must_match_the_model(tmp_path):
    model = make_tiny_llama(tmp_path / "m.gguf")
    other = make_tiny_llama(tmp_path / "other.gguf", qtype=T.F16, n_ff=256)
    folder = write_peft(tmp_path / "a", np.random.default_rng(5), ["gate_proj"])
    r = CliRunner().invoke(cli, ["main", "-m", model, "--lora", folder, "--lora-base", other, "-p", "hi", "-n", "1"])
    assert r.exit_code == 1 and "blk.0.ffn_gate.weight has shape (256, 64) in --lora-base but (128, 64)" in r.output
