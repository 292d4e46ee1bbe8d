"""JSON Schema → grammar: what each keyword lets through, refusals of what is not supported, and outputs sampled
with random logits over the SmolLM2 vocabulary that must parse with json.loads and validate with jsonschema."""

import json

import jsonschema
import numpy as np
import pytest

from llamalora.errors import GrammarError
from llamalora.grammar import parse_grammar
from llamalora.json_schema import integer_range, json_schema_grammar, read_json_schema, schema_to_grammar
from test_grammar import FakeVocab, sample


def matcher(schema):
    g = json_schema_grammar(schema)
    return lambda value: g.matches(value if isinstance(value, str) else json.dumps(value))


def test_types():
    m = matcher({"type": "integer"})
    assert [m("12"), m("-7"), m("0"), m("1.5"), m('"1"'), m("012")] == [True, True, True, False, False, False]
    m = matcher({"type": "number"})
    assert [m("1.5"), m("-0.25e+3"), m("7"), m("1."), m("true")] == [True, True, True, False, False]
    m = matcher({"type": "string"})
    assert [m('"a\\"b\\u00e9 ü"'), m('"tab\there"'), m('"\\x"'), m("1")] == [True, False, False, False]
    m = matcher({"type": ["boolean", "null"]})
    assert [m("true"), m("false"), m("null"), m("0")] == [True, True, True, False]
    m = matcher({})
    assert all(m(json.dumps(v)) for v in [1, "x", None, [1, {"a": [True]}], {"k": {"l": []}}])


def test_objects_properties_required_and_order():
    m = matcher({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"},
                                                  "c": {"type": "boolean"}}, "required": ["b"]})
    # required properties first, then the optional ones in the schema's order
    assert m('{"b": "x"}') and m('{"b": "x", "a": 1}') and m('{"b":"x","a":1,"c":true}') and m('{"b":"x","c":true}')
    assert not m('{"a": 1}') and not m('{"b":"x","c":true,"a":1}') and not m('{"b":"x","d":1}')
    assert not m('{"b": 1}') and not m('{"b":"x","a":1,"a":2}')
    m = matcher({"type": "object"})
    assert m('{"anything": [1, {"x": null}]}') and m("{}") and not m("[]")


def test_additional_properties_never_repeat_named_keys():
    m = matcher({"type": "object", "properties": {"a": {"type": "string"}, "ab": {"type": "string"}},
                 "additionalProperties": {"type": "integer"}})
    assert m('{"b": 1}') and m('{"abc": 1}') and m('{"": 2}') and m('{"a": "x", "abd": 2, "zz": 3}')
    assert not m('{"a": 1}') and not m('{"ab": 1}') and not m('{"a": "x", "a": 2}') and not m('{"ab": "x", "b": "y"}')


def test_enum_const_any_of():
    m = matcher({"enum": ["red", 2, None, {"k": [1]}]})
    assert m('"red"') and m("2") and m("null") and m('{"k":[1]}') and not m('"blue"') and not m("3")
    m = matcher({"const": "fixed"})
    assert m('"fixed"') and not m('"fixe"')
    m = matcher({"anyOf": [{"type": "integer"}, {"type": "array", "items": {"type": "string"}}]})
    assert m("3") and m('["a", "b"]') and not m("[3]")


def test_arrays():
    m = matcher({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3})
    assert [m([1]), m([1, 2]), m([1, 2, 3]), m([1, 2, 3, 4]), m(["a", 2])] == [False, True, True, False, False]
    m = matcher({"type": "array", "maxItems": 1})
    assert m([]) and m([{"a": 1}]) and not m([1, 2])
    m = matcher({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]})
    assert m(["a", 1]) and not m([1, "a"]) and not m(["a"])


