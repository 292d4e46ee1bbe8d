"""GBNF grammars: the parser's constructs and errors, the byte-level matcher, and sampling under the grammars in
tests/data/grammars checked by independent matchers (regexes, json, small hand-written parsers)."""


import numpy as np
import pytest
import regex

from conftest import data_path
from llamalora.errors import GrammarError
from llamalora.grammar import load_grammar_file, parse_grammar, utf8_sequences


def accepts(grammar_text: str, *texts: str) -> list[bool]:
    g = parse_grammar(grammar_text)
    return [g.matches(t) for t in texts]


# parser: one test per construct, each checked through the language it defines

def test_literals_and_escapes():
    g = r'root ::= "a\tb\n\r\\\"\[\]" "\x41\u00e9\U0001F600" "日本"'
    assert accepts(g, 'a\tb\n\r\\"[]Aé😀日本', 'a\tb\n\r\\"[]Aé😀日', 'a\\tb\n\r\\"[]Aé😀日本') == [True, False, False]


def test_character_classes_ranges_and_negation():
    assert accepts(r'root ::= [a-cx\-]', "a", "c", "x", "-", "d", "") == [True, True, True, True, False, False]
    assert accepts(r'root ::= [^a-c"\\]', "d", "é", "😀", "a", '"', "\\", "") == [True, True, True, False, False,
                                                                                    False, False]
    assert accepts(r'root ::= [α-ω]', "α", "λ", "ω", "a", "Ω") == [True, True, True, False, False]
    # a class spanning one- to four-byte characters
    assert accepts(r'root ::= [\x20-\U0001F64F]', " ", "~", "é", "€", "😀", "🙐", "\x1f") == [
        True, True, True, True, True, False, False]


def test_any_character():
    assert accepts('root ::= "<" . ">"', "<a>", "<é>", "<😀>", "<>", "<ab>") == [True, True, True, False, False]


def test_rules_alternatives_and_groups():
    g = 'root ::= greet ("world" | name)\ngreet ::= "hello " | "hi "\nname ::= [A-Z] [a-z]+'
    assert accepts(g, "hello world", "hi Bob", "hi bob", "hello  world", "hi ") == [True, True, False, False, False]


def test_repetition_operators():
    assert accepts('root ::= "a"*', "", "a", "aaaa", "b") == [True, True, True, False]
    assert accepts('root ::= "ab"+', "", "ab", "ababab", "aba") == [False, True, True, False]
    assert accepts('root ::= "a" "b"? "c"', "ac", "abc", "abbc") == [True, True, False]
    assert accepts('root ::= ("x" | "y"){3}', "xyx", "xy", "xyxy") == [True, False, False]
    assert accepts('root ::= "a"{2,}', "a", "aa", "a" * 9) == [False, True, True]
    assert accepts('root ::= "a"{,2}', "", "a", "aa", "aaa") == [True, True, True, False]
    assert accepts('root ::= [0-9]{2,4} "."', "1.", "12.", "1234.", "12345.") == [False, True, True, False]
    assert accepts('root ::= "a" { 1 , 2 } "b"', "ab", "aab", "aaab") == [True, True, False]


def test_layout_comments_and_line_breaks():
    g = ('# leading comment\r\n'
         'root ::= item ( # comment inside a group\n'
         '    "," item\n'
         '  )*   # trailing comment\r\n'
         '\n'
         'item ::= "x" |\n'
         '         "y"\n')
    assert accepts(g, "x", "x,y,x", "x,", "z") == [True, True, False, False]


def test_nullable_and_right_recursive_rules():
    g = 'root ::= list\nlist ::= "(" opt list ")" | ""\nopt ::= ws\nws ::= " "*'
    assert accepts(g, "", "()", "( ( ))", "(()", "((") == [True, True, True, False, False]


def test_unproductive_alternatives_are_dropped():
    # 'never' cannot complete; the alternative using it must not leave dead ends in the matcher
    g = parse_grammar('root ::= "a" never | "ab"\nnever ::= "x" never')
    state = g.start()
    state.accept_bytes(b"a")
    assert state.shortest_completion() == b"b"


