"""JSON Schema → GBNF, after llama.cpp's json-schema-to-grammar: the grammar matches JSON text that validates.

Supported: `type` (one or a list), `properties` / `required` / `additionalProperties`, `enum`, `const`,
`anyOf` / `oneOf`, `allOf` of object schemas, `items` / `prefixItems` / `minItems` / `maxItems`, string
`minLength` / `maxLength` and `format` date, time, date-time, uuid, integer `minimum` / `maximum` (also the
exclusive ones), and `$ref` into the same document (recursion included). Properties come out in the schema's
order, required ones first, as llama.cpp writes them. Anything else that constrains values is refused with a
GrammarError naming where it is, rather than silently not enforced.
"""

import json
import re

from .errors import GrammarError
from .grammar import Grammar, parse_grammar

SPACE = '| " " | "\\n"{1,2} [ \\t]{0,20}'
PLAIN_CHAR = r'[^"\\\x7F\x00-\x1F]'  # a character a JSON string may hold unescaped
CHAR = PLAIN_CHAR + r' | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
MAX_DIGITS = 16  # integers as llama.cpp bounds them: at most 16 digits
MAX_COUNT = 1000  # minItems / maxItems / minLength / maxLength: each count becomes grammar rules

PRIMITIVES = {
    "space": (SPACE, []),
    "boolean": ('("true" | "false") space', ["space"]),
    "null": ('"null" space', ["space"]),
    "decimal-part": ("[0-9]{1,16}", []),
    "integral-part": ("[0] | [1-9] [0-9]{0,15}", []),
    "number": ('("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)? space',
               ["integral-part", "decimal-part", "space"]),
    "integer": ('("-"? integral-part) space', ["integral-part", "space"]),
    "char": (CHAR, []),
    "string": ('"\\"" char* "\\"" space', ["char", "space"]),
    "value": ("object | array | string | number | boolean | null",
              ["object", "array", "string", "number", "boolean", "null"]),
    "object": ('"{" space ( string ":" space value ("," space string ":" space value)* )? "}" space',
               ["string", "value", "space"]),
    "array": ('"[" space ( value ("," space value)* )? "]" space', ["value", "space"]),
    # Dates that exist: month lengths, 29 February only in leap years, no year 0000.
    "year": ('[1-9] [0-9]{3} | "0" [1-9] [0-9]{2} | "00" [1-9] [0-9] | "000" [1-9]', []),
    "leap-year": ('[0-9] [0-9] ("0" [48] | [2468] [048] | [13579] [26]) | ("0" [48] | [2468] [048] | [13579] [26]) "00"',
                  []),
    "day-28": ('"0" [1-9] | "1" [0-9] | "2" [0-8]', []),
    "month-day": ('("01" | "03" | "05" | "07" | "08" | "10" | "12") "-" (day-28 | "29" | "30" | "31") | '
                  '("04" | "06" | "09" | "11") "-" (day-28 | "29" | "30") | "02-" day-28', ["day-28"]),
    "date": ('year "-" month-day | leap-year "-02-29"', ["year", "leap-year", "month-day"]),
    "time": ('([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? '
             '("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])', []),
    "date-time": ('date "T" time', ["date", "time"]),
    "uuid": ('[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12}', []),
}
FORMATS = ("date", "time", "date-time", "uuid")

# Keywords that only annotate: ignored.
ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "default", "examples", "deprecated",
               "readOnly", "writeOnly", "definitions", "$defs", "$anchor", "contentMediaType"}
HANDLED = {"type", "properties", "required", "additionalProperties", "enum", "const", "anyOf", "oneOf", "allOf",
           "items", "prefixItems", "minItems", "maxItems", "minLength", "maxLength", "format", "$ref", "minimum",
           "maximum", "exclusiveMinimum", "exclusiveMaximum"}
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


