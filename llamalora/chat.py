"""Turn formats: Alpaca instruction turns (`-ins`) and the model's own chat template (`-cnv`).

The chat template is the Jinja2 text in the model's `tokenizer.chat_template`, rendered in a sandbox with the
settings and helpers Hugging Face's tokenizers render it with (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `tojson`, `strftime_now`). A model without a template gets ChatML, as llama.cpp falls back to.
"""

import datetime
import functools
import json

from .errors import InputError

# What llama.cpp's main put around each user input in instruct mode (-ins), and the text at which it handed
# the turn back to the user.
ALPACA_PREFIX = "\n\n### Instruction:\n\n"
ALPACA_SUFFIX = "\n\n### Response:\n\n"
ALPACA_REVERSE_PROMPT = "### Instruction:\n\n"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateRaised(Exception):
    """What a template's raise_exception() throws; kept apart so its message is passed on unchanged."""


def raise_exception(message):
    raise TemplateRaised(message)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Hugging Face's filter: unlike Jinja2's own tojson it does not HTML-escape, which prompts must not be.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=8)
def compile_template(template: str):
    """The compiled template (cached: a chat renders the same template every turn)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)):
        raise InputError(f"chat messages must be a list, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"chat messages[{i}] must be an object with role and content")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise InputError(f"chat messages[{i}].{key} must be a string")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


@functools.lru_cache(maxsize=8)
def template_takes_tools(template: str | None) -> bool:
    """Whether the template reads a `tools` variable (it then renders the tool definitions itself, as Hugging
    Face's apply_chat_template(tools=...) has it); a template that does not parse takes none."""
    import jinja2
    import jinja2.meta

    try:
        env = compile_template.__wrapped__(template or CHATML_TEMPLATE).environment
        return "tools" in jinja2.meta.find_undeclared_variables(env.parse(template or CHATML_TEMPLATE))
    except jinja2.TemplateError:
        return False


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", tools: list | None = None) -> str:
    """The prompt text for a conversation: `template` (or ChatML when None or empty) rendered with the
    messages ({"role", "content"} dicts, with any further keys such as tool_calls passed on), the
    generation-prompt flag, the model's BOS/EOS texts and, when given, the tool definitions as `tools`.
    Syntax errors, the template's own raise_exception() and anything the sandbox refuses are InputErrors."""
    import jinja2

    check_messages(messages)
    try:
        compiled = compile_template(template or CHATML_TEMPLATE)
        extra = {"tools": tools} if tools is not None else {}
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except TemplateRaised as e:
        raise InputError(f"chat template: {one_line(e)}") from None
    except jinja2.TemplateError as e:
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise InputError(f"chat template: {one_line(e.message or type(e).__name__)}{where}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        # Errors inside the template's expressions, e.g. adding a string to a number.
        raise InputError(f"chat template: {type(e).__name__}: {one_line(e)}") from None
