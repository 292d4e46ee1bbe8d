"""GBNF grammars: the parser's constructs and errors, the byte-level matcher, and sampling under the grammars in
tests/data/grammars checked by independent matchers (regexes, json, small hand-written parsers)."""

import os

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
