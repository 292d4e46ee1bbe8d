"""Request bodies checked field by field; anything wrong becomes an ApiError, answered as a 4xx JSON body
{"error": {"code", "type", "message"}} as llama.cpp's server answers.

Unknown fields are ignored (clients such as the openai package send fields of their own); a known field of
the wrong type or out of range is refused with a message naming it.
"""

import json
import math
from dataclasses import dataclass, field

from ..errors import GrammarError
from ..grammar import parse_grammar
from ..json_schema import schema_to_grammar

INVALID = "invalid_request_error"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = INVALID):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type

    def body(self) -> dict:
        return {"error": {"code": self.status, "type": self.type, "message": self.message}}


def parse_json(raw: bytes, allow_array: bool = False):
    """The request body as a JSON object (or an array, where a route takes one)."""
    try:
        body = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:  # arrays or objects nested thousands deep exhaust the parser's stack
        raise ApiError(400, "request body is nested too deeply") from None
    if not isinstance(body, dict) and not (allow_array and isinstance(body, list)):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def get_int(body: dict, name: str, default, low=None, high=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not is_int(v):
        raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(v)}")
    if low is not None and v < low:
        raise ApiError(400, f"'{name}' must be at least {low}, got {v}")
    if high is not None and v > high:
        raise ApiError(400, f"'{name}' must be at most {high}, got {v}")
    return v


def get_float(body: dict, name: str, default, low=None, high=None):
    v = body.get(name, default)
    if v is None:
        return default
    if not (is_int(v) or isinstance(v, float)) or not math.isfinite(v):
        raise ApiError(400, f"'{name}' must be a finite number, got {json.dumps(v)}")
    v = float(v)
    if low is not None and v < low:
        raise ApiError(400, f"'{name}' must be at least {low}, got {v}")
    if high is not None and v > high:
        raise ApiError(400, f"'{name}' must be at most {high}, got {v}")
    return v


def get_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {json.dumps(v)}")
    return v


def get_str(body: dict, name: str, default=None, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, f"'{name}' is required")
        return default
    v = body[name]
    if not isinstance(v, str):
        raise ApiError(400, f"'{name}' must be a string, got {json.dumps(v)[:60]}")
    return v


def get_stop(body: dict, name: str = "stop") -> list[str]:
    """Stop strings: an array of strings (or, as OpenAI allows, one string)."""
    v = body.get(name)
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ApiError(400, f"'{name}' must be an array of strings")
    return [s for s in v if s]


def check_token_id(token, n_vocab: int, where: str) -> int:
    if not is_int(token):
        raise ApiError(400, f"{where} must be a token id (an integer), got {json.dumps(token)[:60]}")
    if not 0 <= token < n_vocab:
        raise ApiError(400, f"{where}: token id {token} is outside the vocabulary (0..{n_vocab - 1})")
    return token


def get_prompt(body: dict, n_vocab: int, name: str = "prompt"):
    """A string, or an array of strings and token ids (llama.cpp's mixed prompt). Returns a list of parts
    (str or int), ids checked against the vocabulary."""
    if name not in body or body[name] is None:
        raise ApiError(400, f"'{name}' is required")
    v = body[name]
    if isinstance(v, str):
        return [v]
    if isinstance(v, list):
        if len(v) == 1 and isinstance(v[0], list):
            v = v[0]  # OpenAI's batch of one prompt
        parts = []
        for i, part in enumerate(v):
            if isinstance(part, str):
                parts.append(part)
            else:
                parts.append(check_token_id(part, n_vocab, f"'{name}'[{i}]"))
        return parts
    raise ApiError(400, f"'{name}' must be a string or an array of strings and token ids")


