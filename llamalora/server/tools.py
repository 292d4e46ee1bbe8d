"""OpenAI tool calls on /v1/chat/completions: `tools`, `tool_choice`, `parallel_tool_calls`.

How the tools reach the model: a chat template that reads a `tools` variable renders them itself (Hugging
Face's convention: `tools` is the list of {"type": "function", "function": {...}} objects, assistant turns
carry `tool_calls` with the arguments as objects, results come as role "tool" messages). Any other template
gets the fallback: a system message listing the functions' JSON Schemas and asking for calls written as
    <tool_call>
    {"name": "...", "arguments": {...}}
    </tool_call>
(the Hermes / Qwen 2.5 convention), earlier calls written back the same way in the assistant turns, and
results as user turns wrapped in <tool_response> ... </tool_response>.

How calls come back: `ToolCallParser` splits the generated text as it grows into content and calls, so that
a stream sends each call's name first and then its arguments piece by piece, as OpenAI streams them. With
tool_choice "required" or a named function a grammar built from the functions' parameter schemas
(json_schema.schema_rules) makes the model write calls only, so the arguments always parse and validate.
tool_choice "none" leaves the tools out of the prompt (vLLM's --exclude-tools-when-tool-choice-none).
"""

import json
import re
import uuid
from dataclasses import dataclass

from ..chat import template_takes_tools
from ..errors import GrammarError
from ..json_schema import literal, schema_rules
from .schemas import ApiError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
EMPTY_PARAMETERS = {"type": "object", "properties": {}}
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")
# A call object as far as its arguments: name first, then "arguments" (or Llama 3's "parameters").
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)')


@dataclass
class ToolSetup:
    tools: list  # [{"type": "function", "function": {"name", "description"?, "parameters"}}]
    choice: str  # "auto", "none", "required" or "function" (the one named)
    name: str | None  # the function tool_choice names
    parallel: bool
    in_template: bool  # the chat template renders the tools itself
    style: str  # "tags": <tool_call> blocks; "json": bare JSON objects (templates that ask for those)
    arguments_key: str = "arguments"

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "function")


