"""The `llamalora` command group: llama.cpp's flags, and the one place that turns errors into one line."""

import codecs
import os
import sys

import click

from .errors import InputError, LlamaLoraError
from .options import Option, load_from_options, model_options, read_text_file


class Commands(click.Group):
    """Catches every LlamaLoraError once: `error: <message>` on stderr, exit 1, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LlamaLoraError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("", err=True)
            sys.exit(130)


@click.group(cls=Commands)
@click.version_option(package_name="llamalora")
def cli():
    """Run LLaMA-family GGUF models on the CPU, with LoRA adapters applied on the fly."""


@cli.command("main")
@model_options
@click.option("-p", "--prompt", type=str, default=None, help="prompt to start generation with")
@click.option("-f", "--file", "prompt_file", type=str, default=None, help="read the prompt from a file")
@click.option("-e", "--escape", is_flag=True, help="process escapes (\\n, \\t, ...) in the prompt")
@click.option("-n", "--n-predict", "--n_predict", cls=Option, type=int, default=-1, help="tokens to predict (-1: until end of text or context)")
@click.option("-c", "--ctx-size", "--ctx_size", cls=Option, type=int, default=4096, help="context size in tokens (0: the model's)")
@click.option("-b", "--batch-size", "--batch_size", cls=Option, type=int, default=512, help="prompt tokens evaluated per batch")
@click.option("--keep", type=int, default=0, help="prompt tokens to keep when the context shifts (-1: all)")
@click.option("--no-context-shift", is_flag=True, help="stop when the context is full instead of shifting it")
@click.option("--temp", type=float, default=None, help="temperature (0: greedy)")
@click.option("--top-k", "--top_k", cls=Option, type=int, default=None, help="keep the k most likely tokens (<= 0: all)")
@click.option("--top-p", "--top_p", cls=Option, type=float, default=None, help="nucleus sampling (1: off)")
@click.option("--min-p", type=float, default=None, help="drop tokens below this share of the best one's probability")
@click.option("--typical", "typical_p", type=float, default=None, help="locally typical sampling (1: off)")
@click.option("--repeat-penalty", "--repeat_penalty", cls=Option, type=float, default=None, help="penalise repeated tokens (1: off)")
@click.option("--repeat-last-n", "--repeat_last_n", cls=Option, type=int, default=None,
              help="tokens the penalties look back on (0: off, -1: all)")
@click.option("--presence-penalty", "--presence_penalty", cls=Option, type=float, default=None,
              help="subtract this from a repeated token's logit (0: off)")
@click.option("--frequency-penalty", "--frequency_penalty", cls=Option, type=float, default=None,
              help="subtract this times a token's count from its logit (0: off)")
@click.option("-s", "--seed", type=int, default=-1, help="RNG seed (-1: random)")
@click.option("--ignore-eos", is_flag=True, help="keep generating past the end-of-text token")
@click.option("--color", is_flag=True, help="colour the prompt and user input")
@click.option("-i", "--interactive", is_flag=True, help="hand the turn to the user at a reverse prompt or Ctrl-C")
@click.option("--interactive-first", is_flag=True, help="wait for user input before generating")
@click.option("-r", "--reverse-prompt", "reverse_prompts", multiple=True, help="stop and hand over at this text")
@click.option("--in-prefix", default="", help="text put before every user input")
@click.option("--in-suffix", default="", help="text put after every user input")
@click.option("-ins", "--instruct", is_flag=True, help="Alpaca instruction mode (### Instruction / ### Response)")
@click.option("-cnv", "--conversation", is_flag=True, help="chat with the model's own chat template")
@click.option("--grammar", "grammar_text", default=None, help="GBNF grammar the output must match")
@click.option("--grammar-file", default=None, help="file with a GBNF grammar")
@click.option("-j", "--json-schema", default=None, help="JSON Schema (text or @FILE) the output must match")
@click.option("--memory_f32", "memory_f32", cls=Option, is_flag=True, hidden=True,
              help="accepted for llama.cpp's command lines: the KV cache is float32 already")
def main_command(model_path, threads, no_mmap, loras, loras_scaled, lora_base, lora_mode, verbose, prompt,
                 prompt_file, escape, n_predict, ctx_size, batch_size, keep, no_context_shift, temp, top_k, top_p,
                 min_p, typical_p, repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty, seed,
                 ignore_eos, color, interactive, interactive_first, reverse_prompts, in_prefix, in_suffix, instruct,
                 conversation, grammar_text, grammar_file, json_schema, memory_f32):
    """Generate text from a prompt, a file, interactively or in instruction mode."""
    from .console import MainOptions, run_main
    from .sampling import SamplerParams

    if prompt is not None and prompt_file is not None:
        raise InputError("give either -p or -f, not both")
    text = read_text_file(prompt_file) if prompt_file else (prompt or "")
    if escape:
        text = codecs.decode(text.encode("utf-8"), "unicode_escape").encode("latin-1").decode("utf-8")
    for name, value, low in (("-c", ctx_size, 0), ("-b", batch_size, 1), ("-n", n_predict, -1)):
        if value < low:
            raise InputError(f"{name} must be at least {low}, got {value}")
    overrides = {"temp": temp, "top_k": top_k, "top_p": top_p, "min_p": min_p, "typical_p": typical_p,
                 "repeat_penalty": repeat_penalty, "repeat_last_n": repeat_last_n,
                 "presence_penalty": presence_penalty, "frequency_penalty": frequency_penalty}
    sampler = SamplerParams(seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    grammar = read_grammar(grammar_text, grammar_file, json_schema)  # a bad grammar fails before the model loads
    loaded = load_from_options(model_path, threads, no_mmap, loras, loras_scaled, lora_base, lora_mode, verbose)
    n_ctx = ctx_size or loaded.model.config.n_ctx_train
    opts = MainOptions(prompt=text, n_predict=n_predict, n_ctx=n_ctx, n_batch=batch_size, n_keep=keep,
                       context_shift=not no_context_shift, color=color, interactive=interactive,
                       interactive_first=interactive_first, instruct=instruct, conversation=conversation,
                       reverse_prompts=list(reverse_prompts), in_prefix=in_prefix, in_suffix=in_suffix,
                       ignore_eos=ignore_eos, sampler=sampler, grammar=grammar)
    run_main(loaded, opts)


def read_grammar(text: str | None, path: str | None, schema: str | None):
    """The one grammar given by --grammar, --grammar-file or --json-schema, parsed (None if none)."""
    given = [g for g in (text, path, schema) if g is not None]
    if len(given) > 1:
        raise InputError("give one of --grammar, --grammar-file and --json-schema")
    if text is not None:
        from .grammar import parse_grammar

        return parse_grammar(text, "--grammar")
    if path is not None:
        from .grammar import load_grammar_file

        return load_grammar_file(path)
    if schema is not None:
        from .json_schema import json_schema_grammar, read_json_schema

        return json_schema_grammar(read_json_schema(schema))
    return None


@cli.command("perplexity")
@model_options
@click.option("-f", "--file", "text_file", type=str, default=None, help="text to score")
@click.option("-c", "--ctx-size", "--ctx_size", cls=Option, type=int, default=512, help="chunk size in tokens")
@click.option("-b", "--batch-size", "--batch_size", cls=Option, type=int, default=None, help="tokens evaluated per batch (default: the chunk)")
@click.option("--chunks", type=int, default=-1, help="score at most this many chunks (-1: all)")
@click.option("--kl-divergence-base", type=str, default=None, help="save this run's log-probabilities to FILE")
@click.option("--kl-divergence", is_flag=True, help="compare against the --kl-divergence-base FILE of a base run")
def perplexity_command(model_path, threads, no_mmap, loras, loras_scaled, lora_base, lora_mode, verbose, text_file,
                       ctx_size, batch_size, chunks, kl_divergence_base, kl_divergence):
    """Perplexity of a text file with llama.cpp's protocol (second half of each chunk scored)."""
    from tqdm import tqdm

    from .generate import Context
    from .perplexity import KLDivergenceReader, KLDivergenceWriter, chunk_count, perplexity

    compare = None
    if kl_divergence:
        if not kl_divergence_base:
            raise InputError("--kl-divergence needs --kl-divergence-base FILE (the base run's log-probabilities)")
        compare = KLDivergenceReader(kl_divergence_base)
        ctx_size = compare.n_ctx
    elif not text_file:
        raise InputError("perplexity needs a text file: -f TEXT")
    text = read_text_file(text_file, "text file") if text_file else None
    if text is not None and not text.strip():
        raise InputError(f"{text_file}: text file is empty")
    loaded = load_from_options(model_path, threads, no_mmap, loras, loras_scaled, lora_base, lora_mode, verbose)
    vocab = loaded.vocab
    tokens = compare.tokens if compare else vocab.tokenize(text, add_bos=None, parse_special=False)
    if compare and compare.n_vocab != vocab.n_vocab:
        raise InputError(f"{kl_divergence_base}: base run has {compare.n_vocab} vocabulary entries, the model {vocab.n_vocab}")
    n_chunks = chunk_count(len(tokens), ctx_size, chunks)
    if compare:
        n_chunks = min(n_chunks, compare.n_chunks)
    n_batch = batch_size or ctx_size
    click.echo(f"perplexity: tokenized the text into {len(tokens)} tokens", err=True)
    click.echo(f"perplexity: calculating perplexity over {n_chunks} chunks, n_ctx={ctx_size}, batch_size={n_batch}",
               err=True)
    save = KLDivergenceWriter(kl_divergence_base, ctx_size, vocab.n_vocab, n_chunks, tokens) \
        if kl_divergence_base and not kl_divergence else None
    ctx = Context(loaded.model, n_ctx=ctx_size, n_batch=n_batch, context_shift=False)
    bar = tqdm(total=n_chunks, unit="chunk", file=sys.stderr, leave=False)

    def on_chunk(i, running):
        bar.update(1)
        bar.clear()
        click.echo(f"[{i + 1}]{running:.4f},", nl=False)
        bar.refresh()

    bos = vocab.bos_id if vocab.add_bos else None
    result = perplexity(ctx, tokens, n_chunks, bos, on_chunk=on_chunk, save=save, compare=compare)
    bar.close()
    if save:
        save.close()
    click.echo("")
    click.echo(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_err:.5f}")
    if compare:
        click.echo("\n".join([""] + compare.report()))
    t = ctx.timings
    click.echo(f"perplexity: {t.prompt_tokens} tokens in {t.prompt_ms / 1000:.2f} s "
               f"({1000 * t.prompt_tokens / max(t.prompt_ms, 1e-9):.1f} tokens/s)", err=True)


