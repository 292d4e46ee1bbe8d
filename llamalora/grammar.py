"""GBNF grammars (llama.cpp's grammar format) and grammar-constrained token selection.

Parsing turns the text into rules over Unicode code points, as llama.cpp's parser does: `( … )` groups and
repetitions (`*` `+` `?` `{m,n}`) become generated rules, repetition by right recursion. The rules are then
compiled to bytes (a character class becomes alternatives of UTF-8 byte sequences), so tokens that end
inside a multi-byte character need no special case.

Matching follows llama.cpp: the grammar state is a set of pushdown stacks of element positions, each with
a byte element on top (the empty stack means the text may end here). Here every distinct stack set is
interned as an id and its transitions on each byte are filled in lazily, which makes a DFA over stack
sets; the allowed-token mask is a walk of the vocabulary's byte-sorted token list through that table
(numba), and masks are cached per state, so a repeated state costs a lookup.
"""

import weakref

import numpy as np
from numba import njit

from .errors import GrammarError

MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)  # not encodable in UTF-8: no character class ever matches them
MAX_REPETITION = 2000  # as llama.cpp: {m,n} is expanded, so bounds are kept sane

# Parsed elements: ("chars", ((lo, hi), ...)) code point ranges, sorted and disjoint; ("ref", rule_id).
CHARS, REF = "chars", "ref"


def _location(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, col


def normalize_ranges(ranges, negate: bool = False) -> tuple:
    """Sorted, merged code point ranges (surrogates removed); negate takes the complement over all of Unicode."""
    merged = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    if negate:
        out, nxt = [], 0
        for lo, hi in merged:
            if lo > nxt:
                out.append([nxt, lo - 1])
            nxt = hi + 1
        if nxt <= MAX_CODE_POINT:
            out.append([nxt, MAX_CODE_POINT])
        merged = out
    result = []
    for lo, hi in merged:  # cut the surrogate block out
        if hi < SURROGATES[0] or lo > SURROGATES[1]:
            result.append((lo, hi))
        else:
            if lo < SURROGATES[0]:
                result.append((lo, SURROGATES[0] - 1))
            if hi > SURROGATES[1]:
                result.append((SURROGATES[1] + 1, hi))
    return tuple(result)


def is_word_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c in "-_")