def parse_tools(body: dict, template: str | None) -> ToolSetup | None:
    """The request's tools and tool_choice, checked; None when it has no tools (or tool_choice none)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "'tool_choice' needs 'tools'")
        return None
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be an array of {\"type\": \"function\", \"function\": {...}}")
    checked = [check_tool(tool, i) for i, tool in enumerate(tools)]
    names = [t["function"]["name"] for t in checked]
    for name in names:
        if names.count(name) > 1:
            raise ApiError(400, f"'tools': the function name '{name}' is given twice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ApiError(400, "'parallel_tool_calls' must be true or false")
    named = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type") != "function" or not isinstance(function, dict) or \
                not isinstance(function.get("name"), str):
            raise ApiError(400, "'tool_choice' must be \"auto\", \"none\", \"required\" or "
                                "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        named = function["name"]
        if named not in names:
            raise ApiError(400, f"'tool_choice' names the function '{named}', which is not among 'tools'")
        choice = "function"
    elif choice not in ("auto", "none", "required"):
        raise ApiError(400, f"'tool_choice' must be \"auto\", \"none\", \"required\" or a function, "
                            f"got {json.dumps(choice)[:40]}")
    if choice == "none":
        return None
    in_template = template_takes_tools(template)
    style = "json" if in_template and OPEN not in (template or "") else "tags"
    key = "parameters" if style == "json" and '"parameters"' in (template or "") else "arguments"
    return ToolSetup(checked, choice, named, parallel, in_template, style, key)


def check_tool(tool, i: int) -> dict:
    where = f"'tools'[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
            not isinstance(tool.get("function"), dict):
        raise ApiError(400, f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\", \"parameters\"}}}}")
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ApiError(400, f"{where}.function.name must be 1 to 64 letters, digits, '_', '-' or '.', "
                            f"got {json.dumps(name)[:60]}")
    parameters = function.get("parameters", EMPTY_PARAMETERS)
    if not isinstance(parameters, dict):
        raise ApiError(400, f"{where}.function.parameters must be a JSON Schema object")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise ApiError(400, f"{where}.function.description must be a string")
    return {"type": "function", "function": {**function, "parameters": parameters}}  # the client's order kept


# the prompt


def fallback_instructions(setup: ToolSetup) -> str:
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in setup.tools)
    many = "one <tool_call></tool_call> block per call" if setup.parallel else "one <tool_call></tool_call> block"
    return ("You may call functions to help with the user's request. Their signatures, as JSON Schema, are:\n"
            f"<tools>\n{listed}\n</tools>\n"
            f"To call a function, reply with {many}, holding a JSON object with the function's name and its "
            f"arguments:\n{OPEN}\n{{\"name\": \"<function name>\", \"arguments\": {{<arguments as JSON>}}}}\n{CLOSE}")


def arguments_object(text):
    """A call's arguments (OpenAI gives a JSON string) as the object templates expect; text that is not JSON
    stays as it is."""
    if isinstance(text, str):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def check_tool_calls(calls, i: int) -> list:
    if not isinstance(calls, list):
        raise ApiError(400, f"'messages'[{i}].tool_calls must be an array")
    out = []
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ApiError(400, f"'messages'[{i}].tool_calls[{k}] must be {{\"id\", \"type\": \"function\", "
                                f"\"function\": {{\"name\", \"arguments\"}}}}")
        arguments = arguments_object(function.get("arguments", "{}"))
        out.append({"id": call.get("id", ""), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def template_messages(messages: list, setup: ToolSetup | None, template_tools: bool) -> list:
    """The messages as the chat template is given them: with the template's own tool support untouched
    (tool_calls' arguments as objects), otherwise calls written back as <tool_call> blocks, results as user
    turns and the fallback instructions in the system message."""
    if template_tools:
        return messages
    out = []
    for m in messages:
        if m.get("tool_calls"):
            blocks = [f"{OPEN}\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                               ensure_ascii=False) + f"\n{CLOSE}" for c in m["tool_calls"]]
            text = "\n".join(([m["content"]] if m["content"] else []) + blocks)
            out.append({"role": m["role"], "content": text})
        elif m["role"] == "tool":
            result = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("tool_results"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + result}
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    out = [{"role": m["role"], "content": m["content"]} for m in out]
    if setup is not None:
        instructions = fallback_instructions(setup)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + instructions}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out


# the grammar for tool_choice required / a named function


def call_grammar(setup: ToolSetup) -> str:
    """GBNF for calls only: one (or with parallel_tool_calls several) of the allowed functions, each with
    arguments valid under its parameters' schema, written in the setup's style."""
    rules = {}
    calls = []
    for i, tool in enumerate(setup.tools):
        function = tool["function"]
        if setup.choice == "function" and function["name"] != setup.name:
            continue
        try:
            rules.update(schema_rules(function["parameters"], f"tool-{i}-arguments"))
        except GrammarError as e:
            raise ApiError(400, f"'tools'[{i}].function.parameters: {e}") from None
        head = "{" + json.dumps("name") + ": " + json.dumps(function["name"]) + ", " + \
            json.dumps(setup.arguments_key) + ": "
        rules[f"call-{i}"] = f'{literal(head)} tool-{i}-arguments "}}"'
        calls.append(f"call-{i}")
    rules["call"] = " | ".join(calls)
    if setup.style == "tags":
        rules["call-block"] = f'{literal(OPEN + chr(10))} call {literal(chr(10) + CLOSE)}'
    else:
        rules["call-block"] = "call"
    rules["root"] = 'call-block ( "\\n" call-block )*' if setup.parallel else "call-block"
    order = ["root"] + sorted(k for k in rules if k != "root")
    return "".join(f"{k} ::= {rules[k]}\n" for k in order)


# the reply


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallParser:
    """Generated text in, events out: ("content", text), ("call", index, id, name), ("arguments", index, text).
    Text that may still turn into a call (a prefix of <tool_call>, white space before one) is held back until
    it is clear. A call whose name comes first streams its arguments as they are generated; any other that
    parses is sent whole when it ends; one that does not parse is given back as content."""

    def __init__(self, setup: ToolSetup):
        self.setup = setup
        self.buffer = ""
        self.state = "text"  # text | call | arguments | after | done
        self.calls: list[dict] = []  # {"id", "name", "arguments"}
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.started = False  # any content sent yet (json style: calls only at the very start)

    def feed(self, text: str) -> list:
        self.buffer += text
        return self.run(final=False)

    def finish(self) -> list:
        events = self.run(final=True)
        if self.state == "text" and self.buffer:
            events.append(("content", self.buffer))
        elif self.state == "call" and self.buffer.strip():
            events.append(("content", (OPEN if self.setup.style == "tags" else "") + self.buffer))
        self.buffer = ""
        return events

    def content(self, events: list, text: str) -> None:
        if text:
            self.started = True
            events.append(("content", text))

    def run(self, final: bool) -> list:
        events = []
        while self.buffer:
            before = (self.state, len(self.buffer))
            getattr(self, "step_" + self.state)(events, final)
            if (self.state, len(self.buffer)) == before:
                break
        return events

    def step_text(self, events, final):
        if self.setup.style == "json":
            stripped = self.buffer.lstrip()
            if not self.started and stripped.startswith("{"):
                self.buffer, self.state = stripped, "call"
            elif not self.started and not stripped and not final:
                return
            else:
                self.content(events, self.buffer)
                self.buffer = ""
            return
        index = self.buffer.find(OPEN)
        if index >= 0:
            self.content(events, self.buffer[:index].rstrip())
            self.buffer, self.state = self.buffer[index + len(OPEN):], "call"
            return
        if final:
            return
        ready = len(self.buffer)
        for k in range(min(len(OPEN) - 1, ready), 0, -1):
            if self.buffer.endswith(OPEN[:k]):
                ready -= k
                break
        ready = len(self.buffer[:ready].rstrip())  # white space before a call is not content
        self.content(events, self.buffer[:ready])
        self.buffer = self.buffer[ready:]

    def step_call(self, events, final):
        head = CALL_HEAD.match(self.buffer)
        if head:
            self.start_call(events, head.group(1))
            self.buffer, self.state = self.buffer[head.end():], "arguments"
            self.depth, self.in_string, self.escaped = 0, False, False
            return
        whole = self.whole_call()
        if whole is not None:
            obj, rest = whole
            self.start_call(events, obj["name"])
            arguments = obj.get("arguments", obj.get("parameters", {}))
            self.add_arguments(events, json.dumps(arguments, ensure_ascii=False))
            self.buffer = rest
            self.state = "after" if self.setup.style == "tags" else self.next_state()
            return
        if final or (self.setup.style == "tags" and CLOSE in self.buffer):
            text = (OPEN if self.setup.style == "tags" else "") + self.buffer
            self.buffer, self.state = "", "text"
            self.content(events, text)

    def whole_call(self):
        """A complete call object at the start of the buffer: (the object, the text after it), or None."""
        text = self.buffer.lstrip()
        try:
            obj, end = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        return obj, text[end:]

    def start_call(self, events, name: str) -> None:
        call = {"id": new_call_id(), "name": name, "arguments": ""}
        self.calls.append(call)
        events.append(("call", len(self.calls) - 1, call["id"], name))

    def add_arguments(self, events, text: str) -> None:
        if text:
            self.calls[-1]["arguments"] += text
            events.append(("arguments", len(self.calls) - 1, text))

    def step_arguments(self, events, final):
        """The arguments' JSON text up to where its brackets close (strings and escapes followed)."""
        end = None
        for i, c in enumerate(self.buffer):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
                    if self.depth == 0:
                        end = i + 1
                        break
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    end = i + 1
                    break
        if end is None:
            self.add_arguments(events, self.buffer)
            self.buffer = ""
            return
        self.add_arguments(events, self.buffer[:end])
        self.buffer, self.state = self.buffer[end:], "after"

    def step_after(self, events, final):
        """What closes a call: the object's brace, then </tool_call> (tags style)."""
        if self.setup.style == "tags":
            index = self.buffer.find(CLOSE)
            if index < 0:
                return
            self.buffer = self.buffer[index + len(CLOSE):]
        else:
            stripped = self.buffer.lstrip()
            if not stripped:
                return
            self.buffer = stripped[1:] if stripped[0] == "}" else stripped
        self.state = self.next_state()

    def next_state(self) -> str:
        return "text" if self.setup.parallel else "done"

    def step_done(self, events, final):
        self.buffer = ""  # with parallel_tool_calls false only the first call counts


def message_calls(calls: list) -> list:
    """The reply's tool_calls as OpenAI writes them."""
    return [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls]


def parse_reply(setup: ToolSetup, text: str) -> tuple[str | None, list]:
    """A whole reply: (content or None, tool_calls)."""
    parser = ToolCallParser(setup)
    events = parser.feed(text) + parser.finish()
    content = "".join(e[1] for e in events if e[0] == "content")
    if parser.calls and not content.strip():
        content = None
    return content, message_calls(parser.calls)