@pytest.mark.parametrize("text, line, col, message", [
    ('root ::= "a', 1, 10, "unterminated string literal"),
    ("root ::= [ab", 1, 10, "unterminated character class"),
    ('root ::= ("a"', 1, 10, "unclosed '('"),
    ('root ::= "a")', 1, 13, "expected newline or end of input, found ')'"),
    ('root := "a"', 1, 6, "expected '::=' after rule name 'root'"),
    ('root ::= "a" x\n', 1, 14, "undefined rule 'x'"),
    ('a ::= "x"\n', 2, 1, "the grammar has no 'root' rule"),
    ('root ::= "a"\n  x ::= "\\q"', 2, 10, "unknown escape '\\q'"),
    ('root ::= "\\x4"', 1, 11, "'\\x' needs 2 hex digits"),
    ('root ::= "\\U00110000"', 1, 11, "beyond the last Unicode code point"),
    ("root ::= *", 1, 10, "'*' has nothing before it to repeat"),
    ('root ::= "a"{3,1}', 1, 13, "the maximum is below the minimum"),
    ('root ::= "a"{x}', 1, 14, "expected a number after '{'"),
    ('root ::= "a"{2', 1, 15, "expected '}'"),
    ('root ::= "a"{5000}', 1, 13, "repetition count above 2000"),
    ("root ::= [z-a]", 1, 11, "ends before it starts"),
    ('root ::= "a"\nroot ::= "b"', 2, 1, "rule 'root' is already defined at line 1, column 1"),
    ('root ::= "a"\n\n"x"', 3, 1, "expected a rule name"),
    ("root ::= <[12]>", 1, 10, "token references"),
    ('root ::= root "a"', 1, 1, "rule 'root' is left-recursive (root -> root)"),
    ('root ::= a\na ::= b "x"\nb ::= "y"? a', 2, 1, "rule 'a' is left-recursive (a -> b -> a)"),
    ("root ::= []", 1, 1, "the grammar cannot match any text"),
    ('root ::= "a" root', 1, 1, "the grammar cannot match any text"),
    ('root ::= x\nx ::= "a" y\ny ::= [^\\x00-\\U0010FFFF] | x', 1, 1, "the grammar cannot match any text"),
])
def test_parse_errors(text, line, col, message):
    with pytest.raises(GrammarError) as e:
        parse_grammar(text)
    assert str(e.value).startswith(f"grammar:{line}:{col}: "), str(e.value)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_grammar_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.gbnf"
    path.write_text('root ::= "a"\nitem ::= [ab\n')
    with pytest.raises(GrammarError, match=r"bad\.gbnf:2:10: unterminated character class"):
        load_grammar_file(str(path))
    with pytest.raises(GrammarError, match="cannot read the grammar file"):
        load_grammar_file(str(tmp_path / "missing.gbnf"))


@pytest.mark.parametrize("name", ["json", "json_arr", "list", "chess", "arithmetic", "c", "japanese", "english"])
def test_shipped_style_grammars_parse(name):
    g = load_grammar_file(data_path("grammars", f"{name}.gbnf"))
    assert g.start().shortest_completion() is not None


def test_utf8_sequences_cover_exactly_the_range():
    rng = np.random.default_rng(0)
    bounds = [(0x80, 0x7FF), (0x80, 0x10FFFF), (0x3041, 0x309F), (0x10000, 0x10FFFF), (0xE000, 0xFFFF),
              (0x7FF, 0x800), (0x1234, 0x5678)]
    for lo, hi in bounds:
        seqs = utf8_sequences(lo, hi)
        probes = set(rng.integers(max(0x80, lo - 300), min(0x10FFFF, hi + 300), 400).tolist()) | {lo, hi, lo - 1, hi + 1}
        for cp in probes:
            if 0xD800 <= cp <= 0xDFFF or not 0x80 <= cp <= 0x10FFFF:
                continue
            b = chr(cp).encode("utf-8")
            hits = sum(len(s) == len(b) and all(a <= x <= z for x, (a, z) in zip(b, s)) for s in seqs)
            assert hits == (1 if lo <= cp <= hi else 0), (hex(lo), hex(hi), hex(cp))