class _Parser:
    """Recursive descent over the text, mirroring llama.cpp's grammar-parser (same constructs, same layout rules:
    a rule ends at a newline unless inside parentheses or right after `|`)."""

    ESCAPES = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-", "^": "^"}

    def __init__(self, text: str, source: str):
        self.text, self.source = text, source
        self.names: list[str] = []
        self.ids: dict[str, int] = {}
        self.rules: dict[int, list[list]] = {}
        self.positions: dict[int, int] = {}  # rule id -> where it is defined (or the group that made it)
        self.first_use: dict[int, int] = {}
        self.generated: dict[str, int] = {}

    def error(self, pos: int, message: str) -> GrammarError:
        line, col = _location(self.text, pos)
        return GrammarError(f"{self.source}:{line}:{col}: {message}")

    def symbol(self, name: str) -> int:
        if name not in self.ids:
            self.ids[name] = len(self.names)
            self.names.append(name)
        return self.ids[name]

    def new_symbol(self, base: str, pos: int) -> int:
        k = self.generated.get(base, 0)
        while f"{base}_{k}" in self.ids:
            k += 1
        self.generated[base] = k + 1
        rid = self.symbol(f"{base}_{k}")
        self.positions[rid] = pos
        return rid

    def space(self, pos: int, newline_ok: bool) -> int:
        text, n = self.text, len(self.text)
        while pos < n:
            c = text[pos]
            if c in " \t" or (newline_ok and c in "\r\n"):
                pos += 1
            elif c == "#":
                while pos < n and text[pos] not in "\r\n":
                    pos += 1
            else:
                break
        return pos

    def name_end(self, pos: int) -> int:
        while pos < len(self.text) and is_word_char(self.text[pos]):
            pos += 1
        return pos

    def char(self, pos: int) -> tuple[int, int]:
        """One possibly escaped character of a literal or class: (code point, next position)."""
        text = self.text
        if pos >= len(text):
            raise self.error(pos, "unexpected end of input")
        if text[pos] != "\\":
            return ord(text[pos]), pos + 1
        if pos + 1 >= len(text):
            raise self.error(pos, "unexpected end of input after '\\'")
        e = text[pos + 1]
        digits = {"x": 2, "u": 4, "U": 8}.get(e)
        if digits:
            hex_text = text[pos + 2:pos + 2 + digits]
            if len(hex_text) != digits or any(c not in "0123456789abcdefABCDEF" for c in hex_text):
                raise self.error(pos, f"'\\{e}' needs {digits} hex digits")
            value = int(hex_text, 16)
            if value > MAX_CODE_POINT:
                raise self.error(pos, f"'\\{e}{hex_text}' is beyond the last Unicode code point U+10FFFF")
            return value, pos + 2 + digits
        if e in self.ESCAPES:
            return ord(self.ESCAPES[e]), pos + 2
        raise self.error(pos, f"unknown escape '\\{e}'")

    def parse(self) -> None:
        pos = self.space(0, True)
        while pos < len(self.text):
            pos = self.rule(pos)

    def rule(self, start: int) -> int:
        text = self.text
        end = self.name_end(start)
        if end == start:
            raise self.error(start, f"expected a rule name, found {text[start]!r}")
        name = text[start:end]
        rid = self.symbol(name)
        if rid in self.rules:
            line, col = _location(text, self.positions[rid])
            raise self.error(start, f"rule '{name}' is already defined at line {line}, column {col}")
        self.positions[rid] = start
        pos = self.space(end, False)
        if text[pos:pos + 3] != "::=":
            raise self.error(pos, f"expected '::=' after rule name '{name}'")
        pos = self.space(pos + 3, True)
        self.rules[rid], pos = self.alternates(pos, name, False)
        if pos < len(text):
            if text[pos] == "\r":
                pos += 2 if text[pos + 1:pos + 2] == "\n" else 1
            elif text[pos] == "\n":
                pos += 1
            else:
                raise self.error(pos, f"expected newline or end of input, found {text[pos]!r}")
        return self.space(pos, True)

    def alternates(self, pos: int, rule_name: str, nested: bool) -> tuple[list, int]:
        alts = []
        seq, pos = self.sequence(pos, rule_name, nested)
        alts.append(seq)
        while pos < len(self.text) and self.text[pos] == "|":
            pos = self.space(pos + 1, True)
            seq, pos = self.sequence(pos, rule_name, nested)
            alts.append(seq)
        return alts, pos

    def sequence(self, pos: int, rule_name: str, nested: bool) -> tuple[list, int]:
        text, n = self.text, len(self.text)
        seq: list = []
        last = 0  # where the last item starts in seq: what a repetition operator repeats
        while pos < n:
            c = text[pos]
            if c == '"':
                start, pos, last = pos, pos + 1, len(seq)
                while pos < n and text[pos] != '"':
                    cp, pos = self.char(pos)
                    seq.append((CHARS, ((cp, cp),)))
                if pos >= n:
                    raise self.error(start, "unterminated string literal")
                pos = self.space(pos + 1, nested)
            elif c == "[":
                start, pos, last = pos, pos + 1, len(seq)
                negate = pos < n and text[pos] == "^"
                pos += negate
                ranges = []
                while pos < n and text[pos] != "]":
                    lo, pos = self.char(pos)
                    hi = lo
                    if pos + 1 < n and text[pos] == "-" and text[pos + 1] != "]":
                        hi, end = self.char(pos + 1)
                        if hi < lo:
                            raise self.error(pos - 1, f"character range {chr(lo)!r}-{chr(hi)!r} ends before it starts")
                        pos = end
                    ranges.append((lo, hi))
                if pos >= n:
                    raise self.error(start, "unterminated character class")
                seq.append((CHARS, normalize_ranges(ranges, negate)))
                pos = self.space(pos + 1, nested)
            elif is_word_char(c):
                end = self.name_end(pos)
                rid = self.symbol(text[pos:end])
                self.first_use.setdefault(rid, pos)
                last = len(seq)
                seq.append((REF, rid))
                pos = self.space(end, nested)
            elif c == "(":
                start, last = pos, len(seq)
                rid = self.new_symbol(rule_name, start)
                self.rules[rid], pos = self.alternates(self.space(pos + 1, True), rule_name, True)
                if pos >= n or text[pos] != ")":
                    raise self.error(pos if pos < n else start, "expected ')'" if pos < n
                                     else "unclosed '(' (no matching ')')")
                seq.append((REF, rid))
                pos = self.space(pos + 1, nested)
            elif c == ".":
                last = len(seq)
                seq.append((CHARS, normalize_ranges([(0, MAX_CODE_POINT)])))
                pos = self.space(pos + 1, nested)
            elif c in "*+?{":
                if last >= len(seq):
                    raise self.error(pos, f"'{c}' has nothing before it to repeat")
                if c == "{":
                    lo, hi, pos = self.braces(pos)
                else:
                    lo, hi = {"*": (0, -1), "+": (1, -1), "?": (0, 1)}[c]
                    pos += 1
                self.repeat(seq, last, lo, hi, rule_name, pos)
                pos = self.space(pos, nested)
            elif c == "<":
                raise self.error(pos, "token references (<[id]>, <token>) are not supported")
            else:
                break
        return seq, pos

    def braces(self, start: int) -> tuple[int, int, int]:
        """`{m}`, `{m,}`, `{,n}`, `{m,n}` → (min, max or -1, position after the '}')."""
        text = self.text

        def integer(pos):
            end = pos
            while end < len(text) and text[end].isascii() and text[end].isdigit():
                end += 1
            return (int(text[pos:end]) if end > pos else None), end

        pos = self.space(start + 1, False)
        lo, pos = integer(pos)
        pos = self.space(pos, False)
        if pos < len(text) and text[pos] == ",":
            pos = self.space(pos + 1, False)
            hi, pos = integer(pos)
            hi = -1 if hi is None else hi
            lo = 0 if lo is None else lo
        elif lo is None:
            raise self.error(pos, "expected a number after '{'")
        else:
            hi = lo
        pos = self.space(pos, False)
        if pos >= len(text) or text[pos] != "}":
            raise self.error(pos, "expected '}' to close the repetition")
        if hi != -1 and hi < lo:
            raise self.error(start, f"repetition {{{lo},{hi}}}: the maximum is below the minimum")
        if max(lo, hi) > MAX_REPETITION:
            raise self.error(start, f"repetition count above {MAX_REPETITION}")
        return lo, hi, pos + 1

    def repeat(self, seq: list, last: int, lo: int, hi: int, rule_name: str, pos: int) -> None:
        """Rewrite seq[last:] as lo copies followed by optional ones, as llama.cpp's handle_repetitions:
        x* → r ::= x r | ε;  x{2,4} → x x r2 with r1 ::= x | ε, r2 ::= x r1 | ε."""
        item = seq[last:]
        if lo == 0:
            del seq[last:]
        else:
            seq.extend(item * (lo - 1))
        n_optional = 1 if hi < 0 else hi - lo
        previous = None
        for i in range(n_optional):
            rid = self.new_symbol(rule_name, pos)
            body = list(item)
            if hi < 0:
                body.append((REF, rid))
            elif i > 0:
                body.append((REF, previous))
            self.rules[rid] = [body, []]
            previous = rid
        if n_optional > 0:
            seq.append((REF, previous))