@cli.command("quantize")
@click.argument("in_path")
@click.argument("out_path")
@click.argument("type_name", metavar="TYPE")
@click.option("-t", "--threads", type=int, default=None)
def quantize_command(in_path, out_path, type_name, threads):
    """Rewrite IN.gguf as OUT.gguf with its weights in TYPE, one of llama.cpp's file types: f32, f16, q8_0,
    q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k (any case).
    The K mixes choose each tensor's type by llama.cpp's rules; one line per tensor shows the choice."""
    from .loader import set_threads
    from .model_file import load_model_file
    from .quantize import rewrite_model, target_type

    target = target_type(type_name)
    set_threads(threads)
    if os.path.abspath(in_path) == os.path.abspath(out_path):
        raise InputError(f"{out_path}: the output must not overwrite the input")
    stats = rewrite_model(load_model_file(in_path), out_path, target)
    click.echo(f"quantize: {in_path} ({stats['in_bytes'] / 2**20:.2f} MiB) -> {out_path} "
               f"({stats['out_bytes'] / 2**20:.2f} MiB, {type_name}) in {stats['seconds']:.2f} s", err=True)
    click.echo("quantize: tensors per type: " + ", ".join(f"{name} {n}" for name, n in stats["type_counts"].items()),
               err=True)