def literal(text: str) -> str:
    """A GBNF string literal matching text exactly."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def json_literal(value) -> str:
    """A GBNF literal for the JSON text of a value (as json.dumps writes it, ASCII escapes for non-ASCII)."""
    return literal(json.dumps(value, separators=(",", ":")))


class SchemaConverter:
    def __init__(self, root_schema, prefix: str = ""):
        self.root_schema = root_schema
        self.prefix = prefix  # before the names of rules made from $ref targets (schema_rules)
        self.rules: dict[str, str] = {}
        self.refs: dict[str, str] = {}  # $ref → rule name

    def error(self, path: str, message: str) -> GrammarError:
        return GrammarError(f"json schema at {path or '/'}: {message}")

    def add_rule(self, name: str, body: str) -> str:
        name = re.sub(r"[^a-zA-Z0-9-]+", "-", name).strip("-") or "rule"
        candidate, k = name, 0
        while candidate in self.rules and self.rules[candidate] != body:
            k += 1
            candidate = f"{name}{k}"
        self.rules[candidate] = body
        return candidate

    def primitive(self, name: str) -> str:
        body, deps = PRIMITIVES[name]
        if name not in self.rules:
            self.rules[name] = body
            for d in deps:
                self.primitive(d)
        return name

    def resolve(self, ref: str, path: str):
        if not ref.startswith("#"):
            raise self.error(path, f"$ref '{ref}' points outside this document; only '#...' references are supported")
        target = self.root_schema
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise self.error(path, f"$ref '{ref}' does not resolve: no '{part}'")
        return target

    def visit(self, schema, name: str, path: str) -> str:
        """A grammar expression (usually a rule name) for values valid under schema."""
        if schema is True or schema == {}:
            return self.primitive("value")
        if schema is False:
            raise self.error(path, "the schema 'false' matches no value")
        if not isinstance(schema, dict):
            raise self.error(path, f"a schema must be an object or a boolean, not {type(schema).__name__}")
        unknown = sorted(k for k in schema if k not in HANDLED and k not in ANNOTATIONS)
        if unknown:
            raise self.error(path, f"'{unknown[0]}' is not supported (supported keywords: "
                                   f"{', '.join(sorted(HANDLED))})")

        if "$ref" in schema:
            ref = schema["$ref"]
            if ref not in self.refs:
                target = self.resolve(ref, path)
                # the name is taken before the target is visited, so that recursion refers back to it
                rule = self.refs[ref] = self.add_rule(self.prefix + (ref.rsplit("/", 1)[-1] or "root-ref"), f"<{ref}>")
                self.rules[rule] = self.visit(target, rule, ref)
            return self.refs[ref]
        if "const" in schema:
            self.primitive("space")
            return self.add_rule(name, json_literal(schema["const"]) + " space")
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise self.error(path, "'enum' must be a non-empty list")
            self.primitive("space")
            return self.add_rule(name, "(" + " | ".join(json_literal(v) for v in values) + ") space")
        for key in ("anyOf", "oneOf"):
            if key in schema:
                branches = schema[key]
                if not isinstance(branches, list) or not branches:
                    raise self.error(path, f"'{key}' must be a non-empty list")
                return self.add_rule(name, " | ".join(self.visit(s, f"{name}-{i}", f"{path}/{key}/{i}")
                                                      for i, s in enumerate(branches)))
        if "allOf" in schema:
            return self.visit(self.merge_all_of(schema, path), name, path)

        types = schema.get("type")
        if isinstance(types, list):
            if not types:
                raise self.error(path, "'type' is an empty list")
            return self.add_rule(name, " | ".join(self.visit({**schema, "type": t}, f"{name}-{t}", path)
                                                  for t in types))
        if types is None:
            types = self.infer_type(schema)
        if types not in TYPES:
            raise self.error(path, f"unknown type {types!r}")
        if types == "object":
            return self.object_rule(schema, name, path)
        if types == "array":
            return self.array_rule(schema, name, path)
        if types == "string":
            return self.string_rule(schema, name, path)
        if types == "integer" and any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum",
                                                            "exclusiveMaximum")):
            return self.integer_range_rule(schema, name, path)
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in schema:
                raise self.error(path, f"'{key}' is only supported for integers")
        return self.primitive(types)

    def infer_type(self, schema) -> str:
        if any(k in schema for k in ("properties", "additionalProperties")):
            return "object"
        if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
            return "array"
        if any(k in schema for k in ("minLength", "maxLength", "format")):
            return "string"
        if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
            return "integer"
        return "value"

    def merge_all_of(self, schema, path: str) -> dict:
        """allOf of object schemas: their properties and required lists together (as llama.cpp does)."""
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        properties, required = dict(merged.get("properties", {})), list(merged.get("required", []))
        for i, part in enumerate(schema["allOf"]):
            if isinstance(part, dict) and "$ref" in part:
                part = self.resolve(part["$ref"], f"{path}/allOf/{i}")
            if not isinstance(part, dict) or not set(part) <= {"type", "properties", "required", *ANNOTATIONS} \
                    or part.get("type", "object") != "object":
                raise self.error(f"{path}/allOf/{i}", "allOf is supported for object schemas with properties only")
            properties.update(part.get("properties", {}))
            required += [r for r in part.get("required", []) if r not in required]
        merged.update(type="object", properties=properties, required=required)
        return merged

    def object_rule(self, schema, name: str, path: str) -> str:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(properties, dict) or not isinstance(required, list):
            raise self.error(path, "'properties' must be an object and 'required' a list")
        for key in required:
            if key not in properties:
                raise self.error(path, f"required property '{key}' is not among the properties")
        additional = schema.get("additionalProperties", False if properties else True)
        self.primitive("space")
        kv = {}
        for key, sub in properties.items():
            value = self.visit(sub, f"{name}-{key}", f"{path}/properties/{key}")
            kv[key] = self.add_rule(f"{name}-{key}-kv", f'{json_literal(key)} space ":" space {value}')
        if additional is not False:
            value = self.visit(additional, f"{name}-additional-value", f"{path}/additionalProperties")
            key_rule = self.add_rule(f"{name}-additional-key", self.string_except(list(properties)))
            kv["*"] = self.add_rule(f"{name}-additional-kv", f'{key_rule} ":" space {value}')
        req = [k for k in properties if k in required]
        opt = [k for k in properties if k not in required] + (["*"] if "*" in kv else [])

        def chain(keys: list[str], first_optional: bool) -> str:
            """Optional properties in order, each present or not: the first of keys, then a rule for the rest."""
            k, rest = keys[0], keys[1:]
            comma = f'( "," space {kv[k]} )'
            if first_optional:
                out = comma + ("*" if k == "*" else "?")
            else:
                out = kv[k] + (f" {comma}*" if k == "*" else "")
            if rest:
                out += " " + self.add_rule(f"{name}-{k}-rest", chain(rest, True))
            return out

        body = '"{" space ' + ' "," space '.join(kv[k] for k in req)
        if opt:
            alternatives = " | ".join(chain(opt[i:], False) for i in range(len(opt)))
            body += f' ( "," space ( {alternatives} ) )?' if req else f" ( {alternatives} )?"
        return self.add_rule(name, body + ' "}" space')

    def string_except(self, keys: list[str]) -> str:
        """A JSON string (quotes and trailing space included) whose text is none of keys. The keys make a trie;
        while the text is still a prefix of some key it goes on with plain characters only (an escape could spell
        a key's next character), and leaves the trie with a character no key continues with."""
        self.primitive("char")
        self.primitive("space")
        if not keys:
            return self.primitive("string")
        trie: dict = {}
        for key in keys:
            node = trie
            for c in key:
                node = node.setdefault(c, {})
            node[""] = {}

        def rest(node) -> str:
            # characters a string holds only escaped cannot continue a key here (escapes leave the trie)
            chars = sorted(c for c in node if c and c not in '"\\' and 0x20 <= ord(c) != 0x7F)
            options = [PLAIN_CHAR[:-1] + "".join(class_char(c) for c in chars) + "] char*"]
            options += [f"{literal(c)} {rest(node[c])}" for c in chars]
            return "(" + " | ".join(options) + ")" + ("" if "" in node else "?")

        return f'"\\"" {rest(trie)} "\\"" space'

    def array_rule(self, schema, name: str, path: str) -> str:
        self.primitive("space")
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        if not isinstance(lo, int) or (hi is not None and not isinstance(hi, int)) or lo < 0 or \
                (hi is not None and hi < lo):
            raise self.error(path, "'minItems' / 'maxItems' must be integers with 0 <= minItems <= maxItems")
        if max(lo, hi or 0) > MAX_COUNT:
            raise self.error(path, f"'minItems' / 'maxItems' above {MAX_COUNT} are not supported")
        if "prefixItems" in schema:
            items = [self.visit(s, f"{name}-{i}", f"{path}/prefixItems/{i}") for i, s in enumerate(schema["prefixItems"])]
            return self.add_rule(name, '"[" space ' + ' "," space '.join(items) + ' "]" space')
        if isinstance(schema.get("items"), list):
            raise self.error(path, "'items' as a list is the old tuple form; use 'prefixItems'")
        item = self.visit(schema.get("items", True), f"{name}-item", f"{path}/items")
        if hi == 0:
            return self.add_rule(name, '"[" space "]" space')
        more_lo = max(lo - 1, 0)
        more = f"{{{more_lo},{'' if hi is None else hi - 1}}}"
        body = f'{item} ( "," space {item} ){more}'
        body = f'"[" space {body} "]" space' if lo > 0 else f'"[" space ( {body} )? "]" space'
        return self.add_rule(name, body)

    def string_rule(self, schema, name: str, path: str) -> str:
        if "format" in schema:
            fmt = schema["format"]
            if fmt not in FORMATS:
                raise self.error(path, f"string format '{fmt}' is not supported (supported: {', '.join(FORMATS)})")
            if "minLength" in schema or "maxLength" in schema:
                raise self.error(path, "'minLength' / 'maxLength' together with 'format' are not supported")
            self.primitive(fmt)
            self.primitive("space")
            return self.add_rule(f"{fmt}-string", f'"\\"" {fmt} "\\"" space')
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        if not isinstance(lo, int) or (hi is not None and not isinstance(hi, int)) or lo < 0 or \
                (hi is not None and hi < lo):
            raise self.error(path, "'minLength' / 'maxLength' must be integers with 0 <= minLength <= maxLength")
        if max(lo, hi or 0) > MAX_COUNT:
            raise self.error(path, f"'minLength' / 'maxLength' above {MAX_COUNT} are not supported")
        if lo == 0 and hi is None:
            return self.primitive("string")
        self.primitive("char")
        self.primitive("space")
        count = f"{{{lo},{'' if hi is None else hi}}}"
        return self.add_rule(name, f'"\\"" char{count} "\\"" space')

    def integer_range_rule(self, schema, name: str, path: str) -> str:
        bounds = {}
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in schema:
                value = schema[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise self.error(path, f"'{key}' must be a number")
                bounds[key] = value
        limit = 10 ** MAX_DIGITS - 1
        lo, hi = -limit, limit
        if "minimum" in bounds:
            lo = max(lo, _ceil(bounds["minimum"]))
        if "exclusiveMinimum" in bounds:
            lo = max(lo, _floor(bounds["exclusiveMinimum"]) + 1)
        if "maximum" in bounds:
            hi = min(hi, _floor(bounds["maximum"]))
        if "exclusiveMaximum" in bounds:
            hi = min(hi, _ceil(bounds["exclusiveMaximum"]) - 1)
        if lo > hi:
            raise self.error(path, f"no integer satisfies the bounds {bounds}")
        self.primitive("space")
        return self.add_rule(name, f"({integer_range(lo, hi)}) space")


def _floor(x) -> int:
    return int(x // 1)


def _ceil(x) -> int:
    return -int((-x) // 1)


def integer_range(lo: int, hi: int) -> str:
    """A GBNF expression for the decimal integers lo..hi (no leading zeros, no '-0')."""
    alternatives = []
    if lo < 0:
        negative = _unsigned_range(max(1, -hi) if hi < 0 else 1, -lo)
        alternatives.append('"-" (' + " | ".join(negative) + ")")
    if hi >= 0:
        alternatives += _unsigned_range(max(lo, 0), hi)
    return " | ".join(alternatives)


def _unsigned_range(lo: int, hi: int) -> list[str]:
    out = []
    for n in range(len(str(lo)), len(str(hi)) + 1):
        a = max(lo, 10 ** (n - 1) if n > 1 else 0)
        b = min(hi, 10 ** n - 1)
        if a <= b:
            out += [" ".join(parts) for parts in _same_length(str(a), str(b))]
    return out


def _same_length(x: str, y: str) -> list[list[str]]:
    """Digit strings of one length between x and y, as sequences of GBNF items."""
    if not x:
        return [[]]
    if x[0] == y[0]:
        return [[f'"{x[0]}"'] + rest for rest in _same_length(x[1:], y[1:])]
    n = len(x) - 1
    low_full, high_full = x[1:] == "0" * n, y[1:] == "9" * n
    out = []
    if not low_full:
        out += [[f'"{x[0]}"'] + rest for rest in _same_length(x[1:], "9" * n)]
    first, last = int(x[0]) + (not low_full), int(y[0]) - (not high_full)
    if first <= last:
        out.append([f"[{first}-{last}]"] + ([f"[0-9]{{{n}}}"] if n else []))
    if not high_full:
        out += [[f'"{y[0]}"'] + rest for rest in _same_length("0" * n, y[1:])]
    return out


def class_char(c: str) -> str:
    if c in "\\]^-[\"":
        return "\\" + c if c in '\\]["' else f"\\x{ord(c):02X}"
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\x{ord(c):02X}"
    return c


def schema_to_grammar(schema) -> str:
    """GBNF text for JSON values valid under schema (a dict or a boolean). GrammarError for what is not supported."""
    converter = SchemaConverter(schema)
    converter.refs["#"] = "root"
    root = converter.visit(schema, "root", "")
    if root != "root":
        converter.rules["root"] = root
    order = ["root"] + sorted(k for k in converter.rules if k != "root")
    return "".join(f"{k} ::= {converter.rules[k]}\n" for k in order)


def schema_rules(schema, name: str) -> dict[str, str]:
    """The rules for values valid under schema, its root rule called `name` and every rule of its own named
    after it, so that the rules of several schemas (each with its own $refs) go into one grammar; the shared
    primitives (string, number, space, ...) keep their names and bodies."""
    converter = SchemaConverter(schema, prefix=name + "-")
    converter.refs["#"] = name
    root = converter.visit(schema, name, "")
    if root != name:
        converter.rules[name] = root
    return converter.rules


def json_schema_grammar(schema) -> Grammar:
    return parse_grammar(schema_to_grammar(schema), source="json schema grammar")


def read_json_schema(argument: str) -> dict:
    """The schema given as JSON text or as @FILE (the --json-schema option)."""
    source = "--json-schema"
    text = argument
    if argument.startswith("@"):
        source = argument[1:]
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise GrammarError(f"{source}: cannot read the JSON schema: {e}") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise GrammarError(f"{source}: the JSON schema is not valid JSON (line {e.lineno}, column {e.colno}: "
                           f"{e.msg})") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"{source}: a JSON schema must be an object or a boolean")
    return schema
