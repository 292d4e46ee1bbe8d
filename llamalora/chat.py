"""Turn formats: Alpaca instruction turns (`-ins`) and the model's own chat template (`-cnv`).

The chat template is the Jinja2 text in the model's `tokenizer.chat_template`, rendered in a sandbox as
Hugging Face renders it; a model without one gets ChatML, as llama.cpp falls back to.
"""

from .errors import InputError

# What llama.cpp's main put around each user input in instruct mode, and where it handed the turn back.
ALPACA_PREFIX = "\n\n### Instruction:\n\n"
ALPACA_SUFFIX = "\n\n### Response:\n\n"
ALPACA_REVERSE_PROMPT = "### Instruction:\n\n"

CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                   "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "") -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise InputError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(template or CHATML_TEMPLATE)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token)
    except jinja2.TemplateError as e:
        raise InputError(f"chat template: {e}") from None
