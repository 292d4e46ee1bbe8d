"""Tokenizers built from GGUF metadata, against Hugging Face's SmolLM2 tokenizer and llama.cpp's SPM vectors."""

import json
import time

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


def test_add_bos_follows_llama_cpp_defaults(smollm2_path):
    spm = dict(load_model_file(data_path("ggml-vocab-llama-spm.gguf")).metadata)
    del spm["tokenizer.ggml.add_bos_token"]
    assert Vocab.from_metadata(spm).add_bos  # SentencePiece: on unless the metadata says otherwise
    spm["tokenizer.ggml.add_bos_token"] = False
    assert Vocab.from_metadata(spm).tokenize("Hello") == [15043]
    gpt2 = dict(load_model_file(smollm2_path).metadata)
    del gpt2["tokenizer.ggml.add_bos_token"]
    assert not Vocab.from_metadata(gpt2).add_bos  # byte-level BPE: off unless the metadata says so
    gpt2["tokenizer.ggml.add_bos_token"] = True
    vocab = Vocab.from_metadata(gpt2)
    assert vocab.tokenize("hi")[0] == vocab.bos_id == 1
    assert vocab.tokenize("hi", add_bos=False)[0] != 1


def test_add_eos_only_for_whole_sequences(spm_vocab):
    metadata = dict(load_model_file(data_path("ggml-vocab-llama-spm.gguf")).metadata)
    metadata["tokenizer.ggml.add_eos_token"] = True
    vocab = Vocab.from_metadata(metadata)
    assert vocab.tokenize("Hello") == [1, 15043, 2]
    assert vocab.tokenize("Hello", add_bos=False) == [15043]
    assert spm_vocab.tokenize("Hello") == [1, 15043]


def test_spm_control_tokens_in_text(spm_vocab):
    with_special = spm_vocab.tokenize("<s>Hello</s>", add_bos=False, parse_special=True)
    assert with_special == [1, 15043, 2]  # the text after a control token gets the space prefix again
    plain = spm_vocab.tokenize("<s>Hello</s>", add_bos=False, parse_special=False)
    assert 1 not in plain and 2 not in plain
    assert spm_vocab.detokenize(plain) == "<s>Hello</s>"


def test_detokenize_can_skip_control_tokens(smollm2_vocab):
    ids = smollm2_vocab.tokenize("<|im_start|>user\nHi<|im_end|>", add_bos=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm2_vocab.detokenize(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert smollm2_vocab.detokenize(ids, skip_special=True) == "user\nHi"
    assert smollm2_vocab.token_bytes(1) == b"<|im_start|>"
    assert smollm2_vocab.token_bytes(1, skip_special=True) == b""
    with pytest.raises(VocabError, match="token id 49152 is outside"):
        smollm2_vocab.token_bytes(smollm2_vocab.n_vocab)


def test_end_of_turn_ids_from_metadata():
    metadata = dict(load_model_file(data_path("ggml-vocab-llama-spm.gguf")).metadata)
    assert not Vocab.from_metadata(metadata).is_eog(13)
    metadata["tokenizer.ggml.eot_token_id"] = 13
    metadata["tokenizer.ggml.eom_token_id"] = 14
    vocab = Vocab.from_metadata(metadata)
    assert vocab.is_eog(2) and vocab.is_eog(13) and vocab.is_eog(14) and not vocab.is_eog(1)


def test_perplexity_text_is_fast_and_round_trips(smollm2_vocab, spm_vocab):
    text = open(data_path("fortunes_heldout.txt"), encoding="utf-8").read()
    start = time.perf_counter()
    ids = smollm2_vocab.tokenize(text, add_bos=False, parse_special=False)
    assert time.perf_counter() - start < 2.0
    assert smollm2_vocab.detokenize(ids) == text
    assert spm_vocab.detokenize(spm_vocab.tokenize(text, add_bos=False, parse_special=False)) == text


def test_bad_metadata_names_the_field(smollm2_path):
    metadata = dict(load_model_file(smollm2_path).metadata)
    metadata["tokenizer.ggml.eos_token_id"] = 10**6
    with pytest.raises(VocabError, match="tokenizer.ggml.eos_token_id = 1000000 is outside"):
        Vocab.from_metadata(metadata)
    del metadata["tokenizer.ggml.tokens"]
    with pytest.raises(VocabError, match="no tokenizer.ggml.tokens"):
        Vocab.from_metadata(metadata)


def test_a_merge_naming_a_token_outside_the_vocabulary_is_one_error(tmp_path, smollm2_path):
    """A damaged merge list (seen when fuzzing SmolLM2's header) made `tokenizers` raise a bare Exception."""
    from conftest import rewritten

    from llamalora.loader import load_model

    merges = list(load_model_file(smollm2_path).metadata["tokenizer.ggml.merges"])
    left, right = merges[1000].split(" ")
    merges[1000] = f"{left} {right}Uj"
    path = rewritten(smollm2_path, tmp_path / "m.gguf", {"tokenizer.ggml.merges": merges})
    with pytest.raises(VocabError) as e:
        load_model(path, progress=False)
    assert str(e.value) == (f"{path}: tokenizer.ggml.merges[1000] {merges[1000]!r} names {right + 'Uj'!r}, "
                            "which is not in tokenizer.ggml.tokens")
    metadata = load_model_file(smollm2_path).metadata
    for damaged, message in ((["Ġ t", "nospace"], r"merges\[1\] 'nospace' is not two pieces"),
                             ([7, 8], "tokenizer.ggml.merges is not an array of strings")):
        with pytest.raises(VocabError, match=message):
            Vocab.from_metadata({**metadata, "tokenizer.ggml.merges": damaged})
