"""`llamalora main`: one prompt, interactive chat, Alpaca instruct turns or the model's chat template.

Follows llama.cpp's main example: the prompt is echoed, generation streams to stdout, Ctrl-C during
generation hands the turn to the user in interactive modes, and a second Ctrl-C or end of input exits.
"""

import signal
import sys
from dataclasses import dataclass, field

from .chat import ALPACA_PREFIX, ALPACA_REVERSE_PROMPT, ALPACA_SUFFIX, render_chat
from .generate import Context, check_prompt_fits, generate
from .loader import LoadedModel
from .sampling import Sampler, SamplerParams

COLOR_USER = "\033[1;32m"
COLOR_RESET = "\033[0m"


@dataclass
class MainOptions:
    prompt: str = ""
    n_predict: int = -1
    n_ctx: int = 4096
    n_batch: int = 512
    n_keep: int = 0
    context_shift: bool = True
    color: bool = False
    interactive: bool = False
    interactive_first: bool = False
    instruct: bool = False
    conversation: bool = False
    reverse_prompts: list = field(default_factory=list)
    in_prefix: str = ""
    in_suffix: str = ""
    ignore_eos: bool = False
    sampler: SamplerParams = field(default_factory=SamplerParams)
    grammar: object = None  # a parsed Grammar: every turn's output must match it


class Interrupts:
    """Ctrl-C while generating sets a flag (the turn goes back to the user); while reading input it exits."""

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.pending = False
        self.reading = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame):
        if self.reading or not self.interactive or self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def take(self) -> bool:
        was, self.pending = self.pending, False
        return was


def run_main(loaded: LoadedModel, opts: MainOptions, out=None, inp=None, err=None) -> None:
    # the streams are looked up per call, not bound at import, so a caller that swaps sys.stdout is followed
    out, inp, err = out or sys.stdout, inp or sys.stdin, err or sys.stderr
    vocab, model = loaded.vocab, loaded.model
    interactive = opts.interactive or opts.interactive_first or opts.instruct or opts.conversation
    ctx = Context(model, n_ctx=opts.n_ctx, n_batch=opts.n_batch, context_shift=opts.context_shift)
    ctx.timings.load_ms = loaded.load_ms
    ctx.timings.compile_ms = loaded.compile_ms
    sampler = Sampler(opts.sampler, vocab.n_vocab)
    reverse_prompts = list(opts.reverse_prompts)
    if opts.instruct:
        reverse_prompts.append(ALPACA_REVERSE_PROMPT)
    history = []  # chat messages in conversation mode
    rendered = ""  # the conversation rendered so far (conversation mode)

    if opts.conversation:
        if opts.prompt:
            history.append({"role": "system", "content": opts.prompt})
        pending_text = ""
    else:
        pending_text = opts.prompt
    pending = vocab.tokenize(pending_text, add_bos=None, parse_special=True) if pending_text or vocab.add_bos else []
    check_prompt_fits(len(pending), opts.n_ctx)
    n_keep = len(pending) if opts.n_keep < 0 else min(opts.n_keep, len(pending))
    ctx.n_keep = n_keep
    if pending_text:
        write(out, pending_text, COLOR_USER if opts.color else "")

    with Interrupts(interactive) as interrupts:
        waiting_for_user = opts.interactive_first or opts.instruct or opts.conversation
        while True:
            if not waiting_for_user:
                if not pending:
                    break
                reason, text = stream_turn(ctx, vocab, sampler, pending, opts, reverse_prompts, interrupts, out)
                pending = []
                if opts.conversation:
                    history.append({"role": "assistant", "content": text})
                    rendered = render_chat(vocab.chat_template, history, add_generation_prompt=False,
                                           **special_tokens(vocab))
                if not interactive or reason == "context":
                    if reason == "context":
                        print(f"\n[context is full ({opts.n_ctx} tokens) and context shift is off]", file=err)
                    break
            line = read_user_input(inp, out, opts, interrupts)
            if line is None:
                break
            waiting_for_user = False
            if opts.conversation:
                history.append({"role": "user", "content": line})
                full = render_chat(vocab.chat_template, history, add_generation_prompt=True,
                                   **special_tokens(vocab))
                text = full[len(rendered):] if full.startswith(rendered) else full
                rendered = full
            elif opts.instruct:
                text = ALPACA_PREFIX + line + ALPACA_SUFFIX
            else:
                text = opts.in_prefix + line + "\n" + opts.in_suffix
            pending = pending + vocab.tokenize(text, add_bos=False, parse_special=opts.conversation)
    out.write("\n")
    out.flush()
    for line in ctx.timings.lines():
        print(line, file=err)


def stream_turn(ctx, vocab, sampler, ids, opts, reverse_prompts, interrupts, out):
    """Generate one turn, streaming text to out; returns (why it stopped, the text generated)."""
    pieces = []
    gen = generate(ctx, vocab, sampler, ids, n_predict=opts.n_predict, stop=tuple(reverse_prompts),
                   ignore_eos=opts.ignore_eos, should_stop=interrupts.take,
                   grammar=opts.grammar.start() if opts.grammar is not None else None)
    reason = "limit"
    try:
        while True:
            _, piece = next(gen)
            pieces.append(piece)
            out.write(piece)
            out.flush()
    except StopIteration as stop:
        reason = stop.value or "limit"
    return reason, "".join(pieces)


def read_user_input(inp, out, opts, interrupts) -> str | None:
    """One user turn (lines ending in a backslash continue it); None at end of input or on Ctrl-C."""
    out.write("\n> " if (opts.instruct or opts.conversation) else "")
    if opts.color:
        out.write(COLOR_USER)
    out.flush()
    lines = []
    interrupts.reading = True
    try:
        while True:
            line = inp.readline()
            if not line:
                return None
            line = line.rstrip("\n")
            if line.endswith("\\"):
                lines.append(line[:-1])
                continue
            lines.append(line)
            return "\n".join(lines)
    except KeyboardInterrupt:
        return None
    finally:
        interrupts.reading = False
        if opts.color:
            out.write(COLOR_RESET)
            out.flush()


def special_tokens(vocab) -> dict:
    """bos_token and eos_token as chat templates expect them (their text, or empty)."""
    def text(i):
        return vocab.tokens[i] if i is not None and 0 <= i < vocab.n_vocab else ""

    return {"bos_token": text(vocab.bos_id), "eos_token": text(vocab.eos_id)}


def write(out, text: str, color: str = "") -> None:
    out.write(f"{color}{text}{COLOR_RESET}" if color else text)
    out.flush()
