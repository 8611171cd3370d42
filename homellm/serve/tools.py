"""Tool calling: OpenAI `tools` / `tool_choice` in, the model's own tool-call syntax out and back.

    plan = parse_tools(body.tools, body.tool_choice, body.parallel_tool_calls)   # 400s here
    fmt = tool_format(tokenizer)                 # which syntax this model writes calls in
    text = render_with_tools(tokenizer, fmt, messages, plan)
    lark = call_grammar(tokenizer, fmt, plan)    # tool_choice required / named: the call itself
    content, calls = parse_calls(fmt, reply)     # or ToolCallStream(fmt) while streaming

The syntax comes from the model's chat template (metadata in the file, never its name):

| format  | a call as the model writes it                                  | families                 |
|---------|----------------------------------------------------------------|--------------------------|
| hermes  | `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` | Qwen 2.5/3, Hermes 2/3, SmolLM3; SmolLM2 puts a list `[{...}]` inside |
| llama3  | `{"name": ..., "parameters": {...}}`, or `<|python_tag|>` + that or `tool.call(k=v)` | Llama 3.1/3.2/3.3 |
| mistral | `[TOOL_CALLS][{"name": ..., "arguments": {...}}]`, or `[TOOL_CALLS]name[ARGS]{...}` | Mistral 7B v0.3, Nemo, Small |

A template with a tools section of one of these formats renders the tools and the history
itself (`tools=`, assistant `tool_calls` with arguments as objects, `role: "tool"` messages,
as transformers passes them). A template without one (the default model's plain ChatML) gets
the documented fallback: the hermes format, spelled out in the system message

    # Tools
    You can call functions ... <tools>{one JSON signature per line}</tools> ...
    <tool_call>{"name": ..., "arguments": ...}</tool_call>

with earlier calls written into the assistant's text the same way, and tool results passed as
a user message of `<tool_response>...</tool_response>` blocks (as Qwen's template does), so the
template sees only the roles it knows. Every parser accepts every family's wrapper for its own
format; text that does not parse as a call stays content, nothing is dropped.
With `tool_choice` "required" or a named function, the call is generated under a grammar
(engine/constrain.py, llguidance): the wrapper syntax around a JSON object whose `name` is a
tool's and whose arguments follow that tool's `parameters` schema, so they always validate.
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field

from homellm.serve.errors import invalid

MAX_TOOLS = 128                        # OpenAI's limit
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_PARALLEL_CALLS = 4                 # calls one forced reply may hold (parallel_tool_calls)
FORMATS = ("hermes", "llama3", "mistral")


@dataclass
class Tool:
    name: str
    description: str | None
    parameters: dict           # a JSON Schema for the arguments object
    strict: bool | None = None

    def openai(self) -> dict:
        fn = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}


@dataclass
class ToolPlan:
    """What a request asks of tools: which exist, whether/which one must be called."""

    tools: list[Tool]
    choice: str = "auto"           # "none", "auto", "required" or "function"
    function: str | None = None    # choice "function": its name
    parallel: bool | None = None   # parallel_tool_calls as sent (None: not sent)

    @property
    def active(self) -> bool:
        """Tools are offered to the model (and its reply parsed for calls)."""
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.active and self.choice in ("required", "function")

    def forced_tools(self) -> list[Tool]:
        if self.choice == "function":
            return [t for t in self.tools if t.name == self.function]
        return self.tools


@dataclass
class ToolCall:
    name: str
    arguments: str                 # a JSON object, as text (OpenAI's `function.arguments`)
    id: str = field(default_factory=lambda: new_call_id())

    def openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}

    def argument_object(self) -> dict:
        return json.loads(self.arguments)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# -- the request's fields --------------------------------------------------------------------

def parse_tools(tools, tool_choice, parallel_tool_calls=None, *, param: str = "tools",
                flat: bool = False) -> ToolPlan | None:
    """A ToolPlan from OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`; None when
    no tools are given (then `tool_choice` may only be "none" or "auto"). `flat`: the
    Responses API's shape ({"type": "function", "name", "parameters"} without "function").
    Raises a 400 APIError naming the field."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise invalid("parallel_tool_calls", f"expected true or false, got {parallel_tool_calls!r}")
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise invalid("tool_choice", "a tool choice needs tools: the request has none")
        return None
    if not isinstance(tools, list):
        raise invalid(param, f"expected a list of tools, got {type(tools).__name__}")
    if len(tools) > MAX_TOOLS:
        raise invalid(param, f"at most {MAX_TOOLS} tools, got {len(tools)}")
    parsed, names = [], set()
    for i, spec in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(spec, dict):
            raise invalid(where, f"expected an object, got {type(spec).__name__}")
        if spec.get("type", "function") != "function":
            raise invalid(f"{where}.type", f"only 'function' tools are supported, got "
                          f"{spec.get('type')!r}", "unsupported")
        fn = spec if flat else spec.get("function")
        fwhere = where if flat else f"{where}.function"
        if not isinstance(fn, dict):
            raise invalid(fwhere, "expected an object with 'name' and 'parameters'")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise invalid(f"{fwhere}.name", f"expected 1 to 64 characters of a-z, A-Z, 0-9, '_' "
                          f"or '-', got {name!r}")
        if name in names:
            raise invalid(f"{fwhere}.name", f"the name {name!r} is used by two tools")
        names.add(name)
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid(f"{fwhere}.description", "expected a string")
        parameters = fn.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise invalid(f"{fwhere}.parameters", f"expected a JSON Schema object, got "
                          f"{type(parameters).__name__}")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise invalid(f"{fwhere}.strict", f"expected true, false or null, got {strict!r}")
        parsed.append(Tool(name, description, parameters, strict))
    plan = ToolPlan(parsed, parallel=parallel_tool_calls)
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise invalid("tool_choice", f"expected 'none', 'auto', 'required' or "
                          f"{{\"type\": \"function\", ...}}, got {choice!r}")
        plan.choice = choice
        return plan
    if not isinstance(choice, dict) or choice.get("type") != "function":
        raise invalid("tool_choice", "expected 'none', 'auto', 'required' or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    fn = choice if flat else choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if name not in names:
        raise invalid("tool_choice", f"names the function {name!r}, which is not among the "
                      f"tools ({', '.join(sorted(names))})")
    plan.choice, plan.function = "function", name
    return plan


def history_calls(tool_calls, where: str) -> list[dict]:
    """An assistant message's OpenAI `tool_calls` -> [{"id", "name", "arguments": object}]."""
    if not isinstance(tool_calls, list):
        raise invalid(where, "expected a list of tool calls")
    out = []
    for j, call in enumerate(tool_calls):
        w = f"{where}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(w, "expected {\"id\", \"type\": \"function\", \"function\": "
                          "{\"name\", \"arguments\"}}")
        arguments = fn.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise invalid(f"{w}.function.arguments", f"not valid JSON ({e.msg} at "
                              f"character {e.pos})") from None
        if not isinstance(arguments, dict):
            raise invalid(f"{w}.function.arguments", "expected a JSON object")
        out.append({"id": str(call.get("id") or new_call_id()), "name": fn["name"],
                    "arguments": arguments})
    return out


# -- which syntax a model speaks ---------------------------------------------------------------

def tool_format(tokenizer) -> tuple[str, bool]:
    """(format, native): the tool-call syntax of the model's chat template and whether the
    template renders tools itself; ("hermes", False) for a template without a tools section."""
    template = tokenizer.chat_template
    source = "" if template.is_fallback else template.source
    if "tools" not in source:
        return "hermes", False
    if "[TOOL_CALLS]" in source:
        return "mistral", True
    if "<tool_call>" in source:
        return "hermes", True
    if "<|python_tag|>" in source or "ipython" in source:
        return "llama3", True
    return "hermes", False  # a tools section of a syntax we cannot parse back: the fallback


# -- rendering ---------------------------------------------------------------------------------

def _signature(tool: Tool) -> str:
    return json.dumps(tool.openai(), ensure_ascii=False)


def fallback_system_block(tools: list[Tool]) -> str:
    """The tools section written into the system message for a template without one."""
    lines = "\n".join(_signature(t) for t in tools)
    return ("# Tools\n\n"
            "You can call functions to help with the user's request. Their signatures, one "
            "per line, are inside <tools></tools>:\n"
            f"<tools>\n{lines}\n</tools>\n\n"
            "To call a function, reply with a JSON object naming it and giving its arguments, "
            "inside <tool_call></tool_call>:\n"
            "<tool_call>\n{\"name\": \"function name\", \"arguments\": {\"argument\": \"value\"}}"
            "\n</tool_call>\n"
            "The results come back inside <tool_response></tool_response>.")


def _hermes_call_text(call: dict) -> str:
    return ("<tool_call>\n" + json.dumps({"name": call["name"], "arguments": call["arguments"]},
                                         ensure_ascii=False) + "\n</tool_call>")


def _mistral_id(call_id: str) -> str:
    """Mistral's templates take 9 alphanumeric characters as a call id."""
    if re.fullmatch(r"[A-Za-z0-9]{9}", call_id):
        return call_id
    return hashlib.sha1(call_id.encode()).hexdigest()[:9]


def fallback_messages(messages: list[dict], plan: ToolPlan | None) -> list[dict]:
    """Messages with `tool_calls` and `tool` roles, for a template that knows neither."""
    out: list[dict] = []
    for m in messages:
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            parts = [m["content"]] if m.get("content") else []
            parts += [_hermes_call_text(c) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif role == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append({"role": role, "content": m["content"]})
    for m in out:
        m.pop("_tool_results", None)
    if plan is not None and plan.active:
        block = fallback_system_block(plan.tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"
                      if out[0]["content"] else block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def native_messages(messages: list[dict], fmt: str) -> list[dict]:
    """Messages as transformers passes them to a template with a tools section."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"id": _mistral_id(c["id"]) if fmt == "mistral" else c["id"],
                      "type": "function",
                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": m.get("content") or "",
                        "tool_calls": calls})
        elif m["role"] == "tool":
            msg = {"role": "tool", "content": m["content"]}
            if m.get("tool_call_id"):
                msg["tool_call_id"] = (_mistral_id(m["tool_call_id"]) if fmt == "mistral"
                                       else m["tool_call_id"])
            if m.get("name"):
                msg["name"] = m["name"]
            out.append(msg)
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def needs_tools_handling(messages: list[dict], plan: ToolPlan | None) -> bool:
    return (plan is not None and plan.active) or any(
        m.get("tool_calls") or m["role"] == "tool" for m in messages)


def render_with_tools(tokenizer, messages: list[dict], plan: ToolPlan | None) -> str:
    """The prompt for `messages` (chat_messages' output: tool_calls as objects) with `plan`'s
    tools, through the model's own template (its tools section, or the fallback)."""
    fmt, native = tool_format(tokenizer)
    if native:
        tools = [t.openai() for t in plan.tools] if plan is not None and plan.active else None
        return tokenizer.chat_template.render(native_messages(messages, fmt),
                                              add_generation_prompt=True, tools=tools)
    return tokenizer.chat_template.render(fallback_messages(messages, plan),
                                          add_generation_prompt=True)


# -- the forced call's grammar -------------------------------------------------------------------

def _marker(tokenizer, text: str) -> str:
    """A Lark literal for `text`: the special token where the vocabulary has it as one (as
    the model writes it), else the text itself."""
    tid = tokenizer.token_to_id(text)
    if tid is not None and tid in tokenizer.special_ids:
        return f"<[{tid}]>"
    return json.dumps(text)


def _call_schema(tools: list[Tool], arguments_key: str) -> dict:
    options = [{"type": "object", "properties": {"name": {"const": t.name},
                                                 arguments_key: t.parameters},
                "required": ["name", arguments_key], "additionalProperties": False}
               for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def call_grammar(tokenizer, plan: ToolPlan) -> str:
    """A Lark grammar (llguidance) for the reply of a forced tool call in the model's syntax:
    one call, or 1 to MAX_PARALLEL_CALLS for "required" with parallel_tool_calls sent as true
    (not by default: a small model would repeat its call until max_tokens)."""
    from homellm.engine.constrain import lark_json
    fmt, _ = tool_format(tokenizer)
    tools = plan.forced_tools()
    many = plan.choice == "required" and plan.parallel is True
    if fmt == "llama3":
        schema = _call_schema(tools, "parameters")
        rest = f' ("; " call){{0,{MAX_PARALLEL_CALLS - 1}}}' if many else ""
        return f"start: call{rest}\ncall: {lark_json(schema)}\n"
    if fmt == "mistral":
        schema = _call_schema(tools, "arguments")
        rest = f' (", " call){{0,{MAX_PARALLEL_CALLS - 1}}}' if many else ""
        return (f'start: {_marker(tokenizer, "[TOOL_CALLS]")} "[" call{rest} "]"\n'
                f"call: {lark_json(schema)}\n")
    schema = _call_schema(tools, "arguments")
    open_, close = _marker(tokenizer, "<tool_call>"), _marker(tokenizer, "</tool_call>")
    block = f'{open_} "\\n" call "\\n" {close}'
    if many:
        return f'start: block ("\\n" block){{0,{MAX_PARALLEL_CALLS - 1}}}\nblock: {block}\n' \
               f"call: {lark_json(schema)}\n"
    return f"start: {block}\ncall: {lark_json(schema)}\n"


# -- parsing calls back ----------------------------------------------------------------------------

def _call_from(obj) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) and isinstance(obj.get("function"), dict):  # {"function": {...}}
        return _call_from(obj["function"])
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _calls_from_json(text: str) -> list[ToolCall] | None:
    """One JSON object or a list of them (call objects); None unless all of it parses."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_call_from(v) for v in items]
    return calls if calls and all(c is not None for c in calls) else None


def _json_sequence(text: str, separators: str = ";,") -> list | None:
    """Several JSON values one after another (separated by whitespace or `separators`)."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] in separators):
            i += 1
        if i >= len(text):
            return values or None
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)


def _python_call(text: str) -> ToolCall | None:
    """Llama 3.1's built-in tool syntax: `brave_search.call(query="...")`."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.Call) or tree.args:
        return None
    func = tree.func
    if isinstance(func, ast.Attribute) and func.attr == "call" and isinstance(func.value, ast.Name):
        name = func.value.id
    elif isinstance(func, ast.Name):
        name = func.id
    else:
        return None
    try:
        arguments = {k.arg: ast.literal_eval(k.value) for k in tree.keywords}
    except ValueError:
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _parse_hermes(text: str) -> tuple[str, list[ToolCall]]:
    calls, kept, pos = [], [], 0
    for m in re.finditer(r"<tool_call>(.*?)(?:</tool_call>|\Z)", text, re.S):
        found = _calls_from_json(m.group(1).strip())
        kept.append(text[pos:m.start()] if found is not None else text[pos:m.end()])
        calls += found or []
        pos = m.end()
    kept.append(text[pos:])
    return "".join(kept), calls


def _parse_llama3(text: str) -> tuple[str, list[ToolCall]]:
    body = text.strip()
    tagged = body.startswith("<|python_tag|>")
    if not tagged and "<|python_tag|>" in body:
        before, _, after = body.partition("<|python_tag|>")
        content, calls = _parse_llama3("<|python_tag|>" + after)
        return (before + content, calls) if calls else (text, [])
    body = body.removeprefix("<|python_tag|>").strip()
    for end in ("<|eom_id|>", "<|eot_id|>"):
        body = body.removesuffix(end).strip()
    if body.startswith(("{", "[")):
        values = _json_sequence(body)
        if values is not None:
            items = [v for value in values for v in (value if isinstance(value, list) else [value])]
            calls = [_call_from(v) for v in items]
            if calls and all(c is not None for c in calls):
                return "", calls
    if tagged:
        calls = [_python_call(part) for part in body.split(";") if part.strip()]
        if calls and all(c is not None for c in calls):
            return "", calls
    return text, []


def _parse_mistral(text: str) -> tuple[str, list[ToolCall]]:
    if "[TOOL_CALLS]" not in text:
        return text, []
    before, _, after = text.partition("[TOOL_CALLS]")
    after = after.strip().removesuffix("</s>").strip()
    calls = _calls_from_json(after)
    if calls is None:
        values = _json_sequence(after)
        if values is not None:
            calls = [_call_from(v) for v in values]
            calls = calls if all(c is not None for c in calls) else None
    if calls is None:  # v11+: name[ARGS]{...} repeated, each after its own [TOOL_CALLS]
        calls = []
        for part in re.split(r"\[TOOL_CALLS\]", after):
            name, sep, args = part.partition("[ARGS]")
            try:
                arguments = json.loads(args) if sep else None
            except json.JSONDecodeError:
                arguments = None
            if not isinstance(arguments, dict) or not TOOL_NAME.match(name.strip()):
                return text, []
            calls.append(ToolCall(name.strip(), json.dumps(arguments, ensure_ascii=False)))
    return before, calls


_PARSERS = {"hermes": _parse_hermes, "llama3": _parse_llama3, "mistral": _parse_mistral}
_STARTS = {"hermes": ("<tool_call>",), "llama3": ("<|python_tag|>",), "mistral": ("[TOOL_CALLS]",)}


def parse_calls(fmt: str, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole reply in `fmt`: content is the text outside the calls
    (None when only calls were written), calls in order."""
    content, calls = _PARSERS[fmt](text)
    if not calls:
        return text, []
    content = content.strip()
    return content or None, calls


class ToolCallStream:
    """The calls of a streamed reply, as its text arrives: content is passed on at once except
    what may be the start of a call; calls come out when their text has closed (hermes:
    each `</tool_call>`) or at the end."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.starts = _STARTS[fmt]
        self.pending = ""        # text not yet emitted
        self.in_calls = False    # a call has started: everything from here is held
        self.emitted: list[ToolCall] = []
        self.seen_text = False   # llama3: a reply that begins with "{" is a call

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.pending += text
        if self.in_calls:
            return "", self._closed_calls()
        if self.fmt == "llama3" and not self.seen_text:
            stripped = self.pending.lstrip()
            if not stripped:
                return "", []
            self.seen_text = True
            if stripped.startswith(("{", "[")):
                self.in_calls = True
                return "", []
        hits = [i for i in (self.pending.find(s) for s in self.starts) if i >= 0]
        if hits:
            cut = min(hits)
            out, self.pending = self.pending[:cut], self.pending[cut:]
            self.in_calls = True
            return out, self._closed_calls()
        hold = 0
        for s in self.starts:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, []

    def _closed_calls(self) -> list[ToolCall]:
        if self.fmt != "hermes":
            return []
        end = self.pending.rfind("</tool_call>")
        if end < 0:
            return []
        end += len("</tool_call>")
        head, self.pending = self.pending[:end], self.pending[end:]
        content, calls = _parse_hermes(head)
        if content.strip():  # a block that did not parse: keep it for the end, as content
            self.pending = head + self.pending
            return []
        self.emitted += calls
        return calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The rest of the content and the remaining calls, at the end of the reply."""
        rest, self.pending = self.pending, ""
        if not rest:
            return "", []
        content, calls = _PARSERS[self.fmt](rest)
        if not calls:
            return rest, []
        self.emitted += calls
        return content.strip(), calls