@cli.command("export-lora")
@click.option("-m", "--model", "model_path", type=str, default=None, help="base model (default: SmolLM2)")
@click.option("--lora", "loras", multiple=True, type=str, help="adapter to merge; repeatable")
@click.option("--lora-scaled", "loras_scaled", multiple=True, type=(str, float), help="adapter FILE with scale S")
@click.option("--lora-base", type=str, default=None, help="read the patched tensors from this f16/f32 model")
@click.option("-o", "--output", "out_path", required=True, help="merged model to write (GGUF)")
@click.option("--outtype", type=click.Choice(["same", "f32", "f16", "q8_0", "q4_0", "q4_1"]), default="same")
@click.option("-t", "--threads", type=int, default=None)
def export_lora_command(model_path, loras, loras_scaled, lora_base, out_path, outtype, threads):
    """Merge adapters into the base model (in float32, quantized last) and write it as a GGUF."""
    from .loader import default_model_path, load_adapters, set_threads
    from .lora.dora import check_combination
    from .lora.merge import check_base, patched_names, weight_patch
    from .lora.replace import keep_tied_output, replacements
    from . import kernels
    from .model_file import load_model_file
    from .quantize import rewrite_model, target_type

    set_threads(threads)
    adapters = [(p, 1.0) for p in loras] + [(p, s) for p, s in loras_scaled]
    if not adapters:
        raise InputError("export-lora needs at least one --lora or --lora-scaled adapter")
    model_path = model_path or default_model_path()
    if os.path.abspath(model_path) == os.path.abspath(out_path):
        raise InputError(f"{out_path}: the output must not overwrite the base model")
    model_file = load_model_file(model_path)
    loaded = load_adapters(model_file, adapters)
    check_combination(loaded)
    for adapter in loaded:
        if adapter.invocation is not None:
            raise InputError(f"{adapter.path}: an activated LoRA (alora_invocation_tokens) applies from its "
                             "invocation tokens on and cannot be merged into a model")
    sources = None
    if lora_base:
        sources = load_model_file(lora_base).tensors
        check_base(sources, model_file.tensors, patched_names(loaded), lora_base)
    note = "+ " + ", ".join(os.path.basename(os.path.normpath(p)) for p, _ in adapters)
    whole = replacements(loaded, model_file.tensors)  # modules_to_save: written in place of the base's tensors
    changed = keep_tied_output(model_file.tensors, {**whole, **{n: None for n in patched_names(loaded)}})
    added = {name: t for name, t in changed.items() if name not in model_file.tensors}

    def patch_for(name):
        if name in whole:
            return lambda w: kernels.dequantize(whole[name].type, whole[name].data, whole[name].n_cols)
        return weight_patch(loaded, name)

    stats = rewrite_model(model_file, out_path, None if outtype == "same" else target_type(outtype),
                          patch_for=patch_for, sources=sources, name_note=note, added=added)
    click.echo(f"export-lora: wrote {out_path} ({stats['out_bytes'] / 2**20:.2f} MiB) in {stats['seconds']:.2f} s",
               err=True)


from .finetune.cli import finetune_command  # noqa: E402
cli.add_command(finetune_command, "finetune")


# Commands that live in their own packages (they import model_options and load_from_options from here).
from .server.cli import server_command  # noqa: E402

cli.add_command(server_command, "server")


if __name__ == "__main__":
    cli()
