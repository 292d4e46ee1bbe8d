#!/usr/bin/env python3
"""Convert a Hugging Face PEFT LoRA folder to llama.cpp's adapter files.

    python scripts/convert_lora_to_ggml.py DIR [--arch llama] [--outfile F] [--gguf]
                                           [--base MODEL.gguf | --n-head N [--n-head-kv M]]

DIR holds adapter_config.json and adapter_model.safetensors or adapter_model.bin (read without torch).
Writes DIR/ggml-adapter-model.bin (the original 'ggla' format) or, with --gguf, DIR/ggml-adapter-model.gguf
(a GGUF adapter as llama.cpp reads it today). GGUF llama files keep the rows of q and k in a permuted
order, so an adapter that targets q_proj or k_proj needs the base model's head counts: from --base (the
GGUF model the adapter will run on, whose shapes are then checked too) or from --n-head / --n-head-kv.
"""

import argparse
import os
import sys

try:
    import llamalora  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llamalora.errors import AdapterError, InputError, LlamaLoraError


def parse_args(argv):
    p = argparse.ArgumentParser(description="Convert a PEFT LoRA folder to a ggla .bin or a GGUF adapter.")
    p.add_argument("dir", help="folder with adapter_config.json and adapter_model.safetensors or .bin")
    p.add_argument("--arch", default="llama", help="model architecture (only llama is supported)")
    p.add_argument("--outfile", default=None, help="output path (default: DIR/ggml-adapter-model.bin or .gguf)")
    p.add_argument("--gguf", action="store_true", help="write a GGUF adapter instead of a ggla .bin")
    p.add_argument("--outtype", choices=["f32", "f16"], default="f32", help="type of the LoRA matrices")
    p.add_argument("--base", default=None, help="the GGUF base model (for head counts and a shape check)")
    p.add_argument("--n-head", type=int, default=None, help="attention heads of the base model")
    p.add_argument("--n-head-kv", type=int, default=None, help="key/value heads (default: --n-head)")
    return p.parse_args(argv)


def base_metadata(args):
    """Metadata the PEFT reader needs, and the base model's tensors when --base is given."""
    if args.base and args.n_head is not None:
        raise InputError("give either --base or --n-head/--n-head-kv, not both")
    if args.base:
        from llamalora.model_file import load_model_file

        model = load_model_file(args.base)
        arch = model.metadata.get("general.architecture")
        if arch != args.arch:
            raise InputError(f"{args.base}: base model architecture is {arch!r}, --arch is {args.arch!r}")
        return model.metadata, model.tensors
    metadata = {"general.architecture": args.arch}
    if args.n_head is not None:
        if args.n_head <= 0 or (args.n_head_kv is not None and args.n_head_kv <= 0):
            raise InputError("--n-head and --n-head-kv must be positive")
        metadata[f"{args.arch}.attention.head_count"] = args.n_head
        metadata[f"{args.arch}.attention.head_count_kv"] = args.n_head_kv or args.n_head
    elif args.n_head_kv is not None:
        raise InputError("--n-head-kv needs --n-head")
    return metadata, None


def convert(argv) -> str:
    import numpy as np

    from llamalora.lora.adapter import check_adapter
    from llamalora.lora.peft import read_peft

    args = parse_args(argv)
    if args.arch != "llama":
        raise InputError(f"--arch {args.arch}: only llama is supported")
    if not os.path.isdir(args.dir):
        raise AdapterError(f"{args.dir}: not a folder (expected a PEFT adapter folder)")
    metadata, base_tensors = base_metadata(args)
    try:
        adapter = read_peft(args.dir, metadata)
    except AdapterError as e:
        if "head_count" in str(e) and args.base is None:
            raise AdapterError(f"{e}; give --base MODEL.gguf or --n-head N --n-head-kv M") from None
        raise
    if base_tensors is not None:
        check_adapter(adapter, base_tensors)
    dtype = np.float16 if args.outtype == "f16" else np.float32
    default_name = "ggml-adapter-model.gguf" if args.gguf else "ggml-adapter-model.bin"
    outfile = args.outfile or os.path.join(args.dir, default_name)
    try:
        if args.gguf:
            from llamalora.lora.gguf_adapter import write_gguf_adapter

            write_gguf_adapter(outfile, adapter, args.arch, dtype)
        else:
            from llamalora.lora.ggla import write_ggla

            write_ggla(outfile, adapter, metadata, dtype)
    except OSError as e:
        raise AdapterError(f"{outfile}: cannot write it: {e.strerror or e}") from None
    return (f"wrote {outfile}: {len(adapter.tensors)} tensors, r = {adapter.r}, alpha = {adapter.alpha:g}, "
            f"{'gguf' if args.gguf else 'ggla'} {args.outtype}")


def main(argv=None) -> int:
    try:
        print(convert(sys.argv[1:] if argv is None else argv))
    except LlamaLoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