def test_string_lengths_and_formats():
    m = matcher({"type": "string", "minLength": 2, "maxLength": 3})
    assert [m('"a"'), m('"ab"'), m('"a\\nc"'), m('"abcd"')] == [False, True, True, False]
    m = matcher({"type": "string", "format": "date"})
    assert m('"2024-02-29"') and m('"0001-12-31"') and not m('"2023-02-29"') and not m('"2024-04-31"')
    assert not m('"0000-01-01"') and not m('"1900-02-29"') and m('"2000-02-29"')
    m = matcher({"type": "string", "format": "time"})
    assert m('"23:59:59Z"') and m('"00:00:00.123+05:30"') and not m('"24:00:00Z"') and not m('"12:00:00"')
    m = matcher({"format": "date-time"})
    assert m('"2024-01-31T08:15:00-03:00"') and not m('"2024-01-31 08:15:00Z"')
    m = matcher({"type": "string", "format": "uuid"})
    assert m('"123e4567-e89b-12d3-a456-426614174000"') and not m('"123e4567e89b12d3a456426614174000"')


def test_integer_ranges_exactly():
    for lo, hi in [(0, 0), (-5, 17), (3, 1234), (-1234, -3), (99, 101), (7, 7), (-10, 10)]:
        g = parse_grammar("root ::= " + integer_range(lo, hi))
        wrong = [n for n in range(-1300, 1300) if g.matches(str(n)) != (lo <= n <= hi)]
        assert not wrong, (lo, hi, wrong[:5])
        assert not g.matches("-0") and not g.matches("01")
    m = matcher({"type": "integer", "exclusiveMinimum": -2.5, "maximum": 40})
    assert [m("-3"), m("-2"), m("40"), m("41")] == [False, True, True, False]


def test_refs_and_recursion():
    schema = {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                                   "kids": {"type": "array",
                                                                            "items": {"$ref": "#/$defs/node"}}},
                                 "required": ["v"]}},
              "$ref": "#/$defs/node"}
    m = matcher(schema)
    assert m('{"v": 1, "kids": [{"v": 2}, {"v": 3, "kids": [{"v": 4, "kids": []}]}]}') and not m('{"kids": []}')
    m = matcher({"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
                 "required": ["next"]})
    assert m('{"next": {"next": null}}') and not m('{"next": {}}')


def test_all_of_merges_objects():
    m = matcher({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                           {"properties": {"b": {"type": "string"}}, "required": ["b"]}]})
    assert m('{"a": 1, "b": "x"}') and not m('{"a": 1}') and not m('{"b": "x"}')


@pytest.mark.parametrize("schema, path, message", [
    ({"type": "string", "pattern": "^a+$"}, "/", "'pattern' is not supported"),
    ({"type": "object", "properties": {"x": {"not": {"type": "string"}}}}, "/properties/x", "'not' is not supported"),
    ({"type": "array", "uniqueItems": True}, "/", "'uniqueItems' is not supported"),
    ({"type": "string", "format": "email"}, "/", "string format 'email' is not supported"),
    ({"type": "number", "minimum": 0}, "/", "'minimum' is only supported for integers"),
    ({"$ref": "https://example.com/s.json"}, "/", "points outside this document"),
    ({"$ref": "#/$defs/missing"}, "/", "does not resolve: no '$defs'"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "/", "required property 'b'"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "/", "0 <= minItems <= maxItems"),
    ({"type": "integer", "minimum": 5, "maximum": 3}, "/", "no integer satisfies"),
    ({"enum": []}, "/", "'enum' must be a non-empty list"),
    ({"type": "object", "properties": {"a": False}}, "/properties/a", "matches no value"),
    ({"type": "decimal"}, "/", "unknown type 'decimal'"),
    ({"allOf": [{"type": "string"}]}, "/allOf/0", "allOf is supported for object schemas"),
    ({"type": "array", "items": {"type": "string", "maxLength": 5000}}, "/items", "above 1000"),
])
def test_unsupported_or_impossible_schemas_are_refused(schema, path, message):
    with pytest.raises(GrammarError) as e:
        schema_to_grammar(schema)
    assert str(e.value).startswith(f"json schema at {path}: "), str(e.value)
    assert message in str(e.value)


def test_read_json_schema(tmp_path):
    assert read_json_schema('{"type": "integer"}') == {"type": "integer"}
    path = tmp_path / "s.json"
    path.write_text('{"type": "object",\n "properties": {"a": }}')
    with pytest.raises(GrammarError, match=r"s\.json: the JSON schema is not valid JSON \(line 2, column 22"):
        read_json_schema(f"@{path}")
    with pytest.raises(GrammarError, match="cannot read the JSON schema"):
        read_json_schema(f"@{tmp_path / 'missing.json'}")
    with pytest.raises(GrammarError, match="must be an object or a boolean"):
        read_json_schema("[1, 2]")


