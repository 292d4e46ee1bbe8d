"""Chat templates: SmolLM2's own (read from its GGUF), the ChatML fallback, Hugging Face's helpers, and
broken templates as one-line input errors; the Alpaca turn texts and the shipped prompt files."""

import os

import gguf
import pytest

from llamalora.chat import ALPACA_PREFIX, ALPACA_REVERSE_PROMPT, ALPACA_SUFFIX, render_chat
from llamalora.errors import InputError

PROMPTS = os.path.join(os.path.dirname(__file__), "..", "prompts")


@pytest.fixture(scope="module")
def smollm2_template(smollm2_path) -> str:
    field = gguf.GGUFReader(smollm2_path).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def test_smollm2_template_with_a_system_message(smollm2_template):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    assert render_chat(smollm2_template, messages, add_generation_prompt=True, bos_token="<|im_start|>",
                       eos_token="<|im_end|>") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert render_chat(smollm2_template, messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n")


def test_smollm2_template_adds_its_default_system_message(smollm2_template):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    assert render_chat(smollm2_template, messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_chatml_fallback():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "x\ny"}]
    expected = "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nx\ny<|im_end|>\n"
    assert render_chat(None, messages, add_generation_prompt=False) == expected
    assert render_chat(None, messages, add_generation_prompt=True) == expected + "<|im_start|>assistant\n"
    assert render_chat("", messages, add_generation_prompt=True) == expected + "<|im_start|>assistant\n"


def test_hugging_face_environment():
    # trim_blocks / lstrip_blocks: block tags on their own lines leave no blank lines or indentation behind
    template = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    assert render_chat(template, messages, False) == "[a]\n[c]\n"
    # loop controls, tojson without HTML escaping, bos/eos passed through
    template = ("{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                "{{ m | tojson }}{% endfor %}{{ eos_token }}")
    assert render_chat(template, [{"role": "user", "content": "<é>"}] * 2, False, "<s>", "</s>") == \
        '<s>{"role": "user", "content": "<é>"}</s>'


def test_broken_templates_are_one_line_input_errors():
    with pytest.raises(InputError, match="^chat template: .*endfor") as info:
        render_chat("{% for m in messages %}", [], True)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="^chat template: Conversation roles must alternate$"):
        render_chat("{{ raise_exception('Conversation roles must alternate') }}", [], True)
    with pytest.raises(InputError, match="^chat template: "):  # the sandbox refuses attribute tricks
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", [], True)
    with pytest.raises(InputError, match="^chat template: "):  # and mutating the messages
        render_chat("{{ messages.append(1) }}", [], True)
    with pytest.raises(InputError, match="^chat template: TypeError"):
        render_chat("{{ 'a' + 1 }}", [], True)


def test_bad_messages():
    with pytest.raises(InputError, match=r"messages\[1\]\.content"):
        render_chat(None, [{"role": "user", "content": "x"}, {"role": "user", "content": None}], True)
    with pytest.raises(InputError, match=r"messages\[0\]"):
        render_chat(None, ["hello"], True)


def test_alpaca_turn_texts():
    turn = ALPACA_PREFIX + "Name a colour." + ALPACA_SUFFIX
    assert turn == "\n\n### Instruction:\n\nName a colour.\n\n### Response:\n\n"
    assert ALPACA_REVERSE_PROMPT in ALPACA_PREFIX  # the model's next instruction header hands the turn back


def test_prompt_files():
    with open(os.path.join(PROMPTS, "alpaca.txt"), encoding="utf-8") as f:
        assert f.read() == ("Below is an instruction that describes a task. "
                            "Write a response that appropriately completes the request.\n")
    with open(os.path.join(PROMPTS, "chat-with-bob.txt"), encoding="utf-8") as f:
        bob = f.read()
    assert bob.startswith("Transcript of a dialog, where the User interacts with an Assistant named Bob.")
    assert bob.endswith("\nUser:")  # ends where the user's first line goes
