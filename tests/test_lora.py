"""LoRA on the fly against transformers + PEFT: the reference adapter run unmerged and merged, two adapters,
scale 0, --lora-base, and every refusal before anything is touched."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
import reference_checks
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


def check_against_reference(model, bound=0.05):
    reference_checks.check_against_reference(model, REF, bound)


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
    ({"use_dora": True}, None, "has no lora_magnitude_vector (adapter_config.json sets use_dora)"),
    ({}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": np.ones(64, np.float32)},
     "is a DoRA magnitude but adapter_config.json does not set use_dora"),
    ({"bias": "all"}, None, "bias 'all' is not supported"),
    ({"modules_to_save": ["lm_head"]}, None, "lists modules_to_save ['lm_head'] but the adapter holds none"),
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


# --- the fused merge kernel (kernels.merge_low_rank): one pass widening W, adding s·B·A and quantizing ---

FUSED_TARGETS = [T.Q4_0, T.Q4_1, T.Q8_0, T.F16, T.F32]


def exact_merge_case(rng, n_rows=37, n_cols=96, r=16):
    """W, A, B and a scale whose float32 sum W + s·B·A is exact in any summation order (small multiples of
    powers of two), so the merge must give quantize(W + s·B·A) byte for byte. 37 rows: not a whole number of
    row groups or tiles."""
    w = rng.integers(-1024, 1025, (n_rows, n_cols)) / 1024.0  # exact in f16
    a = rng.integers(-4, 5, (r, n_cols)) / 8.0
    b = rng.integers(-4, 5, (n_rows, r)) / 8.0
    scale = 0.5
    return w.astype(np.float32), a.astype(np.float32), b.astype(np.float32), scale, w + scale * (b @ a)


@pytest.mark.parametrize("base_type", [T.F16, T.F32, T.Q8_0])
@pytest.mark.parametrize("target", FUSED_TARGETS + [T.Q5_0])  # Q5_0: the unfused path
def test_merge_low_rank_bytes_equal_quantize_of_the_sum(base_type, target):
    rng = np.random.default_rng(int(base_type) * 100 + int(target))
    w, a, b, scale, _ = exact_merge_case(rng)
    base = kernels.quantize(base_type, w)
    exact = kernels.dequantize(base_type, base, w.shape[1]).astype(np.float64) + scale * (b.astype(np.float64) @ a)
    assert np.array_equal(exact.astype(np.float32), exact)  # the premise: the sum is exact in float32
    got = kernels.merge_low_rank(base_type, base, target, a, b, scale)
    want = kernels.quantize(target, exact.astype(np.float32))
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


def block_step(target, x: np.ndarray) -> np.ndarray:
    """Per value, one quantization step of its 32-value block in ggml's scheme (1 ulp of float32 for F32,
    of float16 for F16): the most a correct quantization of x may move it (Q4_0 moves the value opposite
    its block's extreme by one whole step: 8 clamps to 7), rounding included."""
    blocks = x.reshape(x.shape[0], -1, 32)
    if target == T.Q4_0:
        step = np.abs(blocks).max(axis=2, keepdims=True) / 8
    elif target == T.Q4_1:
        step = (blocks.max(axis=2, keepdims=True) - blocks.min(axis=2, keepdims=True)) / 15
    elif target == T.Q8_0:
        step = np.abs(blocks).max(axis=2, keepdims=True) / 127
    else:
        eps = np.finfo(np.float32 if target == T.F32 else np.float16).eps
        return np.abs(x) * eps
    return np.broadcast_to(step * 1.01, blocks.shape).reshape(x.shape)  # 1 %: the scale's own f16 rounding


@pytest.mark.parametrize("target", FUSED_TARGETS)
def test_merge_low_rank_matches_the_float64_sum(target):
    """Random weights and a full-size-scale adapter: every merged value lies within one quantization step
    of W + s·B·A formed in float64 (plus a few float32 ulps of the delta's terms), and nearly every row is
    byte for byte quantize() of that sum rounded to float32 (rows may differ only where the delta's float32
    rounding crosses a rounding boundary; for F16 and F32 the bound is ulps, so it alone decides). A wrong
    scale, a transposed A or rows of B out of order fail both."""
    rng = np.random.default_rng(7 + int(target))
    n, r, scale = 256, 16, 2.0
    w = (rng.standard_normal((n, n)) * 0.02).astype(np.float32)
    a = (rng.standard_normal((r, n)) * 0.1).astype(np.float32)
    b = (rng.standard_normal((n, r)) * 0.1).astype(np.float32)
    base = kernels.quantize(T.F16, w)
    w64 = kernels.dequantize(T.F16, base, n).astype(np.float64)
    terms = scale * np.abs(b.astype(np.float64)) @ np.abs(a.astype(np.float64))
    delta_tol = 4 * r * np.finfo(np.float32).eps * terms

    def check(a_used, b_used, scale_used):
        got = kernels.dequantize(target, kernels.merge_low_rank(T.F16, base, target, a_used, b_used, scale_used), n)
        want = w64 + scale * (b.astype(np.float64) @ a)
        within = np.abs(got - want) <= block_step(target, want) + delta_tol + np.abs(want) * np.finfo(np.float32).eps
        same = (kernels.merge_low_rank(T.F16, base, target, a_used, b_used, scale_used)
                == kernels.quantize(target, want.astype(np.float32))).all(axis=1)
        return within.all(), same.mean()

    quantized = target not in (T.F16, T.F32)  # float targets: the delta's last bits differ in most rows
    within, same = check(a, b, scale)
    assert within and (same >= 0.95 or not quantized), (within, same)
    for wrong in ((a, b, 1.0), (np.ascontiguousarray(a.reshape(n, r).T), b, scale), (a, b[::-1], scale)):
        within, same = check(*wrong)
        assert not within and (same < 0.5 or not quantized)