# sampling under the grammars

class FakeVocab:
    """A tiny byte-level vocabulary: every single byte, some multi-character and split-UTF-8 tokens, one control
    token that is not text and one end-of-generation token."""

    PIECES = [b'{"', b'":', b'", "', b'"}', b'},', b'[{', b'}]', b'true', b'false', b'null', b', ', b'\n  ',
              b'12', b'.5', b'e+', b'- ', b'e4', b'Nf3', b'O-O', b'1. ', b'x', b' = ', b'int ', b'return ', b'();',
              b'/*', b'*/', b'//', "日本".encode(), "語".encode()[:2], "語".encode()[2:] + "ひ".encode(), "カタ".encode(),
              "é".encode()[:1], b"\xa9 ok", b"\xf0\x9f", b"\x98\x80", "、".encode(), b"hello", b" world"]

    def __init__(self):
        self.pieces = [bytes([b]) for b in range(256)] + self.PIECES + [b"<|ctrl|>", b"<|end|>"]
        self.control_id, self.eos_id = len(self.pieces) - 2, len(self.pieces) - 1

    @property
    def n_vocab(self):
        return len(self.pieces)

    def token_bytes(self, token):
        return self.pieces[token]

    def is_eog(self, token):
        return token == self.eos_id

    def is_control(self, token):
        return token == self.control_id


@pytest.fixture(scope="module")
def smollm2_vocab(smollm2_path):
    from llamalora.model_file import load_model_file
    from llamalora.vocab import Vocab

    return Vocab.from_metadata(load_model_file(smollm2_path).metadata)


def byte_tokens(vocab) -> dict[int, int]:
    """A single-byte token for each byte value the vocabulary has one for (a byte-level BPE lacks a few that
    never occur in UTF-8 text)."""
    found = {}
    for t in range(vocab.n_vocab):
        b = vocab.token_bytes(t)
        if len(b) == 1 and not vocab.is_eog(t) and not getattr(vocab, "is_control", lambda t: False)(t):
            found.setdefault(b[0], t)
    assert all(b in found for b in range(0x20, 0x7F))
    return found


_token_shapes: dict[int, tuple] = {}


def token_shapes(vocab) -> tuple[np.ndarray, np.ndarray]:
    """Each token's first byte and length. The cache keeps the vocabulary it was made for: an id alone may be
    reused by a later object once the first is gone."""
    entry = _token_shapes.get(id(vocab))
    if entry is None or entry[0] is not vocab:
        pieces = [vocab.token_bytes(t) or b"\0" for t in range(vocab.n_vocab)]
        entry = _token_shapes[id(vocab)] = (vocab, np.array([p[0] for p in pieces]), np.array([len(p) for p in pieces]))
    return entry[1], entry[2]


def sample(grammar, vocab, seed: int, max_tokens: int, eog_bias: float = 4.0, check=None) -> bytes:
    """Random logits at temperature 1, masked by the grammar. Each seed also favours some first bytes over others
    (a random bias per byte value) and, to its own degree, shorter tokens, so that across seeds the outputs take
    every kind of turn the grammar offers (short strings, deep nesting, ...) rather than mostly the one with the
    most tokens. End-of-generation tokens
    get eog_bias after 8 tokens and a handicap before. After max_tokens the output is closed along the grammar's shortest completion
    with single-byte tokens, each still checked against the mask. check(text, mask) runs at every step."""
    rng = np.random.default_rng(seed)
    first, length = token_shapes(vocab)
    bias = rng.normal(0, 3, 256)[first] - rng.uniform(0, 3) * length
    singles = byte_tokens(vocab)
    eog = [t for t in range(vocab.n_vocab) if vocab.is_eog(t)]
    state, out = grammar.start(), bytearray()
    for step in range(max_tokens):
        mask = state.allowed_mask(vocab)
        assert mask.any()
        if check:
            check(bytes(out), mask)
        logits = rng.standard_normal(vocab.n_vocab) + bias
        logits[eog] = rng.standard_normal(len(eog)) + (eog_bias if step >= 8 else -5.0)
        allowed = np.flatnonzero(mask)
        p = np.exp(logits[allowed] - logits[allowed].max())
        token = int(allowed[rng.choice(len(allowed), p=p / p.sum())])
        state.accept(token, vocab)
        if vocab.is_eog(token):
            return bytes(out)
        out += vocab.token_bytes(token)
    for b in state.shortest_completion():
        mask = state.allowed_mask(vocab)
        assert mask[singles[b]]
        state.accept(singles[b], vocab)
        out.append(b)
    mask = state.allowed_mask(vocab)
    assert state.can_end() and mask[eog].all()
    return bytes(out)