def parse_grammar(text: str, source: str = "grammar") -> "Grammar":
    """Parse GBNF text into a Grammar ready for matching. Errors are GrammarError('source:line:col: message');
    a grammar that is left-recursive, lacks 'root', refers to undefined rules or matches no text at all is an error."""
    parser = _Parser(text, source)
    parser.parse()
    check_rules(parser)
    return Grammar(parser.names, parser.rules, parser.ids["root"])


def check_rules(parser: _Parser) -> None:
    """Undefined references, missing root, left recursion and unproductive rules; unproductive alternatives are
    dropped so that every stack the matcher builds can still be completed."""
    for rid, pos in sorted(parser.first_use.items(), key=lambda kv: kv[1]):
        if rid not in parser.rules:
            raise parser.error(pos, f"undefined rule '{parser.names[rid]}'")
    if "root" not in parser.ids or parser.ids["root"] not in parser.rules:
        raise parser.error(len(parser.text), "the grammar has no 'root' rule")
    rules = parser.rules

    nullable: set[int] = set()
    changed = True
    while changed:
        changed = False
        for rid, alts in rules.items():
            if rid not in nullable and any(all(e[0] == REF and e[1] in nullable for e in alt) for alt in alts):
                nullable.add(rid)
                changed = True

    # Left recursion: a rule reachable from itself through leftmost, possibly preceded by nullable, references.
    def leftmost(rid):
        for alt in rules[rid]:
            for kind, value in alt:
                if kind != REF:
                    break
                yield value
                if value not in nullable:
                    break

    state: dict[int, int] = {}  # 1 = on the path, 2 = done

    def visit(rid, path):
        state[rid] = 1
        for nxt in leftmost(rid):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                named = [parser.names[r] for r in cycle]
                raise parser.error(parser.positions.get(nxt, 0),
                                   f"rule '{named[0]}' is left-recursive ({' -> '.join(named)}); "
                                   "rewrite it with repetition")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[rid] = 2

    for rid in rules:
        if rid not in state:
            visit(rid, [rid])

    productive: set[int] = set()
    changed = True
    while changed:
        changed = False
        for rid, alts in rules.items():
            if rid not in productive and any(all((e[1] if e[0] == CHARS else e[1] in productive) for e in alt)
                                             for alt in alts):
                productive.add(rid)
                changed = True
    root = parser.ids["root"]
    if root not in productive:
        raise parser.error(parser.positions[root], "the grammar cannot match any text: rule 'root' never completes "
                                                   "(an empty character class or endless recursion)")
    for rid in list(rules):
        if rid in productive:
            rules[rid] = [alt for alt in rules[rid]
                          if all((e[1] if e[0] == CHARS else e[1] in productive) for e in alt)]
        else:
            del rules[rid]


def utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """The code points lo..hi (no surrogates) as alternatives of UTF-8 byte-range sequences, each sequence a
    list of (first, last) byte ranges, one per byte (the splitting scheme of Rust's regex-syntax Utf8Sequences)."""
    for limit in (0x7F, 0x7FF, 0xFFFF):
        if lo <= limit < hi:
            return utf8_sequences(lo, limit) + utf8_sequences(limit + 1, hi)
    if hi <= 0x7F:
        return [[(lo, hi)]]
    n = len(chr(lo).encode("utf-8"))
    for i in range(1, n):
        m = (1 << (6 * i)) - 1
        if lo & ~m != hi & ~m:
            if lo & m:
                return utf8_sequences(lo, lo | m) + utf8_sequences((lo | m) + 1, hi)
            if hi & m != m:
                return utf8_sequences(lo, (hi & ~m) - 1) + utf8_sequences(hi & ~m, hi)
    a, b = chr(lo).encode("utf-8"), chr(hi).encode("utf-8")
    return [[(a[k], b[k]) for k in range(n)]]


# Compiled (byte-level) element kinds in the flat element array.
END, RULE, BYTES = 0, 1, 2
MAX_STATES = 200_000  # interned stack sets before every cache is dropped and rebuilt (bounds memory)
MAX_CACHED_MASKS = 4096


