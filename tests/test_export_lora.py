"""`llamalora export-lora`: a merged model file that the gguf package reads and that generates like run-time mode."""

import numpy as np
from click.testing import CliRunner
from conftest import data_path
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from reference_checks import greedy

from llamalora.cli import cli
from llamalora.loader import load_model

ADAPTER = data_path("lora-fortunes")
REF = np.load(data_path("logits_lora-fortunes.npz"))


def test_f16_export_reads_back_and_generates_like_run_time_mode(tmp_path, smollm2_path):
    out = str(tmp_path / "merged-f16.gguf")
    r = CliRunner().invoke(cli, ["export-lora", "-m", smollm2_path, "--lora", ADAPTER, "-o", out, "--outtype", "f16"])
    assert r.exit_code == 0, r.output
    base = {t.name: t for t in GGUFReader(smollm2_path).tensors}
    merged = GGUFReader(out)
    assert len(merged.tensors) == len(base)
    for t in merged.tensors:
        assert list(t.shape) == list(base[t.name].shape), t.name
        want = T.F32 if len(t.shape) == 1 or t.shape[1] == 1 else T.F16
        assert t.tensor_type == want, t.name
    name = bytes(merged.fields["general.name"].parts[-1]).decode()
    assert "lora-fortunes" in name
    exported = load_model(out, progress=False).model
    runtime = load_model(smollm2_path, adapters=[(ADAPTER, 1.0)], lora_mode="runtime", progress=False).model
    for k in range(len(REF["prompts"])):
        ids = REF[f"p{k}_ids"].tolist()
        want = REF[f"p{k}_greedy_ids"].tolist()[:16]
        assert greedy(exported, ids, len(want)) == greedy(runtime, ids, len(want)) == want, k


def test_export_needs_an_adapter_and_a_new_path(tmp_path, smollm2_path):
    r = CliRunner().invoke(cli, ["export-lora", "-m", smollm2_path, "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 1 and "needs at least one --lora" in r.output
    r = CliRunner().invoke(cli, ["export-lora", "-m", smollm2_path, "--lora", ADAPTER, "-o", smollm2_path])
    assert r.exit_code == 1 and "must not overwrite the base model" in r.output
