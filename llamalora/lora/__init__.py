"""LoRA adapters: reading PEFT folders, ggla and GGUF adapters, writing the llama.cpp formats, merging."""