# Independent matchers: regexes for the regular grammars, small set-of-end-positions parsers for the others.

JP = "[ぁ-ゟァ-ヿ、-〾一-鿿]"
REGEXES = {
    "list": r"(- [^\r\n\x0b\x0c\x85\u2028\u2029]+\n)+",
    "chess": (lambda move: rf"1\. {move} {move}\n([1-9][0-9]?\. {move} {move}\n)+")(
        r"(?:(?:[a-h]x)?[a-h][1-8](?:=[NBKQR])?|[NBKQR][a-h]?[1-8]?x?[a-h][1-8]|O-O(?:-O)?)[+#]?"),
    "japanese": rf"{JP}+([ \t\n]{JP}+)*",
    "english": r"[a-zA-Z0-9!-/:-@\[-`{-~]+([ \t\n][a-zA-Z0-9!-/:-@\[-`{-~]+)*",
}


def lit(s):
    return lambda t, i: {i + len(s)} if t.startswith(s, i) else set()


def one(chars: str):
    pattern = regex.compile(chars)
    return lambda t, i: {i + 1} if i < len(t) and pattern.fullmatch(t[i]) else set()


def seq(*parts):
    def match(t, i):
        ends = {i}
        for p in parts:
            ends = {e for start in ends for e in p(t, start)}
        return ends
    return match


def alt(*parts):
    return lambda t, i: set().union(*(p(t, i) for p in parts))


def star(p):
    def match(t, i):
        ends, frontier = {i}, {i}
        while frontier:
            frontier = {e for start in frontier for e in p(t, start) if e not in ends}
            ends |= frontier
        return ends
    return match


def plus(p):
    return seq(p, star(p))


def opt(p):
    return lambda t, i: {i} | p(t, i)


def ref(name, table):
    return lambda t, i: table[name](t, i)


def arithmetic_matcher():
    r = {}
    ws = star(one(r"[ \t\n]"))
    r["term"] = alt(seq(one("[a-z]"), star(one("[a-z0-9_]")), ws), seq(plus(one("[0-9]")), ws),
                    seq(lit("("), ws, ref("expr", r), lit(")"), ws))
    r["expr"] = seq(ref("term", r), star(seq(one(r"[-+*/]"), ref("term", r))))
    return plus(seq(ref("expr", r), lit("="), ws, ref("term", r), lit("\n")))


def c_matcher():
    r = {}
    g = lambda name: ref(name, r)  # noqa: E731
    ws = plus(one(r"[ \t\n]"))
    data_type = seq(alt(lit("int"), lit("float"), lit("char")), ws)
    ident = seq(one("[a-zA-Z_]"), star(one("[a-zA-Z_0-9]")))
    block = seq(lit("{"), star(g("statement")), lit("}"))
    r["factor"] = alt(ident, plus(one("[0-9]")), seq(lit("-"), g("factor")),
                      seq(ident, lit("("), opt(g("args")), lit(")")), seq(lit("("), ws0 := opt(ws), g("expr"), ws0, lit(")")))
    r["term"] = seq(g("factor"), star(seq(one("[*/]"), g("factor"))))
    r["expr"] = seq(g("term"), star(seq(one("[-+]"), g("term"))))
    r["args"] = seq(g("expr"), star(seq(lit(","), opt(ws), g("expr"))))
    assign = seq(ident, ws, lit("="), ws, g("expr"))
    cond = seq(g("expr"), alt(*map(lit, ["<=", "<", "==", "!=", ">=", ">"])), g("expr"))
    r["statement"] = alt(
        seq(data_type, assign, lit(";")), seq(assign, lit(";")), seq(ident, ws, lit("("), opt(g("args")), lit(");")),
        seq(lit("return"), ws, g("expr"), lit(";")), seq(lit("while("), cond, lit(")"), block),
        seq(lit("for("), alt(seq(data_type, assign), assign), lit(";"), ws, cond, lit(";"), ws, assign, lit(")"), block),
        seq(lit("if("), cond, lit(")"), block, opt(seq(lit("else"), block))),
        seq(lit("//"), star(one(r"[^\n]")), lit("\n")),
        seq(lit("/*"), star(alt(one(r"[^*]"), seq(lit("*"), one("[^/]")))), lit("*/")))
    declaration = seq(data_type, ident, lit("("), opt(seq(data_type, ident)), lit(")"), block)
    return star(declaration)


