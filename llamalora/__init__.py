"""llamalora: LLaMA-family GGUF models on the CPU, with LoRA adapters applied on the fly."""

__version__ = "0.1.0"