def get_logit_bias(body: dict, n_vocab: int, tokenize) -> dict:
    """llama.cpp's [[id or text, bias or false]] pairs, or OpenAI's {"id": bias} object. false: never sample.
    A text entry biases every token of the text. Returns {token id: bias}."""
    v = body.get("logit_bias")
    if v is None:
        return {}
    if isinstance(v, dict):
        pairs = []
        for key, bias in v.items():
            try:
                pairs.append([int(key), bias])
            except ValueError:
                raise ApiError(400, f"'logit_bias' key {json.dumps(key)} is not a token id") from None
    elif isinstance(v, list):
        pairs = v
    else:
        raise ApiError(400, "'logit_bias' must be an array of [token id, bias] pairs or an object {id: bias}")
    out = {}
    for i, pair in enumerate(pairs):
        if not isinstance(pair, list) or len(pair) != 2:
            raise ApiError(400, f"'logit_bias'[{i}] must be a pair [token id or text, bias or false]")
        key, bias = pair
        if bias is False:
            bias = -math.inf
        elif is_int(bias) or (isinstance(bias, float) and math.isfinite(bias)):
            bias = float(bias)
        else:
            raise ApiError(400, f"'logit_bias'[{i}]: bias must be a number or false, got {json.dumps(bias)}")
        ids = tokenize(key) if isinstance(key, str) else [check_token_id(key, n_vocab, f"'logit_bias'[{i}]")]
        for token in ids:
            out[token] = bias
    return out


def get_lora(body: dict, ids):
    """A request's own adapter scales: [{"id": i, "scale": s}, ...] → {id: scale}, or None when absent.
    ids: the adapters loaded."""
    v = body.get("lora")
    if v is None:
        return None
    if not isinstance(v, list):
        raise ApiError(400, "'lora' must be an array of {\"id\": adapter id, \"scale\": number}")
    scales = {}
    for i, entry in enumerate(v):
        if not isinstance(entry, dict):
            raise ApiError(400, f"'lora'[{i}] must be an object {{\"id\", \"scale\"}}")
        adapter_id = get_int(entry, "id", None)
        if adapter_id is None:
            raise ApiError(400, f"'lora'[{i}].id is required")
        if adapter_id not in ids:
            n = len(ids)
            raise ApiError(400, f"'lora'[{i}].id: adapter {adapter_id} does not exist "
                                f"({n} adapter{'s' if n != 1 else ''} loaded"
                                + (f": ids {', '.join(map(str, ids))})" if n else ")"))
        scales[adapter_id] = get_float(entry, "scale", 1.0)
    return scales


def get_grammar(body: dict):
    """The output constraint: 'grammar' (GBNF text) or 'json_schema' (a schema object), not both.
    Returns (GBNF text, the parsed Grammar), or ("", None) when neither is given. A grammar that does not
    parse, or a schema feature that is not supported, is a 400 before anything is generated."""
    text = get_str(body, "grammar", "")
    schema = body.get("json_schema")
    if schema is not None:
        if text:
            raise ApiError(400, "give either 'grammar' or 'json_schema', not both")
        if not isinstance(schema, (dict, bool)):
            raise ApiError(400, f"'json_schema' must be a JSON schema (an object), got {json.dumps(schema)[:60]}")
        try:
            text = schema_to_grammar(schema)
        except GrammarError as e:
            raise ApiError(400, f"'json_schema': {e}") from None
    if not text.strip():
        return "", None
    try:
        return text, parse_grammar(text, source="grammar" if schema is None else "json schema grammar")
    except GrammarError as e:
        raise ApiError(400, f"'grammar': {e}" if schema is None else f"'json_schema': {e}") from None