def full(matcher):
    return lambda text: len(text) in matcher(text, 0)


def is_json_object(text):
    return isinstance(json.loads(text), dict)


def is_json_lines_array(text):
    return text.startswith("[\n") and text.endswith("]") and isinstance(json.loads(text), list)


CHECKERS = {
    **{name: (lambda p: lambda text: regex.fullmatch(p, text) is not None)(p) for name, p in REGEXES.items()},
    "arithmetic": full(arithmetic_matcher()),
    "c": full(c_matcher()),
    "json": is_json_object,
    "json_arr": is_json_lines_array,
}


def test_independent_matchers_accept_and_reject():
    good = {"list": "- one\n- two 😀\n", "chess": "1. e4 e5\n2. Nf3 Nc6\n3. O-O exd4+\n", "japanese": "日本語 ひらがな\nカタカナ、",
            "english": "Hello, world! 42", "arithmetic": "a+(b*2) = 3\nx=(y)\n",
            "c": "int main(){int x = 1;while(x<10){x = x+1;}return x;}", "json": '{"a": [1, {"b": null}]}',
            "json_arr": '[\n1,\n"two"]'}
    bad = {"list": "- one\n-two\n", "chess": "1. e4 e5\n", "japanese": "日本語  ひらがな", "english": "Hello,  world",
           "arithmetic": "a+ = 3\n", "c": "int main(){x = ;}", "json": '[1]', "json_arr": '[1]'}
    for name in CHECKERS:
        g = load_grammar_file(data_path("grammars", f"{name}.gbnf"))
        assert CHECKERS[name](good[name]) and g.matches(good[name]), name
        assert not g.matches(bad[name]), name
        try:
            assert not CHECKERS[name](bad[name]), name
        except json.JSONDecodeError:
            pass


def prefix_agreement(name, vocab, every: int):
    """For a regular grammar: at each step the mask allows a token exactly when the regex still matches the text
    with that token as a prefix (partial match), checked on a sample of tokens that decode to whole characters."""
    pattern = regex.compile(REGEXES[name])
    rng = np.random.default_rng(1)
    calls = [0]

    def check(text, mask):
        calls[0] += 1
        if calls[0] % every:
            return
        candidates = np.concatenate([rng.choice(np.flatnonzero(mask), 64), rng.integers(0, vocab.n_vocab, 256)])
        for t in candidates.tolist():
            if vocab.is_eog(t) or getattr(vocab, "is_control", lambda t: False)(t):
                continue
            try:
                s = (text + vocab.token_bytes(t)).decode("utf-8")
            except UnicodeDecodeError:
                continue
            expected = pattern.fullmatch(s, partial=True) is not None
            assert mask[t] == expected, (name, s, mask[t])
        ended = pattern.fullmatch(text.decode("utf-8", "replace")) is not None
        assert all(mask[t] == ended for t in range(vocab.n_vocab) if vocab.is_eog(t)), (name, text)

    return check


import json  # noqa: E402


@pytest.mark.parametrize("name", ["json", "json_arr", "list", "chess", "arithmetic", "c", "japanese", "english"])
def test_sampled_outputs_match_fake_vocab(name):
    g = load_grammar_file(data_path("grammars", f"{name}.gbnf"))
    vocab = FakeVocab()
    for seed in range(40):
        check = prefix_agreement(name, vocab, every=3) if name in REGEXES and seed < 10 else None
        out = sample(g, vocab, seed, max_tokens=60, check=check)
        text = out.decode("utf-8")  # strict: partial characters never survive
        assert CHECKERS[name](text), (name, seed, text)


