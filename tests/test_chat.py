"""Chat templates: the model's own (SmolLM2's) and the ChatML fallback; broken templates are input errors."""

import pytest

from llamalora.chat import render_chat
from llamalora.errors import InputError
from llamalora.model_file import load_model_file


def test_smollm2_template(smollm2_path):
    template = load_model_file(smollm2_path).metadata["tokenizer.chat_template"]
    messages = [{"role": "user", "content": "Hi"}]
    assert render_chat(template, messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}] + messages
    assert render_chat(template, with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


def test_chatml_fallback():
    assert render_chat(None, [{"role": "user", "content": "x"}], add_generation_prompt=True) == \
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_broken_templates():
    with pytest.raises(InputError, match="chat template"):
        render_chat("{% for m in messages %}", [], True)
    with pytest.raises(InputError, match="chat template: roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", [], True)
    with pytest.raises(InputError, match="chat template"):  # the sandbox refuses attribute tricks
        render_chat("{{ messages.__class__.__mro__ }}", [], True)