# sampled outputs validate

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "birthday": {"type": "string", "format": "date"},
            "id": {"type": "string", "format": "uuid"},
            "active": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
            "nickname": {"type": ["string", "null"]},
        },
        "required": ["name", "age", "id"],
    },
    "tree": {
        "$defs": {"node": {"type": "object",
                           "properties": {"value": {"type": "integer", "exclusiveMinimum": -100, "maximum": -1},
                                          "children": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                       "maxItems": 2}},
                           "required": ["value", "children"]}},
        "$ref": "#/$defs/node",
    },
    "mixed-array": {
        "type": "array", "minItems": 2, "maxItems": 4,
        "items": {"anyOf": [{"type": "number"}, {"type": "null"}, {"enum": ["red", "green", 7]},
                            {"type": "object", "properties": {"at": {"format": "date-time"}}, "required": ["at"]}]},
    },
    "open-object": {
        "type": "object",
        "properties": {"kind": {"const": "event"}, "time": {"type": "string", "format": "time"}},
        "required": ["kind"],
        "additionalProperties": {"type": "integer"},
    },
    "tuple-and-merge": {
        "allOf": [{"type": "object", "properties": {"pair": {"type": "array", "prefixItems": [
            {"type": "string"}, {"type": "integer"}]}}, "required": ["pair"]},
                  {"properties": {"score": {"type": "number"}}, "required": ["score"]}],
    },
}


@pytest.fixture(scope="module")
def smollm2_vocab(smollm2_path):
    from llamalora.model_file import load_model_file
    from llamalora.vocab import Vocab

    return Vocab.from_metadata(load_model_file(smollm2_path).metadata)


def validate(text: str, schema) -> None:
    value = json.loads(text)
    jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator,
                        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_sampled_outputs_validate_smollm2_vocab(name, smollm2_vocab):
    schema = SCHEMAS[name]
    g = json_schema_grammar(schema)
    lengths = []
    for seed in range(20):
        text = sample(g, smollm2_vocab, seed, max_tokens=48).decode("utf-8")
        validate(text, schema)
        lengths.append(len(text))
    assert np.mean(lengths) > 10


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_sampled_outputs_validate_fake_vocab(name):
    schema = SCHEMAS[name]
    g = json_schema_grammar(schema)
    for seed in range(30):
        validate(sample(g, FakeVocab(), seed, max_tokens=60).decode("utf-8"), schema)


def test_schema_outputs_fail_validation_without_the_grammar(smollm2_vocab):
    """The same sampler without the schema's grammar (only the generic JSON one) produces invalid outputs:
    the validation above is a real check."""
    from conftest import data_path
    from llamalora.grammar import load_grammar_file

    g = load_grammar_file(data_path("grammars", "json.gbnf"))
    failures = 0
    for seed in range(10):
        try:
            validate(sample(g, smollm2_vocab, seed, max_tokens=48).decode("utf-8"), SCHEMAS["person"])
        except jsonschema.ValidationError:
            failures += 1
    assert failures >= 8


def test_schema_rules_keep_each_schemas_refs_apart():
    """Two schemas whose $defs share a name go into one grammar, each resolving its own."""
    from llamalora.grammar import parse_grammar
    from llamalora.json_schema import schema_rules

    a = {"$defs": {"Item": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/$defs/Item"}}
    b = {"$defs": {"Item": {"enum": ["x"]}}, "type": "array", "items": {"$ref": "#/$defs/Item"}}
    rules = {**schema_rules(a, "first"), **schema_rules(b, "second"), "root": '"a" first | "b" second'}
    grammar = parse_grammar("".join(f"{k} ::= {v}\n" for k, v in rules.items()))
    grammar.start().accept_bytes(b'a[1, 2]')
    grammar.start().accept_bytes(b'b["x"]')
    for bad in (b'a["x"]', b'b[1]'):
        with pytest.raises(GrammarError):
            grammar.start().accept_bytes(bad)
