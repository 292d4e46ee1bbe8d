"""Grammar-constrained token selection for GBNF grammars (parsed by gbnf.py).

The rules over code points are compiled to bytes (a character class becomes alternatives of UTF-8 byte
sequences), so tokens that end inside a multi-byte character need no special case.

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
from .gbnf import CHARS, parse_rules


def parse_grammar(text: str, source: str = "grammar") -> "Grammar":
    """Parse GBNF text into a Grammar ready for matching. Errors are GrammarError('source:line:col: message');
    a grammar that is left-recursive, lacks 'root', refers to undefined rules or matches no text at all is an error."""
    return Grammar(*parse_rules(text, source))


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
MAX_STACKS = 1_000_000  # interned stacks before the tables are dropped and rebuilt (bounds memory)
MAX_CACHED_MASKS = 4096
EMPTY = 0  # the id of the empty stack: the text may end here


class Grammar:
    """A parsed grammar compiled to bytes. Its matching tables (an Automaton) are shared by all its states."""

    def __init__(self, names: list[str], rules: dict[int, list[list]], root: int):
        self.names = names
        self.rules = rules  # parsed rules over code points, unproductive alternatives removed
        self.root = root
        self._compile()
        self._lengths = self._rule_lengths()
        self.automaton = Automaton(self)

    def _compile(self) -> None:
        kinds, values = [], []
        byte_sets: list[np.ndarray] = []
        set_index: dict[tuple, int] = {}
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
        rule_alts: dict[int, list[int]] = {}
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
        self.start_pos = len(kinds)  # a virtual reference to root: the start stack holds it
        kinds += [RULE, END]
        values += [self.root, 0]
        self.kinds, self.values = kinds, values
        self.byte_sets = np.array(byte_sets, dtype=bool).reshape(-1, 256)
        self.byte_rows = self.byte_sets.astype(np.int32)
        self.rule_alts = rule_alts

    def _rule_lengths(self) -> dict[int, int]:
        """Fewest bytes each byte-level rule can match."""
        lengths = {r: 1 << 60 for r in self.rule_alts}
        changed = True
        while changed:
            changed = False
            for r, starts in self.rule_alts.items():
                best = min(self.suffix_length(a, lengths) for a in starts)
                if best < lengths[r]:
                    lengths[r], changed = best, True
        return lengths

    def suffix_length(self, p: int, lengths: dict[int, int] | None = None) -> int:
        """Fewest bytes that finish the alternative from element p on."""
        lengths = lengths or self._lengths
        total = 0
        while self.kinds[p] != END:
            total += 1 if self.kinds[p] == BYTES else lengths[self.values[p]]
            p += 1
        return total

    def start(self) -> "GrammarState":
        a = self.tables()
        return GrammarState(self, a, a.intern(a.advance(a.push(EMPTY, self.start_pos))))

    def tables(self) -> "Automaton":
        if self.automaton.n_stacks > MAX_STACKS:
            self.automaton = Automaton(self)
        return self.automaton

    def matches(self, data: bytes | str) -> bool:
        """Whether the whole of data is a sentence of the grammar."""
        state = self.start()
        try:
            state.accept_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        except GrammarError:
            return False
        return state.can_end()


class Automaton:
    """The lazily built tables of one grammar. A stack is an interned id (top position, id of the stack below);
    a state is an interned sorted tuple of stack ids, each with a byte element on top or empty; trans[state, byte]
    is the next state, -1 while not computed yet, 0 (the state with no stacks) when the byte is not allowed.
    Tuples of ints rather than frozensets because the garbage collector stops tracking them: tables of many
    thousand sets would otherwise make every full collection of the process slower."""

    def __init__(self, grammar: Grammar):
        self.g = grammar
        self.stack_pos, self.stack_below = [-1], [-1]  # stack 0 is the empty stack
        self.stack_ids: dict[tuple[int, int], int] = {}
        self.advanced: dict[int, tuple] = {}
        self.successors: dict[int, tuple[int, tuple]] = {}
        self.sets: list[tuple] = [()]
        self.ids: dict[tuple, int] = {(): 0}
        self.accepting = [False]
        self.trans = np.full((256, 256), -1, dtype=np.int32)
        self.trans[0] = 0
        self.partitions: dict[tuple, list] = {}
        self.masks: dict[tuple, np.ndarray] = {}
        self.costs: dict[int, int] = {EMPTY: 0}

    @property
    def n_stacks(self) -> int:
        return len(self.stack_pos)

    def push(self, below: int, pos: int) -> int:
        key = (pos, below)
        sid = self.stack_ids.get(key)
        if sid is None:
            sid = self.stack_ids[key] = len(self.stack_pos)
            self.stack_pos.append(pos)
            self.stack_below.append(below)
        return sid

    def advance(self, stack: int) -> tuple:
        """The stacks `stack` stands for once every rule reference on top is expanded (llama.cpp's advance_stack)."""
        done = self.advanced.get(stack)
        if done is None:
            kinds = self.g.kinds
            p = self.stack_pos[stack]
            if stack == EMPTY or kinds[p] == BYTES:
                done = (stack,)
            else:
                below = self.stack_below[stack]
                base = below if kinds[p + 1] == END else self.push(below, p + 1)
                out: set = set()
                for a in self.g.rule_alts[self.g.values[p]]:
                    out.update(self.advance(base if kinds[a] == END else self.push(base, a)))
                done = tuple(sorted(out))
            self.advanced[stack] = done
        return done

    def successor(self, stack: int) -> tuple[int, tuple]:
        """For a stack with a byte element on top: (its byte set, the stacks after that byte)."""
        done = self.successors.get(stack)
        if done is None:
            p, below = self.stack_pos[stack], self.stack_below[stack]
            after = below if self.g.kinds[p + 1] == END else self.push(below, p + 1)
            done = self.successors[stack] = (self.g.values[p], self.advance(after))
        return done

    def intern(self, stacks: tuple) -> int:
        """The id of a state; stacks must be sorted."""
        sid = self.ids.get(stacks)
        if sid is None:
            sid = self.ids[stacks] = len(self.sets)
            self.sets.append(stacks)
            self.accepting.append(EMPTY in stacks)
            if sid >= len(self.trans):
                grown = np.full((2 * len(self.trans), 256), -1, dtype=np.int32)
                grown[:len(self.trans)] = self.trans
                self.trans = grown
        return sid

    def expand(self, sid: int) -> None:
        """Fill in the transition row of state sid."""
        by_set: dict[int, list[tuple]] = {}  # byte set → the stacks after any byte of it
        for s in self.sets[sid]:
            if s != EMPTY:
                set_id, after = self.successor(s)
                by_set.setdefault(set_id, []).append(after)
        if len(by_set) <= 1:
            for set_id, afters in by_set.items():
                target = self.intern(afters[0] if len(afters) == 1 else union(afters))
                self.trans[sid] = self.g.byte_rows[set_id] * target
            if not by_set:
                self.trans[sid] = 0
            return
        set_ids = tuple(sorted(by_set))
        row = np.zeros(256, dtype=np.int32)
        for byte_index, members in self.partition(set_ids):
            afters = [a for k in members for a in by_set[set_ids[k]]]
            row[byte_index] = self.intern(afters[0] if len(afters) == 1 else union(afters))
        self.trans[sid] = row

    def partition(self, set_ids: tuple) -> list:
        """Bytes grouped by which of the byte sets contain them: [(byte indices, indices into set_ids)], cached
        because the same few sets meet again in state after state."""
        groups = self.partitions.get(set_ids)
        if groups is None:
            member = self.g.byte_sets[list(set_ids)]
            columns = np.ascontiguousarray(np.packbits(member, axis=0).T)
            keys = columns.view(np.dtype((np.void, columns.shape[1]))).ravel()
            _, first, group = np.unique(keys, return_index=True, return_inverse=True)
            groups = []
            for g, b in enumerate(first):
                members = np.flatnonzero(member[:, b]).tolist()
                if members:
                    groups.append((np.flatnonzero(group.ravel() == g), members))
            self.partitions[set_ids] = groups
        return groups

    def step(self, sid: int, byte: int) -> int:
        nxt = self.trans[sid, byte]
        if nxt < 0:
            self.expand(sid)
            nxt = self.trans[sid, byte]
        return int(nxt)

    def mask(self, sid: int, index: "VocabIndex") -> np.ndarray:
        key = (index.key, sid)
        packed = self.masks.pop(key, None)
        if packed is None:
            allowed = np.zeros(index.n_vocab, dtype=bool)
            states = np.zeros(index.max_len + 1, dtype=np.int32)
            states[0] = sid
            i, depth, dead = 0, -1, 0
            while True:
                i, depth, dead = _walk(self.trans, index.data, index.offsets, index.lcp, index.order, allowed,
                                       states, i, depth, dead)
                if i >= len(index.order):
                    break
                self.expand(int(states[depth]))  # a transition not known yet: fill it in, then resume
            allowed[index.eog] = self.accepting[sid]
            packed = np.packbits(allowed)
            if len(self.masks) >= MAX_CACHED_MASKS:
                self.masks.pop(next(iter(self.masks)))
        self.masks[key] = packed  # most recently used last
        return np.unpackbits(packed, count=index.n_vocab).view(bool)

    def cost(self, sid: int) -> int:
        """Fewest bytes that complete the text from state sid."""
        return min((self.stack_cost(s) for s in self.sets[sid]), default=1 << 60)

    def stack_cost(self, stack: int) -> int:
        done = self.costs.get(stack)
        if done is None:
            done = self.costs[stack] = (self.g.suffix_length(self.stack_pos[stack])
                                        + self.stack_cost(self.stack_below[stack]))
        return done

    def stacks_as_positions(self, sid: int) -> list:
        """The state's stacks as tuples of element positions (bottom first): what carries over to new tables."""
        out = []
        for s in self.sets[sid]:
            positions = []
            while s != EMPTY:
                positions.append(self.stack_pos[s])
                s = self.stack_below[s]
            out.append(tuple(reversed(positions)))
        return out

    def state_from_positions(self, stacks: list) -> int:
        ids = []
        for positions in stacks:
            s = EMPTY
            for p in positions:
                s = self.push(s, p)
            ids.append(s)
        return self.intern(union([ids]))


def union(parts) -> tuple:
    """Sorted tuple of the ids in any of parts."""
    return tuple(sorted(set().union(*parts)))


class GrammarState:
    """Where the output stands in the grammar (an interned set of pushdown stacks). Cheap to copy."""

    __slots__ = ("grammar", "automaton", "sid")

    def __init__(self, grammar: Grammar, automaton: Automaton, sid: int):
        self.grammar, self.automaton, self.sid = grammar, automaton, sid

    def _tables(self) -> Automaton:
        current = self.grammar.tables()
        if current is not self.automaton:  # the grammar's tables were rebuilt: carry the stacks over
            self.sid = current.state_from_positions(self.automaton.stacks_as_positions(self.sid))
            self.automaton = current
        return current

    def copy(self) -> "GrammarState":
        return GrammarState(self.grammar, self.automaton, self.sid)

    def can_end(self) -> bool:
        """The output so far is a complete sentence: end-of-generation tokens are allowed."""
        return self.automaton.accepting[self.sid]

    def must_end(self) -> bool:
        """Nothing may follow: only end-of-generation tokens are allowed."""
        return self.automaton.sets[self.sid] == (EMPTY,)

    def allowed_mask(self, vocab) -> np.ndarray:
        """bool[n_vocab]: the tokens whose bytes keep the output inside the grammar (a prefix of a sentence),
        end-of-generation tokens only when the output can end here. Control tokens and tokens without bytes are
        never allowed: they are not text."""
        return self._tables().mask(self.sid, vocab_index(vocab))

    def accept(self, token: int, vocab) -> None:
        """Advance past a chosen token; GrammarError if the grammar does not allow it."""
        if vocab.is_eog(token):
            if not self.can_end():
                raise GrammarError(f"token {token} ends the output, but the grammar needs more text")
            a = self._tables()
            self.sid = a.intern((EMPTY,))
            return
        self.accept_bytes(vocab.token_bytes(token))

    def accept_bytes(self, data: bytes) -> None:
        a = self._tables()
        sid = self.sid
        for k, b in enumerate(data):
            sid = a.step(sid, b)
            if sid == 0:
                raise GrammarError(f"the grammar does not allow {data!r} here (byte {k} does not fit)")
        self.sid = sid

    def shortest_completion(self) -> bytes:
        """The shortest bytes that make the output a complete sentence (b"" if it already is)."""
        a = self._tables()
        sid, out = self.sid, bytearray()
        while not a.accepting[sid]:
            cost = a.cost(sid)
            for b in range(256):
                nxt = a.step(sid, b)
                if nxt and a.cost(nxt) == cost - 1:
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
        self.lcp = np.zeros(len(items), dtype=np.int64)
        for i in range(1, len(items)):
            a, b = items[i - 1][0], items[i][0]
            k, m = 0, min(len(a), len(b))
            while k < m and a[k] == b[k]:
                k += 1
            self.lcp[i] = k
        self.max_len = int(lengths.max()) if len(items) else 0


_indexes: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def vocab_index(vocab) -> VocabIndex:
    index = _indexes.get(vocab)
    if index is None:
        index = _indexes[vocab] = VocabIndex(vocab)
    return index


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
