"""The vocabulary: text ⇄ token ids, built from a model file's GGUF `tokenizer.*` metadata.

Two tokenizer models, as llama.cpp has them: `llama` (SentencePiece: merges by piece score, byte
fallback) and `gpt2` (byte-level BPE: merges by rank, after a pre-tokenizer regex chosen by
`tokenizer.ggml.pre`; the BPE itself runs in Hugging Face's `tokenizers`). Special tokens written in
the text become their ids first, longest match first, as llama.cpp partitions them.
"""

import heapq
import re
from functools import lru_cache

from .errors import VocabError

# tokenizer.ggml.token_type values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT: each regex splits the pieces the previous one left.
DEFAULT_PATTERNS = (r"[\p{P}\$\+<=>\^~\|]+",
                    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                    r"\p{N}+",
                    r"[0-9][0-9][0-9]")
BPE_PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2")
# Texts llama.cpp also treats as end of generation when the vocabulary has them.
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "_<EOT>",
             "<｜end▁of▁sentence｜>", "<|eom_id|>", "<|return|>", "<|call|>")


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, in which byte-level vocabularies are written."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


class Vocab:
    def __init__(self, model: str, tokens: list[str], scores: list[float], types: list[int], merges: list[str],
                 pre: str, bos_id: int | None, eos_id: int | None, unk_id: int | None, add_bos: bool,
                 add_space_prefix: bool, chat_template: str | None, eog_extra: tuple = (),
                 pad_id: int | None = None, add_eos: bool = False):
        self.model = model
        self.tokens = tokens
        self.scores = scores
        self.types = types
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = bos_id, eos_id, unk_id, pad_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.chat_template = chat_template
        self.token_to_id = {t: i for i, t in enumerate(tokens)}
        self.specials = sorted((i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNKNOWN) and tokens[i]),
                               key=lambda i: -len(tokens[i]))
        eog = {i for i in (eos_id, *eog_extra) if i is not None}
        eog |= {self.token_to_id[t] for t in EOG_TEXTS if t in self.token_to_id}
        self.eog_ids = frozenset(eog)
        self._bytes = [self._piece_bytes(i) for i in range(len(tokens))]
        if model == "gpt2":
            self._bpe = build_bpe(tokens, merges, pre)
        else:
            # Every two adjacent characters inside some token: between any other two, no merge can ever happen.
            self._joined_pairs = {t[k:k + 2] for t in tokens for k in range(len(t) - 1)}
            self._spm_word_ids: dict[str, list[int]] = {}

    @classmethod
    def from_metadata(cls, metadata: dict) -> "Vocab":
        def need(key):
            if key not in metadata:
                raise VocabError(f"the model's metadata has no {key}")
            return metadata[key]

        model = need("tokenizer.ggml.model")
        if model not in ("llama", "gpt2"):
            raise VocabError(f"tokenizer.ggml.model '{model}' is not supported (llama and gpt2 are)")
        tokens = need("tokenizer.ggml.tokens")
        check_list(metadata, "tokenizer.ggml.tokens", str, "strings")
        n = len(tokens)
        scores = metadata.get("tokenizer.ggml.scores") or [0.0] * n
        types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * n
        check_list(metadata, "tokenizer.ggml.scores", (int, float), "numbers")
        check_list(metadata, "tokenizer.ggml.token_type", int, "integers")
        if len(scores) != n or len(types) != n:
            raise VocabError(f"tokenizer.ggml.scores / token_type have {len(scores)} / {len(types)} entries for {n} tokens")
        check_list(metadata, "tokenizer.ggml.merges", str, "strings")
        merges = metadata.get("tokenizer.ggml.merges") or []
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if model == "gpt2" and pre not in BPE_PRE_TOKENIZERS:
            raise VocabError(f"tokenizer.ggml.pre '{pre}' is not supported (supported: {', '.join(BPE_PRE_TOKENIZERS)})")
        if model == "gpt2" and not merges:
            raise VocabError("tokenizer.ggml.merges is missing: a gpt2 (BPE) vocabulary needs its merges")

        def token_id(key, default=None):
            value = metadata.get(key, default)
            if value is not None and not 0 <= value < n:
                raise VocabError(f"{key} = {value} is outside the vocabulary of {n} tokens")
            return value

        spm = model == "llama"
        return cls(
            model, tokens, scores, types, merges, pre,
            bos_id=token_id("tokenizer.ggml.bos_token_id", 1 if spm else None),
            eos_id=token_id("tokenizer.ggml.eos_token_id", 2 if spm else None),
            unk_id=token_id("tokenizer.ggml.unknown_token_id", 0 if spm else None),
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", spm)),
            add_space_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", spm)),
            chat_template=metadata.get("tokenizer.chat_template"),
            eog_extra=(token_id("tokenizer.ggml.eot_token_id"), token_id("tokenizer.ggml.eom_token_id")),
            pad_id=token_id("tokenizer.ggml.padding_token_id"),
            add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        )

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def is_eog(self, token: int) -> bool:
        return token in self.eog_ids

    def is_control(self, token: int) -> bool:
        return self.types[token] in (CONTROL, UNKNOWN)

    # text → ids

    def tokenize(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids for text. add_bos None follows the model (tokenizer.ggml.add_bos_token); an EOS is appended
        only for models that ask for it (add_eos_token) and only unless add_bos is False, i.e. when the text is a
        whole sequence rather than a continuation, as llama.cpp's add_special does."""
        add_eos = self.add_eos and add_bos is not False and self.eos_id is not None
        add_bos = self.add_bos if add_bos is None else add_bos
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        prev_special = True
        for fragment in self.split_special(text, parse_special):
            if isinstance(fragment, int):
                ids.append(fragment)
                prev_special = True
                continue
            if self.model == "llama":
                if self.add_space_prefix and prev_special:
                    fragment = " " + fragment
                ids += self.spm_encode(fragment)
            else:
                ids += self._bpe.encode(fragment, add_special_tokens=False).ids
            prev_special = False
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def split_special(self, text: str, parse_special: bool) -> list:
        """Text fragments and special-token ids, in order (user-defined tokens always match, control ones
        only with parse_special)."""
        fragments: list = [text] if text else []
        for tid in self.specials:
            if not parse_special and self.types[tid] != USER_DEFINED:
                continue
            special = self.tokens[tid]
            out = []
            for frag in fragments:
                if isinstance(frag, int) or special not in frag:
                    out.append(frag)
                    continue
                parts = frag.split(special)
                for k, part in enumerate(parts):
                    if k:
                        out.append(tid)
                    if part:
                        out.append(part)
            fragments = out
        return fragments

    def spm_encode(self, text: str) -> list[int]:
        """llama.cpp's SentencePiece BPE over text. The text is cut where no token can span the cut (the two
        characters there never occur together in a token), which leaves the result exact; the pieces, mostly words,
        are encoded once each."""
        text = text.replace(" ", "▁")
        ids: list[int] = []
        start = 0
        for k in range(1, len(text) + 1):
            if k == len(text) or text[k - 1:k + 1] not in self._joined_pairs:
                piece = text[start:k]
                cached = self._spm_word_ids.get(piece)
                if cached is None:
                    cached = self.spm_merge(piece)
                    if len(self._spm_word_ids) < 100_000:
                        self._spm_word_ids[piece] = cached
                ids += cached
                start = k
        return ids

    def spm_merge(self, text: str) -> list[int]:
        """llama.cpp's SentencePiece BPE: merge the adjacent pair whose union has the best score, repeatedly."""
        symbols = list(text)
        if not symbols:
            return []
        prev = list(range(-1, len(symbols) - 1))
        nxt = list(range(1, len(symbols) + 1))
        nxt[-1] = -1
        heap = []

        def push(left, right):
            if left < 0 or right < 0:
                return
            tid = self.token_to_id.get(symbols[left] + symbols[right])
            if tid is not None:
                heapq.heappush(heap, (-self.scores[tid], left, symbols[left], symbols[right]))

        for i in range(len(symbols) - 1):
            push(i, i + 1)
        while heap:
            _, left, ltext, rtext = heapq.heappop(heap)
            right = nxt[left]
            if right < 0 or symbols[left] != ltext or symbols[right] != rtext:
                continue  # a stale pair: one side was merged since
            symbols[left] = ltext + rtext
            symbols[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])
        ids = []
        i = 0
        while i >= 0:
            piece = symbols[i]
            tid = self.token_to_id.get(piece)
            if tid is not None:
                ids.append(tid)
            else:
                for byte in piece.encode("utf-8"):
                    bid = self.token_to_id.get(f"<0x{byte:02X}>", self.unk_id)
                    if bid is None:
                        raise VocabError(f"the vocabulary cannot encode byte 0x{byte:02X} (no byte tokens, no <unk>)")
                    ids.append(bid)
            i = nxt[i]
        return ids

    # ids → text

    def _piece_bytes(self, tid: int) -> bytes:
        text, kind = self.tokens[tid], self.types[tid]
        if kind == BYTE:
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", text)
            if m:
                return bytes([int(m.group(1), 16)])
        if kind in (CONTROL, USER_DEFINED, UNKNOWN) or self.model == "llama":
            return text.replace("▁", " ").encode("utf-8") if self.model == "llama" else text.encode("utf-8")
        table = unicode_to_byte()
        try:
            return bytes(table[c] for c in text)
        except KeyError:
            return text.encode("utf-8")

    def token_bytes(self, token: int, skip_special: bool = False) -> bytes:
        """The bytes a token stands for; control tokens are their text, or nothing when skip_special."""
        if not 0 <= token < len(self.tokens):
            raise VocabError(f"token id {token} is outside the vocabulary of {len(self.tokens)} tokens")
        if skip_special and self.is_control(token):
            return b""
        return self._bytes[token]

    def detokenize(self, ids, skip_special: bool = False) -> str:
        """The text of ids (invalid UTF-8 becomes U+FFFD). Like llama.cpp, the space a SentencePiece vocabulary
        puts in front of the text is removed again, unless the text starts with a control token."""
        data = b"".join(self.token_bytes(t, skip_special) for t in ids)
        if self.model == "llama" and self.add_space_prefix and data.startswith(b" ") and ids \
                and not self.is_control(ids[0]):
            data = data[1:]  # the space the tokenizer added in front
        return data.decode("utf-8", errors="replace")