def schema_of_response_format(body: dict):
    """OpenAI's response_format as a JSON schema, or None for plain text:
    {"type": "json_object"} → any JSON object; {"type": "json_object", "schema": {...}} (llama.cpp's form) and
    {"type": "json_schema", "json_schema": {"schema": {...}}} (OpenAI's) → that schema."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise ApiError(400, "'response_format' must be an object with a 'type'")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        schema = fmt.get("schema", {"type": "object"})
    elif kind == "json_schema":
        inner = fmt.get("json_schema")
        if inner is None and "schema" in fmt:
            schema = fmt["schema"]
        elif isinstance(inner, dict) and "schema" in inner:
            schema = inner["schema"]
        else:
            raise ApiError(400, "'response_format': type json_schema needs {\"json_schema\": {\"schema\": {...}}}")
    else:
        raise ApiError(400, f"'response_format'.type must be 'text', 'json_object' or 'json_schema', "
                            f"got {json.dumps(kind)[:40]}")
    if not isinstance(schema, (dict, bool)):
        raise ApiError(400, "'response_format': the schema must be a JSON schema (an object)")
    return schema


@dataclass
class CompletionRequest:
    parts: list  # prompt parts: str or token id
    n_predict: int = -1
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    tfs_z: float = 1.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    penalize_nl: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int = -1
    ignore_eos: bool = False
    logit_bias: dict = field(default_factory=dict)
    stop: list = field(default_factory=list)
    n_keep: int = 0
    stream: bool = False
    cache_prompt: bool = False
    id_slot: int = -1
    lora: dict | None = None  # {adapter id: scale} for this request alone
    model: str | None = None  # the model asked for: an adapter's name picks that adapter
    grammar: str = ""  # GBNF text (from 'grammar' or 'json_schema'); "" for none
    parsed_grammar: object = None  # its llamalora.grammar.Grammar, parsed when the request was checked
    n_probs: int = 0  # alternatives reported per token (llama.cpp's n_probs, OpenAI's top_logprobs)
    post_sampling_probs: bool = False  # report the sampler chain's final probabilities instead
    logprobs: bool = False  # report the chosen tokens' figures even with n_probs 0 (OpenAI's logprobs)

    def settings(self) -> dict:
        """The generation settings as llama.cpp reports them back."""
        hidden = ("parts", "logit_bias", "lora", "parsed_grammar", "model")
        out = {k: v for k, v in self.__dict__.items() if k not in hidden}
        out["logit_bias"] = [[k, v if math.isfinite(v) else False] for k, v in self.logit_bias.items()]
        return out


def parse_completion(body: dict, n_vocab: int, n_ctx: int, adapter_ids, tokenize, prompt_name="prompt",
                     n_predict_name="n_predict", n_predict_default=-1) -> CompletionRequest:
    """A /completion body (or the llama.cpp-compatible part of an OpenAI one) checked field by field."""
    parts = get_prompt(body, n_vocab, prompt_name) if prompt_name else []
    n_predict = get_int(body, n_predict_name, n_predict_default, low=-1)
    if n_predict > n_ctx:
        raise ApiError(400, f"'{n_predict_name}' = {n_predict} is beyond the context of {n_ctx} tokens per slot")
    grammar_text, grammar = get_grammar(body)
    return CompletionRequest(
        parts=parts,
        n_predict=n_predict,
        temperature=get_float(body, "temperature", 0.8),
        top_k=get_int(body, "top_k", 40),
        top_p=get_float(body, "top_p", 0.95),
        min_p=get_float(body, "min_p", 0.05),
        tfs_z=get_float(body, "tfs_z", 1.0),
        typical_p=get_float(body, "typical_p", 1.0),
        repeat_penalty=get_float(body, "repeat_penalty", 1.0, low=1e-6),
        repeat_last_n=get_int(body, "repeat_last_n", 64, low=-1),
        penalize_nl=get_bool(body, "penalize_nl", False),
        presence_penalty=get_float(body, "presence_penalty", 0.0),
        frequency_penalty=get_float(body, "frequency_penalty", 0.0),
        mirostat=get_int(body, "mirostat", 0, low=0, high=2),
        mirostat_tau=get_float(body, "mirostat_tau", 5.0, low=0.0),
        mirostat_eta=get_float(body, "mirostat_eta", 0.1, low=0.0),
        seed=get_int(body, "seed", -1, low=-1, high=2**32 - 1),
        ignore_eos=get_bool(body, "ignore_eos", False),
        logit_bias=get_logit_bias(body, n_vocab, tokenize),
        stop=get_stop(body),
        n_keep=get_int(body, "n_keep", 0, low=-1),
        stream=get_bool(body, "stream", False),
        cache_prompt=get_bool(body, "cache_prompt", False),
        id_slot=get_int(body, "id_slot", get_int(body, "slot_id", -1), low=-1),
        lora=get_lora(body, adapter_ids),
        model=get_str(body, "model", None),
        grammar=grammar_text,
        parsed_grammar=grammar,
        n_probs=get_int(body, "n_probs", 0, low=0, high=n_vocab),
        post_sampling_probs=get_bool(body, "post_sampling_probs", False),
    )


def parse_adapter_scales(body, adapter_ids) -> dict:
    """POST /lora-adapters: [{"id", "scale"}, ...] (or {"lora": [...]}) → {id: scale}."""
    if isinstance(body, dict):
        body = body.get("lora", body.get("adapters"))
    if not isinstance(body, list):
        raise ApiError(400, "body must be an array of {\"id\": adapter id, \"scale\": number}")
    return get_lora({"lora": body}, adapter_ids)
