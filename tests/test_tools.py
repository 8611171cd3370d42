"""Tool calling (serve/tools.py) on /v1/chat/completions: the parsers on each family's own
syntax (golden strings from the model cards and templates), streamed parsing equal to whole-text
parsing at every split, rendering through a template's tools section and through the fallback,
and a live server on the default model driven by the official `openai` client and
langchain-openai: forced calls whose arguments validate against their schema (constrained
decoding), streamed tool_calls deltas that reassemble to the same call, tool_choice "none"
equal to no tools at all, a weather-tool loop end to end, and 400s naming bad fields."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from homellm.serve import create_app
from homellm.serve.tools import (ToolCallStream, call_grammar, fallback_messages, parse_calls,
                                 parse_tools, render_with_tools, tool_format)
from homellm.tokenizer.chat_template import ChatTemplate
from test_serve import MODEL, LiveServer, registry_for

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 40},
                          "unit": {"enum": ["celsius", "fahrenheit"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                           "description": "The current weather in a city"}},
         {"type": "function", "function": {
             "name": "add", "description": "Add two integers",
             "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                            "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                           "b": {"type": "integer", "minimum": -1000, "maximum": 1000}}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

# (format, a reply as the family writes it, content, [(name, arguments)])
GOLDEN = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
               '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, '
               '"b": 2}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Paris", "unit": "celsius"}), ("add", {"a": 1, "b": 2})]),
    # Qwen3 / SmolLM3: the same blocks, after a thinking block
    ("hermes", '<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
               '"arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>',
     "<think>\nThe user wants the weather.\n</think>", [("get_weather", {"city": "Oslo", "unit": "celsius"})]),
    # SmolLM2: a list of calls inside one block
    ("hermes", '<tool_call>[{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}, '
               '{"name": "add", "arguments": {"a": 5, "b": 7}}]</tool_call>',
     None, [("get_weather", {"city": "Rome", "unit": "celsius"}), ("add", {"a": 5, "b": 7})]),
    # Llama 3.1/3.2/3.3 custom tools: a bare JSON object with "parameters"
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Lima", "unit": "celsius"}}',
     None, [("get_weather", {"city": "Lima", "unit": "celsius"})]),
    ("llama3", '<|python_tag|>{"name": "add", "parameters": {"a": 2, "b": 3}}; {"name": "add", '
               '"parameters": {"a": 4, "b": 5}}<|eom_id|>',
     None, [("add", {"a": 2, "b": 3}), ("add", {"a": 4, "b": 5})]),
    # Llama 3.1 built-in tools
    ("llama3", '<|python_tag|>brave_search.call(query="weather in Paris")',
     None, [("brave_search", {"query": "weather in Paris"})]),
    # Mistral 7B v0.3 / Nemo: a JSON list after [TOOL_CALLS]
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Bern", "unit": "celsius"}, '
                '"id": "a1b2c3d4e"}]</s>',
     None, [("get_weather", {"city": "Bern", "unit": "celsius"})]),
    # Mistral Small 3.2 / Magistral (v11 tokenizer): name[ARGS]{...} per call
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Nice", "unit": "celsius"}[TOOL_CALLS]add[ARGS]{"a": 1, "b": 1}',
     None, [("get_weather", {"city": "Nice", "unit": "celsius"}), ("add", {"a": 1, "b": 1})]),
]
NOT_CALLS = [
    ("hermes", "The weather in Paris is sunny."),
    ("hermes", "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \n</tool_call>"),  # broken JSON
    ("llama3", "{Paris} is sunny."),
    ("llama3", '{"city": "Paris"}'),                     # JSON, but not a call
    ("mistral", "No tools needed: 2 + 2 = 4."),
]


@pytest.mark.parametrize("fmt,text,content,calls", GOLDEN)
def test_parsers_read_each_familys_syntax(fmt, text, content, calls):
    got_content, got = parse_calls(fmt, text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert len({c.id for c in got}) == len(got) and all(c.id.startswith("call_") for c in got)


@pytest.mark.parametrize("fmt,text", NOT_CALLS)
def test_text_that_is_not_a_call_stays_content(fmt, text):
    assert parse_calls(fmt, text) == (text, [])


@pytest.mark.parametrize("fmt,text,content,calls", GOLDEN + [(f, t, t, []) for f, t in NOT_CALLS])
def test_streamed_parsing_equals_whole_text_parsing_at_every_split(fmt, text, content, calls):
    for size in (1, 2, 3, 5, 8, 13, len(text)):
        stream, shown, got = ToolCallStream(fmt), [], []
        for i in range(0, len(text), size):
            piece, new = stream.feed(text[i:i + size])
            shown.append(piece)
            got += new
        piece, new = stream.finish()
        shown.append(piece)
        got += new
        assert [(c.name, json.loads(c.arguments)) for c in got] == calls, size
        assert ("".join(shown).strip() or None) == (content.strip() if content else None), size


def test_hermes_calls_stream_out_as_each_block_closes():
    stream = ToolCallStream("hermes")
    assert stream.feed("Sure. <tool") == ("Sure. ", [])       # a possible marker is held back
    assert stream.feed('_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}') == ("", [])
    _, calls = stream.feed("\n</tool_call>\n<tool_call>")
    assert [c.name for c in calls] == ["add"]


# -- rendering ------------------------------------------------------------------------------------

# A template with a tools section in the Qwen 2.5 style (tools in the system turn, calls as
# <tool_call> blocks with arguments | tojson, tool results as user turns of <tool_response>)
QWEN_LIKE = (
    "{%- if tools %}<|im_start|>system\n{{ messages[0].content if messages[0].role == 'system' else 'You are helpful.' }}"
    "\n\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- elif message.role == 'assistant' %}<|im_start|>assistant\n{{ message.content }}"
    "{%- for tool_call in message.tool_calls %}{%- set tool_call = tool_call.function %}"
    "\n<tool_call>\n{\"name\": \"{{ tool_call.name }}\", \"arguments\": {{ tool_call.arguments | tojson }}}\n</tool_call>"
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

HISTORY = ASK + [
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]


class _Tok:
    """What the renderers read from a tokenizer: the template and special ids."""

    def __init__(self, source):
        self.chat_template = ChatTemplate(source)
        self.special_ids = set()

    def token_to_id(self, text):
        return None


def test_formats_come_from_the_template():
    assert tool_format(_Tok(QWEN_LIKE)) == ("hermes", True)
    assert tool_format(_Tok(None)) == ("hermes", False)                       # ChatML fallback
    assert tool_format(_Tok("{{ messages }}{% if tools %}<|python_tag|>{% endif %}"))[0] == "llama3"
    assert tool_format(_Tok("{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"))[0] == "mistral"
    assert tool_format(_Tok("{% for m in messages %}{{ m.content }}{% endfor %}")) == ("hermes", False)


def test_a_template_with_a_tools_section_renders_tools_and_history_itself():
    plan = parse_tools(TOOLS, "auto")
    text = render_with_tools(_Tok(QWEN_LIKE), HISTORY, plan)
    assert json.dumps(plan.tools[0].openai()) in text and json.dumps(plan.tools[1].openai()) in text
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
            '\n</tool_call>') in text
    assert "<|im_start|>user\n<tool_response>\n{\"temperature\": 21}\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_the_fallback_writes_tools_into_the_system_message():
    plan = parse_tools(TOOLS, "auto")
    messages = fallback_messages([{"role": "system", "content": "Be brief."}] + HISTORY, plan)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(plan.tools[0].openai()) in messages[0]["content"]
    assert messages[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": '
                                      '"Paris", "unit": "celsius"}}\n</tool_call>')
    assert messages[3]["content"] == '<tool_response>\n{"temperature": 21}\n</tool_response>'
    # tool_choice none: the history still renders, no tools are offered
    none = fallback_messages(HISTORY, parse_tools(TOOLS, "none"))
    assert none[0]["role"] == "user" and "# Tools" not in json.dumps(none)


def test_forced_grammars_per_format():
    named = parse_tools(TOOLS, {"type": "function", "function": {"name": "add"}})
    lark = call_grammar(_Tok(QWEN_LIKE), named)
    assert lark.startswith('start: "<tool_call>" "\\n" call "\\n" "</tool_call>"')
    assert '"const": "add"' in lark and "get_weather" not in lark
    assert "block" not in lark   # one call unless parallel_tool_calls: true
    many = call_grammar(_Tok(QWEN_LIKE), parse_tools(TOOLS, "required", True))
    assert "{0,3}" in many and '"anyOf"' in many
    llama = call_grammar(_Tok("{% if tools %}<|python_tag|>{% endif %}"), named)
    assert '"parameters"' in llama.split("call:")[1]


# -- a live server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(default_gguf):
    live = LiveServer(create_app(registry_for(default_gguf, max_batch=4, ctx=1024)))
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def calls_of(message):
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


@pytest.mark.slow
def test_a_forced_call_validates_against_its_schema(client):
    add = TOOLS[1]["function"]["parameters"]
    for seed in (1, 2):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is 12 plus 30?"}], tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "add"}}, temperature=1.2,
            seed=seed, max_tokens=60)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [(name, arguments)] = calls_of(choice.message)
        assert name == "add"
        jsonschema.validate(arguments, add)
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       temperature=0, max_tokens=60)
    [(name, arguments)] = calls_of(r.choices[0].message)
    jsonschema.validate(arguments, next(t["function"]["parameters"] for t in TOOLS
                                        if t["function"]["name"] == name))


@pytest.mark.slow
def test_streamed_tool_call_deltas_reassemble_to_the_same_call(client):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=60,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kw)
    calls, reasons = {}, []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            assert not choice.delta.content
            for d in choice.delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = slot["id"] or d.id
                slot["name"] += d.function.name or ""
                slot["arguments"] += d.function.arguments or ""
    assert reasons[-1] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == calls_of(whole.choices[0].message)
    assert calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)


@pytest.mark.slow
def test_tool_choice_none_is_the_reply_without_tools(client):
    plain = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=12)
    none = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=12,
                                          tools=TOOLS, tool_choice="none")
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens


def get_weather(city: str, unit: str) -> dict:
    return {"city": city, "temperature": 21 if unit == "celsius" else 70, "sky": "sunny"}


@pytest.mark.slow
def test_a_weather_tool_loop_end_to_end(client):
    messages = list(ASK)
    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    result = get_weather(**json.loads(call.function.arguments))
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                           temperature=0, max_tokens=16)
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.content
    # the tool's result reached the prompt: without it, the prompt is shorter by its tokens
    assert final.usage.prompt_tokens > first.usage.prompt_tokens + 20


@pytest.mark.slow
def test_langchain_binds_tools_and_reads_the_call(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def weather(city: str) -> str:
        """The current weather in a city."""
        return f"sunny in {city}"

    llm = langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="none", model=MODEL,
                                      temperature=0, max_tokens=60, max_retries=0)
    history = [HumanMessage("What is the weather in Paris?")]
    ai = llm.bind_tools([weather], tool_choice="weather").invoke(history)
    [call] = ai.tool_calls
    assert call["name"] == "weather" and isinstance(call["args"]["city"], str)
    history += [ai, ToolMessage(weather.invoke(call["args"]), tool_call_id=call["id"])]
    final = llm.bind_tools([weather]).bind(max_tokens=16).invoke(history)
    assert final.content and not final.tool_calls


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "format": "no-such-format"}}}}}], "tool_choice": "required"},
     "tools[0].function.parameters"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}]}, "messages[0].tool_calls[0].function.arguments"),
])
def test_bad_tool_fields_are_400s_naming_them(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
