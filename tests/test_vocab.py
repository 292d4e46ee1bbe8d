"""Tokenizers built from GGUF metadata, against Hugging Face's SmolLM2 tokenizer and llama.cpp's SPM vectors."""

import json

import pytest
from conftest import data_path

from llamalora.errors import VocabError
from llamalora.model_file import load_model_file
from llamalora.vocab import StreamDecoder, Vocab

SMOLLM2_CASES = json.load(open(data_path("tokenizer_cases.json"), encoding="utf-8"))


def spm_cases():
    inputs = open(data_path("ggml-vocab-llama-spm.gguf.inp"), encoding="utf-8").read()
    outputs = open(data_path("ggml-vocab-llama-spm.gguf.out"), encoding="utf-8").read()
    texts = inputs.split("\n__ggml_vocab_test__\n")
    assert texts[-1] == ""  # the file ends with a separator
    ids = [[int(t) for t in line.split()] for line in outputs.split("\n")[:-1]]
    assert len(texts) - 1 == len(ids) == 46
    return list(zip(texts[:-1], ids))


@pytest.fixture(scope="module")
def smollm2_vocab(smollm2_path):
    return Vocab.from_metadata(load_model_file(smollm2_path).metadata)


@pytest.fixture(scope="module")
def spm_vocab():
    return Vocab.from_metadata(load_model_file(data_path("ggml-vocab-llama-spm.gguf")).metadata)


@pytest.mark.parametrize("case", SMOLLM2_CASES, ids=[repr(c["text"])[:30] for c in SMOLLM2_CASES])
def test_smollm2_matches_hugging_face(smollm2_vocab, case):
    assert smollm2_vocab.tokenize(case["text"], add_bos=False, parse_special=True) == case["ids"]


@pytest.mark.parametrize("case", SMOLLM2_CASES, ids=[repr(c["text"])[:30] for c in SMOLLM2_CASES])
def test_smollm2_round_trip(smollm2_vocab, case):
    assert smollm2_vocab.detokenize(case["ids"]) == case["text"]


@pytest.mark.parametrize("text,ids", spm_cases(), ids=[repr(t)[:30] for t, _ in spm_cases()])
def test_spm_matches_llama_cpp(spm_vocab, text, ids):
    assert spm_vocab.tokenize(text, add_bos=False, parse_special=False) == ids


def test_spm_bos_and_round_trip(spm_vocab):
    assert spm_vocab.add_bos
    ids = spm_vocab.tokenize("Hello world")
    assert ids[0] == spm_vocab.bos_id == 1
    assert spm_vocab.detokenize(ids[1:]) == "Hello world"
    assert spm_vocab.detokenize(spm_vocab.tokenize("нещо на Бълг", add_bos=False)) == "нещо на Бълг"


def test_special_tokens_only_when_asked(smollm2_vocab):
    text = "<|im_start|>user"
    assert smollm2_vocab.tokenize(text, parse_special=True)[0] == 1
    plain = smollm2_vocab.tokenize(text, parse_special=False)
    assert 1 not in plain and len(plain) > 2
    assert not smollm2_vocab.add_bos and smollm2_vocab.tokenize("hi", add_bos=True)[0] == smollm2_vocab.bos_id


def test_end_of_generation_tokens(smollm2_vocab):
    assert smollm2_vocab.is_eog(2) and smollm2_vocab.is_eog(0)  # <|im_end|> (eos) and <|endoftext|>
    assert not smollm2_vocab.is_eog(1)


def test_stream_decoder_holds_back_partial_characters(smollm2_vocab):
    # "🦙" is split over byte-level tokens: no piece may print half a character.
    ids = smollm2_vocab.tokenize("emoji 🦙🔥 done", add_bos=False)
    decoder = StreamDecoder(smollm2_vocab)
    pieces = [decoder.push(t) for t in ids]
    assert "".join(pieces) + decoder.flush() == "emoji 🦙🔥 done"
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # some token ended mid-character and was held back


def test_unknown_tokenizer_model_is_an_error(smollm2_path):
    metadata = dict(load_model_file(smollm2_path).metadata)
    metadata["tokenizer.ggml.model"] = "rwkv"
    with pytest.raises(VocabError, match="tokenizer.ggml.model 'rwkv' is not supported"):
        Vocab.from_metadata(metadata)
    metadata["tokenizer.ggml.model"] = "gpt2"
    metadata["tokenizer.ggml.pre"] = "falcon"
    with pytest.raises(VocabError, match="tokenizer.ggml.pre 'falcon' is not supported"):
        Vocab.from_metadata(metadata)