class Grammar:
    """A parsed grammar compiled to bytes, with the lazily built transition table shared by all its states."""

    def __init__(self, names: list[str], rules: dict[int, list[list]], root: int):
        self.names = names
        self.rules = rules  # parsed rules over code points, unproductive alternatives removed
        self.root = root
        self._compile()
        self._reset_states()

    # compile to bytes

    def _compile(self) -> None:
        kinds, values = [], []
        byte_sets: list[np.ndarray] = []
        set_index: dict[tuple, int] = {}
        rule_alts: dict[int, list[int]] = {}
        class_rules: dict[tuple, int] = {}
        pending: list[tuple[int, list[list]]] = []  # byte-level rules: (id, alternatives of (kind, value))
        next_id = [max(self.rules) + 1]

        def byte_set(ranges) -> tuple:
            key = tuple(ranges)
            if key not in set_index:
                bits = np.zeros(256, dtype=bool)
                for a, b in ranges:
                    bits[a:b + 1] = True
                set_index[key] = len(byte_sets)
                byte_sets.append(bits)
            return (BYTES, set_index[key])

        def chars(ranges) -> list:
            if ranges[-1][1] <= 0x7F:
                return [byte_set(ranges)]
            if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
                return [byte_set([(b, b)]) for b in chr(ranges[0][0]).encode("utf-8")]
            if ranges not in class_rules:
                rid = class_rules[ranges] = next_id[0]
                next_id[0] += 1
                ascii_part = [(lo, min(hi, 0x7F)) for lo, hi in ranges if lo <= 0x7F]
                alts = [[byte_set(ascii_part)]] if ascii_part else []
                for lo, hi in ranges:
                    for seq in utf8_sequences(max(lo, 0x80), hi) if hi >= 0x80 else []:
                        alts.append([byte_set([r]) for r in seq])
                pending.append((rid, alts))
            return [(RULE, class_rules[ranges])]

        for rid, alts in self.rules.items():
            compiled = []
            for alt in alts:
                seq = []
                for kind, value in alt:
                    seq.extend(chars(value) if kind == CHARS else [(RULE, value)])
                compiled.append(seq)
            pending.append((rid, compiled))
        for rid, alts in pending:
            starts = []
            for seq in alts:
                starts.append(len(kinds))
                for kind, value in seq:
                    kinds.append(kind)
                    values.append(value)
                kinds.append(END)
                values.append(0)
            rule_alts[rid] = starts
        self._start_pos = len(kinds)  # a virtual "root" reference the start stack holds
        kinds += [RULE, END]
        values += [self.root, 0]
        self._kinds, self._values = kinds, values
        self._byte_sets = np.array(byte_sets, dtype=bool).reshape(-1, 256)
        self._rule_alts = rule_alts

    # stacks and interned stack sets

    def _reset_states(self) -> None:
        self._sets: list[frozenset] = [frozenset()]  # id 0: no stack left, the dead state
        self._ids: dict[frozenset, int] = {frozenset(): 0}
        self._accepting = [False]
        self._trans = np.full((256, 256), -1, dtype=np.int32)
        self._trans[0] = 0
        self._advanced: dict[tuple, frozenset] = {}
        self._masks: dict[tuple, np.ndarray] = {}
        self._costs: dict[int, int] = {}

    def _advance(self, stack: tuple) -> frozenset:
        """The stacks stack stands for once every rule reference on top is expanded: each has a byte element
        on top, or is empty (the text may end). llama.cpp's advance_stack."""
        done = self._advanced.get(stack)
        if done is not None:
            return done
        if not stack or self._kinds[stack[-1]] == BYTES:
            result = frozenset((stack,))
        else:
            p = stack[-1]
            base = stack[:-1] if self._kinds[p + 1] == END else stack[:-1] + (p + 1,)
            out: set = set()
            for a in self._rule_alts[self._values[p]]:
                out |= self._advance(base if self._kinds[a] == END else base + (a,))
            result = frozenset(out)
        self._advanced[stack] = result
        return result

    def _intern(self, stacks: frozenset) -> int:
        sid = self._ids.get(stacks)
        if sid is None:
            sid = self._ids[stacks] = len(self._sets)
            self._sets.append(stacks)
            self._accepting.append(() in stacks)
            if sid >= len(self._trans):
                grown = np.full((2 * len(self._trans), 256), -1, dtype=np.int32)
                grown[:len(self._trans)] = self._trans
                self._trans = grown
        return sid

    def _expand(self, sid: int) -> None:
        """Fill the transition row of state sid: for each byte, the interned set of stacks after it."""
        live = [s for s in self._sets[sid] if s]
        row = np.zeros(256, dtype=np.int32)
        if live:
            member = self._byte_sets[[self._values[s[-1]] for s in live]]
            successors = []
            for s in live:
                p = s[-1]
                successors.append(self._advance(s[:-1] if self._kinds[p + 1] == END else s[:-1] + (p + 1,)))
            if len(live) == 1:
                row[member[0]] = self._intern(successors[0])
            else:
                # bytes with the same set of matching stacks lead to the same state: one union per group
                columns = np.ascontiguousarray(np.packbits(member, axis=0).T)
                keys = columns.view(np.dtype((np.void, columns.shape[1]))).ravel()
                _, first, group = np.unique(keys, return_index=True, return_inverse=True)
                for g, b in enumerate(first):
                    matching = np.flatnonzero(member[:, b])
                    if len(matching):
                        row[group == g] = self._intern(frozenset().union(*(successors[k] for k in matching)))
        self._trans[sid] = row

    def _step(self, sid: int, byte: int) -> int:
        nxt = self._trans[sid, byte]
        if nxt < 0:
            self._expand(sid)
            nxt = self._trans[sid, byte]
        return int(nxt)

    def _maybe_reset(self) -> None:
        if len(self._sets) > MAX_STATES:
            self._reset_states()

    # public

    def start(self) -> "GrammarState":
        return GrammarState(self, self._advance((self._start_pos,)))

    def matches(self, data: bytes | str) -> bool:
        """Whether the whole of data is a sentence of the grammar."""
        state = self.start()
        try:
            state.accept_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        except GrammarError:
            return False
        return state.can_end()

    def _mask(self, sid: int, index: "VocabIndex") -> np.ndarray:
        key = (index.key, sid)
        packed = self._masks.pop(key, None)
        if packed is None:
            allowed = np.zeros(index.n_vocab, dtype=bool)
            states = np.zeros(index.max_len + 1, dtype=np.int32)
            states[0] = sid
            i, depth, dead = 0, -1, 0
            while True:
                i, depth, dead = _walk(self._trans, index.data, index.offsets, index.lcp, index.order, allowed,
                                       states, i, depth, dead)
                if i >= len(index.order):
                    break
                self._expand(int(states[depth]))  # a transition not known yet: fill it in, then resume
            allowed[index.eog] = self._accepting[sid]
            packed = np.packbits(allowed)
            if len(self._masks) >= MAX_CACHED_MASKS:
                self._masks.pop(next(iter(self._masks)))
        self._masks[key] = packed  # most recently used last
        out = np.unpackbits(packed, count=index.n_vocab).view(bool)
        return out

    def _cost(self, sid: int) -> int:
        """Fewest bytes that complete the text from state sid (shortest_completion)."""
        if sid not in self._costs:
            lengths = self._rule_lengths()
            self._costs[sid] = min(sum(self._suffix_length(p, lengths) for p in s) for s in self._sets[sid]) \
                if self._sets[sid] else 1 << 60
        return self._costs[sid]

    def _rule_lengths(self) -> dict[int, int]:
        if getattr(self, "_lengths", None) is None:
            lengths = {r: 1 << 60 for r in self._rule_alts}
            changed = True
            while changed:
                changed = False
                for r, starts in self._rule_alts.items():
                    best = min(self._suffix_length(a, lengths) for a in starts)
                    if best < lengths[r]:
                        lengths[r], changed = best, True
            self._lengths = lengths
        return self._lengths

    def _suffix_length(self, p: int, lengths: dict[int, int]) -> int:
        total = 0
        while self._kinds[p] != END:
            total += 1 if self._kinds[p] == BYTES else lengths[self._values[p]]
            p += 1
        return total