@pytest.mark.parametrize("name", ["json", "json_arr", "list", "chess", "arithmetic", "c", "japanese", "english"])
def test_sampled_outputs_match_smollm2_vocab(name, smollm2_vocab):
    g = load_grammar_file(data_path("grammars", f"{name}.gbnf"))
    for seed in range(12):
        check = prefix_agreement(name, smollm2_vocab, every=7) if name in REGEXES and seed < 3 else None
        out = sample(g, smollm2_vocab, seed, max_tokens=40, check=check)
        text = out.decode("utf-8")
        assert CHECKERS[name](text), (name, seed, text)


def allowed_pieces(state, vocab) -> set[bytes]:
    mask = state.allowed_mask(vocab)
    return {vocab.token_bytes(t) for t in np.flatnonzero(mask)}


def test_mask_handles_partial_characters_and_multi_character_tokens():
    vocab = FakeVocab()
    g = parse_grammar('root ::= "日本" "語"? [a-z]*')
    state = g.start()
    assert allowed_pieces(state, vocab) == {"日".encode()[:1], "日本".encode()}
    state.accept_bytes("日".encode()[:1])
    assert allowed_pieces(state, vocab) == {"日".encode()[1:2]}
    state.accept_bytes("日本".encode()[1:])
    pieces = allowed_pieces(state, vocab)
    # the first two bytes of 語 as one token, a single lead byte, letters, multi-letter tokens, the end
    assert {"語".encode()[:2], b"\xe8", b"x", b"true", b"hello", b"<|end|>"} <= pieces
    assert not pieces & {"語".encode()[2:] + "ひ".encode(), b" world", "日本".encode(), b"12"}
    state.accept_bytes("語".encode()[:2])
    # a token that finishes 語 and starts another character the grammar does not allow is refused
    assert allowed_pieces(state, vocab) == {"語".encode()[2:]}


def test_end_of_generation_and_control_tokens():
    vocab = FakeVocab()
    g = parse_grammar('root ::= "<|ctrl|>" | "ab" "c"?')
    state = g.start()
    mask = state.allowed_mask(vocab)
    assert not mask[vocab.control_id] and not mask[vocab.eos_id] and mask[ord("<")] and mask[ord("a")]
    with pytest.raises(GrammarError, match="needs more text"):
        state.accept(vocab.eos_id, vocab)
    state.accept(ord("a"), vocab)
    with pytest.raises(GrammarError, match="does not allow"):
        state.accept(ord("a"), vocab)
    state.accept(ord("b"), vocab)  # the failed accept left the state as it was
    mask = state.allowed_mask(vocab)
    assert mask[vocab.eos_id] and mask[ord("c")] and mask.sum() == 2 and state.can_end() and not state.must_end()
    state.accept(ord("c"), vocab)
    assert state.must_end() and np.flatnonzero(state.allowed_mask(vocab)).tolist() == [vocab.eos_id]


def test_states_copy_independently():
    g = parse_grammar('root ::= "a" ("b" | "c")')
    first = g.start()
    first.accept_bytes(b"a")
    second = first.copy()
    first.accept_bytes(b"b")
    second.accept_bytes(b"c")
    assert first.can_end() and second.can_end()
    with pytest.raises(GrammarError):
        first.copy().accept_bytes(b"c")


def test_tables_rebuilt_when_large_keep_states(monkeypatch):
    """When a grammar's tables outgrow their bound they are rebuilt; states in flight carry over."""
    import llamalora.grammar as grammar_module

    g = load_grammar_file(data_path("grammars", "json.gbnf"))
    monkeypatch.setattr(grammar_module, "MAX_STACKS", 40)
    tables = g.automaton
    for seed in range(5):
        text = sample(g, FakeVocab(), seed, max_tokens=30).decode("utf-8")
        assert is_json_object(text), text
    assert g.automaton is not tables
