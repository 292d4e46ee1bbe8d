"""One exception family per kind of bad input; the CLI catches LlamaLoraError once and prints one line.

Every message names the file, tensor or field at fault and what is wrong with it.
"""


class LlamaLoraError(Exception):
    """Base of every error a user can cause. str(e) is the one line the CLI prints: control characters that a
    message quotes from a damaged file (a newline inside a tensor name) are shown as escapes."""

    def __str__(self) -> str:
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in super().__str__())


class ModelFileError(LlamaLoraError):
    """A model file (GGUF or legacy ggjt) is unreadable, truncated, inconsistent or unsupported."""


class AdapterError(LlamaLoraError):
    """A LoRA adapter (PEFT folder, ggla .bin, GGUF adapter) cannot be read or does not fit the model."""


class VocabError(LlamaLoraError):
    """The vocabulary metadata is missing or inconsistent, or a token id is out of range."""


class InputError(LlamaLoraError):
    """A prompt, text file, option value or request field is invalid."""


class GrammarError(LlamaLoraError):
    """A GBNF grammar or JSON schema cannot be parsed or cannot match anything."""
