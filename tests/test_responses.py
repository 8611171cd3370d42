"""/v1/responses (serve/responses.py) on a live server with the default model, through the
official `openai` client: text and items in, instructions, previous_response_id over stored
responses, streamed events that add up to the non-streamed response, a forced function call
and its function_call_output, text.format json_schema, retrieve/delete and bad input."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from homellm.serve import create_app
from test_serve import MODEL, LiveServer, registry_for

WEATHER = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                           "required": ["city"], "additionalProperties": False}}]


@pytest.fixture(scope="module")
def server(default_gguf):
    live = LiveServer(create_app(registry_for(default_gguf, max_batch=4, ctx=1024)))
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def chat_text(client, messages, max_tokens):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                          temperature=0).choices[0].message.content


@pytest.mark.slow
def test_text_input_and_instructions_equal_the_chat_reply(client):
    r = client.responses.create(model=MODEL, input="Name a fruit.", instructions="Be brief.",
                                max_output_tokens=12, temperature=0)
    assert r.object == "response" and r.status in ("completed", "incomplete")
    assert r.output_text == chat_text(client, [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Name a fruit."}], 12)
    assert r.usage.output_tokens <= 12 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # items, and the history of a stored response (its instructions are not carried over)
    follow = client.responses.create(model=MODEL, previous_response_id=r.id, max_output_tokens=8,
                                     temperature=0, input=[{"role": "user", "content": [
                                         {"type": "input_text", "text": "Another one?"}]}])
    assert follow.previous_response_id == r.id
    assert follow.output_text == chat_text(client, [
        {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": r.output_text},
        {"role": "user", "content": "Another one?"}], 8)
    assert client.responses.retrieve(r.id).output_text == r.output_text
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


@pytest.mark.slow
def test_streamed_events_add_up_to_the_response(client):
    kw = dict(model=MODEL, input="Count to five.", max_output_tokens=16, temperature=0)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed" and "response.output_text.done" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text


@pytest.mark.slow
def test_a_function_call_and_its_output(client):
    r = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=WEATHER,
                                tool_choice={"type": "function", "name": "get_weather"},
                                max_output_tokens=40, temperature=0)
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER[0]["parameters"])
    with client.responses.stream(model=MODEL, input="What is the weather in Paris?", tools=WEATHER,
                                 tool_choice="required", max_output_tokens=40, temperature=0) as s:
        streamed = s.get_final_response().output
    assert [(c.name, c.arguments) for c in streamed] == [(call.name, call.arguments)]
    final = client.responses.create(model=MODEL, previous_response_id=r.id, tools=WEATHER,
                                    max_output_tokens=12, temperature=0, input=[
                                        {"type": "function_call_output", "call_id": call.call_id,
                                         "output": json.dumps({"sky": "sunny", "celsius": 21})}])
    assert final.output_text and final.usage.input_tokens > r.usage.input_tokens


@pytest.mark.slow
def test_text_format_json_schema(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 20},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
    r = client.responses.create(model=MODEL, input="Describe a person as JSON.", max_output_tokens=60,
                                temperature=0, text={"format": {"type": "json_schema", "name": "person",
                                                                "schema": schema, "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)


@pytest.mark.parametrize("body,status,param", [
    ({"input": "hi", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ({"input": [{"type": "image_generation_call"}]}, 400, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400,
     "input[0].content[0]"),
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, 400, "text.format.type"),
    ({"input": "hi", "tools": [{"type": "function", "name": "bad name"}]}, 400, "tools[0].name"),
    ({"input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
])
def test_bad_requests_name_the_field(server, body, status, param):
    r = httpx.post(server.url + "/v1/responses", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_the_store_is_bounded_in_count_and_size():
    from homellm.serve.responses import ResponseStore
    store = ResponseStore(limit=3, max_chars=2000)
    for i in range(5):
        store.put({"id": f"r{i}"}, [{"role": "user", "content": "x"}])
    assert [rid for rid in store._items] == ["r2", "r3", "r4"]
    store.get("r2")                      # used: now the most recent
    small = len(json.dumps({"id": "r2"})) + len(json.dumps([{"role": "user", "content": "x"}]))
    empty = len(json.dumps({"id": "big"})) + len(json.dumps([{"role": "user", "content": ""}]))
    store.put({"id": "big"}, [{"role": "user", "content": "y" * (2000 - small - empty)}])
    assert list(store._items) == ["r2", "big"] and store._chars == 2000  # r3 by count, r4 by size
    assert store.delete("big") and not store.delete("big")
    with pytest.raises(Exception):
        store.get("r0")
