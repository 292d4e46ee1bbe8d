"""GBNF text (llama.cpp's grammar format) → rules over Unicode code points, as llama.cpp's parser makes them.

`( … )` groups and repetitions (`*` `+` `?` `{m,n}`) become generated rules, repetition by right recursion;
character classes become sorted, disjoint code point ranges. `check_rules` then refuses undefined rules, a
missing root, left recursion and grammars that match nothing, and drops unproductive alternatives. grammar.py
compiles the rules to bytes and matches them.
"""

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


def parse_rules(text: str, source: str = "grammar") -> tuple[list[str], dict[int, list[list]], int]:
    """(rule names, rules {id: alternatives}, the root's id) of GBNF text, checked; errors are
    GrammarError('source:line:col: message')."""
    parser = _Parser(text, source)
    parser.parse()
    check_rules(parser)
    return parser.names, parser.rules, parser.ids["root"]