class GrammarState:
    """Where the output stands in the grammar: the set of pushdown stacks. Cheap to copy."""

    __slots__ = ("grammar", "stacks")

    def __init__(self, grammar: Grammar, stacks: frozenset):
        self.grammar, self.stacks = grammar, stacks

    def copy(self) -> "GrammarState":
        return GrammarState(self.grammar, self.stacks)

    def can_end(self) -> bool:
        """The output so far is a complete sentence: end-of-generation tokens are allowed."""
        return () in self.stacks

    def must_end(self) -> bool:
        """Nothing may follow: only end-of-generation tokens are allowed."""
        return self.stacks == frozenset(((),))

    def allowed_mask(self, vocab) -> np.ndarray:
        """bool[n_vocab]: the tokens whose bytes keep the output inside the grammar (a prefix of a sentence),
        end-of-generation tokens only when the output can end here. Control tokens and tokens without bytes are
        never allowed: they are not text."""
        g = self.grammar
        g._maybe_reset()
        return g._mask(g._intern(self.stacks), vocab_index(vocab))

    def accept(self, token: int, vocab) -> None:
        """Advance past a chosen token; GrammarError if the grammar does not allow it."""
        if vocab.is_eog(token):
            if not self.can_end():
                raise GrammarError(f"token {token} ends the output, but the grammar needs more text")
            self.stacks = frozenset(((),))
            return
        self.accept_bytes(vocab.token_bytes(token))

    def accept_bytes(self, data: bytes) -> None:
        g = self.grammar
        g._maybe_reset()
        sid = g._intern(self.stacks)
        for k, b in enumerate(data):
            sid = g._step(sid, b)
            if sid == 0:
                raise GrammarError(f"the grammar does not allow {data!r} here (byte {k} does not fit)")
        self.stacks = g._sets[sid]

    def shortest_completion(self) -> bytes:
        """The shortest bytes that make the output a complete sentence (b"" if it already is)."""
        g = self.grammar
        sid, out = g._intern(self.stacks), bytearray()
        while not g._accepting[sid]:
            cost = g._cost(sid)
            for b in range(256):
                nxt = g._step(sid, b)
                if nxt and g._cost(nxt) == cost - 1:
                    out.append(b)
                    sid = nxt
                    break
        return bytes(out)