def check_list(metadata: dict, key: str, kind, what: str) -> None:
    """metadata[key], when present, is a list of `what` (a damaged file may hold another type there)."""
    value = metadata.get(key)
    if value is not None and (not isinstance(value, list) or not all(isinstance(v, kind) for v in value)):
        raise VocabError(f"{key} is not an array of {what}")


def build_bpe(tokens: list[str], merges: list[str], pre: str):
    """A Hugging Face BPE tokenizer over the GGUF vocabulary, with llama.cpp's pre-tokenizer for `pre`."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for index, m in enumerate(merges):
        left, sep, right = m.partition(" ") if isinstance(m, str) else ("", "", "")
        if not (left and sep and right):
            raise VocabError(f"tokenizer.ggml.merges[{index}] {m!r} is not two pieces separated by a space")
        # a merge joins two tokens into a third, and all three must be in the vocabulary
        for piece in (left, right, left + right):
            if piece not in vocab:
                raise VocabError(f"tokenizer.ggml.merges[{index}] {m!r} names {piece!r}, which is not in "
                                 "tokenizer.ggml.tokens")
        pairs.append((left, right))
    llama3 = pre in ("llama-bpe", "llama3")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=llama3, fuse_unk=False))
    # ByteLevel's own regex is GPT-2's, which the gpt2 and smollm pre-tokenizers end with.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt2", "smollm"))
    if pre == "smollm":
        steps = [pre_tokenizers.Digits(individual_digits=True), byte_level]
    elif pre == "default":
        steps = [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in DEFAULT_PATTERNS]
        steps.append(byte_level)
    elif llama3 or pre == "qwen2":
        pattern = LLAMA3_PATTERN if llama3 else QWEN2_PATTERN
        steps = [pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False), byte_level]
    else:
        steps = [byte_level]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    return tokenizer


class StreamDecoder:
    """Turns generated ids into text as they come, holding back an incomplete UTF-8 character."""

    def __init__(self, vocab: Vocab, skip_special: bool = False):
        self.vocab = vocab
        self.skip_special = skip_special
        self.pending = b""

    def push(self, token: int) -> str:
        self.pending += self.vocab.token_bytes(token, self.skip_special)
        keep = incomplete_tail(self.pending)
        ready, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return ready.decode("utf-8", errors="replace")

    def flush(self) -> str:
        ready, self.pending = self.pending, b""
        return ready.decode("utf-8", errors="replace")


def incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of data begin a UTF-8 character that is not complete yet."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: look further back for the lead byte
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return back if need > back else 0
    return 0