def mask_logits(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """logits with every token the mask forbids at -inf (a copy)."""
    out = np.array(logits, dtype=np.float32, copy=True)
    out[~mask[:len(out)]] = -np.inf
    return out


def load_grammar_file(path: str) -> Grammar:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise GrammarError(f"{path}: cannot read the grammar file: {e}") from None
    return parse_grammar(text, source=path)


# the vocabulary as a byte-sorted token list

class VocabIndex:
    """Token ids sorted by their bytes, with each one's common prefix length with the one before: walking the
    list in order visits the vocabulary's byte trie depth first."""

    def __init__(self, vocab):
        is_control = getattr(vocab, "is_control", lambda t: False)
        items, eog = [], []
        for t in range(vocab.n_vocab):
            if vocab.is_eog(t):
                eog.append(t)
            elif not is_control(t):
                b = vocab.token_bytes(t)
                if b:
                    items.append((b, t))
        items.sort()
        self.n_vocab = vocab.n_vocab
        self.key = id(self)
        self.eog = np.array(eog, dtype=np.int64)
        self.order = np.array([t for _, t in items], dtype=np.int64)
        lengths = np.array([len(b) for b, _ in items], dtype=np.int64)
        self.offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(b for b, _ in items), dtype=np.uint8)
        self.lcp = _common_prefixes(self.data, self.offsets)
        self.max_len = int(lengths.max()) if len(items) else 0


_indexes: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def vocab_index(vocab) -> VocabIndex:
    index = _indexes.get(vocab)
    if index is None:
        index = _indexes[vocab] = VocabIndex(vocab)
    return index


@njit(cache=True)
def _common_prefixes(data, offsets):
    n = len(offsets) - 1
    lcp = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        a, b = offsets[i - 1], offsets[i]
        m = min(offsets[i] - a, offsets[i + 1] - b)
        k = 0
        while k < m and data[a + k] == data[b + k]:
            k += 1
        lcp[i] = k
    return lcp


@njit(cache=True)
def _walk(trans, data, offsets, lcp, order, allowed, states, i, depth, dead):
    """Mark allowed tokens from token i on. states[d] is the state after the first d bytes of the current token;
    dead > 0 means the current prefix of that length leads nowhere, so tokens sharing it are skipped.
    Returns (i, d, dead) when states[d] has no transition row yet (the caller fills it in and resumes with
    depth d), or (len(order), 0, 0) when done."""
    n = len(order)
    while i < n:
        start = offsets[i]
        length = offsets[i + 1] - start
        if depth < 0:
            shared = lcp[i]
            if dead > 0 and shared >= dead:
                i += 1
                continue
            dead = 0
            d = shared
        else:
            d = depth
            depth = -1
        ok = True
        while d < length:
            nxt = trans[states[d], data[start + d]]
            if nxt < 0:
                return i, d, dead
            if nxt == 0:
                dead = d + 1
                ok = False
                break
            states[d + 1] = nxt
            d += 1
        if ok:
            allowed[order[i]] = True
        i += 1
    return n, 0, 0
