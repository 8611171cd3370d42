"""Ollama's API (serve/ollama_routes.py) on a live server with the default model, through
ollama-python (the official client) and httpx: tags/show/ps/version, /api/chat and
/api/generate streamed and not (equal to each other and to the OpenAI route with the same
settings), format json and schema, keep_alive loading and unloading, pull and delete against a
catalog in a temporary HOMELLM_HOME, the API key, and Ollama-shaped errors."""
from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest

from homellm.serve import ModelRegistry, ServeConfig, create_app
from test_serve import MODEL, LiveServer, registry_for

ollama = pytest.importorskip("ollama")
KEY = "ollama-key"
GREEDY = {"temperature": 0, "num_predict": 12, "repeat_penalty": 1.0}
HI = [{"role": "user", "content": "Say hello to Ada."}]


@pytest.fixture(scope="module")
def server(default_gguf):
    live = LiveServer(create_app(registry_for(default_gguf, max_batch=4, ctx=512), api_key=KEY))
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def test_version_tags_show(client, server):
    assert httpx.get(server.url + "/api/version", headers={"Authorization": f"Bearer {KEY}"}
                     ).json()["version"].count(".") == 2
    [model] = client.list().models
    assert model.model == MODEL and model.size > 50e6 and len(model.digest) == 64
    assert model.details.family == "llama" and model.details.quantization_level == "Q4_1"
    assert model.details.parameter_size.endswith("M")
    shown = client.show(MODEL)
    assert "<|im_start|>" in shown.template and "tools" in shown.capabilities
    assert shown.modelinfo["llama.context_length"] == 8192
    assert shown.modelinfo["llama.embedding_length"] == 576


def test_the_key_is_needed(server):
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=server.url).list()
    assert e.value.status_code == 401


@pytest.mark.slow
def test_chat_streamed_and_not_equal_the_openai_route(client, server):
    whole = client.chat(model=MODEL, messages=HI, options=GREEDY)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 12
    assert whole.prompt_eval_count > 0 and whole.total_duration > whole.eval_duration > 0
    parts = list(client.chat(model=MODEL, messages=HI, options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].eval_count == 12
    assert "".join(p.message.content for p in parts) == whole.message.content
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    reference = oa.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=0)
    assert whole.message.content == reference.choices[0].message.content
    # NDJSON on the wire: one object a line
    with httpx.stream("POST", server.url + "/api/chat", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "messages": HI, "options": GREEDY}, timeout=120) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert "".join(x["message"]["content"] for x in lines) == whole.message.content


@pytest.mark.slow
def test_generate_with_the_template_and_raw(client, server):
    g = client.generate(model=MODEL, prompt="Say hello to Ada.", options=GREEDY)
    chat = client.chat(model=MODEL, messages=HI, options=GREEDY)
    assert g.response == chat.message.content
    raw = client.generate(model=MODEL, prompt="The capital of France is", raw=True, options=GREEDY)
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert raw.response == oa.completions.create(model=MODEL, prompt="The capital of France is",
                                                 max_tokens=12, temperature=0).choices[0].text


@pytest.mark.slow
def test_format_json_and_schema(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat(model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}],
                    format=schema, options={"temperature": 0, "num_predict": 60})
    assert r.done_reason == "stop"
    jsonschema.validate(json.loads(r.message.content), schema)
    j = client.generate(model=MODEL, format="json", options={"temperature": 0, "num_predict": 60},
                        prompt='Reply with a JSON object with a key "answer" whose value is the '
                               'capital of France.')
    assert j.done_reason == "stop"
    assert isinstance(json.loads(j.response), dict)


def test_keep_alive_loads_and_unloads(client, server):
    assert client.chat(model=MODEL, messages=[], keep_alive=-1).done_reason == "load"
    assert [m.model for m in client.ps().models] == [MODEL]
    assert client.generate(model=MODEL, prompt="", keep_alive=0).done_reason == "unload"
    assert client.ps().models == []
    client.generate(model=MODEL, prompt="Hi", keep_alive="0s", options={"num_predict": 2})
    deadline = time.time() + 10   # unloaded by the reaper once idle
    while client.ps().models and time.time() < deadline:
        time.sleep(0.2)
    assert client.ps().models == []
    client.chat(model=MODEL, messages=[], keep_alive="5m")
    [m] = client.ps().models
    assert 250 < (m.expires_at.timestamp() - time.time()) <= 301


@pytest.mark.parametrize("path,body,status,needle", [
    ("/api/chat", {"model": "nope", "messages": HI}, 404, "model 'nope' not found"),
    ("/api/chat", {"model": MODEL, "messages": HI, "options": {"temperature": "hot"}}, 400,
     "options.temperature"),
    ("/api/chat", {"model": MODEL, "messages": HI, "format": "yaml"}, 400, "format"),
    ("/api/chat", {"model": MODEL, "messages": HI, "keep_alive": "soon"}, 400, "keep_alive"),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
     400, "images"),
    ("/api/generate", {"model": MODEL, "prompt": 5}, 400, "prompt"),
    ("/api/show", {}, 400, "model is required"),
    ("/api/embed", {"model": MODEL, "input": [1, 2]}, 400, "input"),
    ("/api/pull", {"model": "/etc/passwd"}, 404, "pull model manifest"),
])
def test_errors_are_ollama_shaped(server, path, body, status, needle):
    r = httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and needle in r.json()["error"]
    bad = httpx.post(server.url + "/api/chat", content=b"{", headers={"Authorization": f"Bearer {KEY}"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]


@pytest.mark.slow
def test_pull_and_delete_use_the_catalog(homellm_home, default_gguf):
    from homellm import catalog
    catalog.pull(str(default_gguf), name="mine:1")
    registry = ModelRegistry({"mine:1": "mine:1"}, ServeConfig(threads=1, ctx=256, keep_alive_s=-1))
    live = LiveServer(create_app(registry))
    try:
        c = ollama.Client(host=live.url)
        statuses = [p.status for p in c.pull("smollm2", stream=True)]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        assert {m.model for m in c.list().models} == {"mine:1", "smollm2:135m"}
        assert c.chat(model="smollm2", messages=HI, options={"num_predict": 2}).done
        c.delete("mine:1")
        assert [m.model for m in c.list().models] == ["smollm2:135m"]
        assert [e.name for e in catalog.list_models()] == ["smollm2:135m"]
        with pytest.raises(ollama.ResponseError) as e:
            c.delete("mine:1")
        assert e.value.status_code == 404
    finally:
        live.close()


def test_tools_reach_the_prompt_and_tool_history_renders(client):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    one = {"temperature": 0, "num_predict": 1}
    plain = client.chat(model=MODEL, messages=HI, options=one)
    offered = client.chat(model=MODEL, messages=HI, tools=tools, options=one)
    assert offered.prompt_eval_count > plain.prompt_eval_count + 40   # the tools block
    history = HI + [{"role": "assistant", "content": "", "tool_calls": [
                        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                    {"role": "tool", "content": '{"sky": "sunny"}', "tool_name": "get_weather"}]
    after = client.chat(model=MODEL, messages=history, tools=tools, options=one)
    # the call and its result are in the prompt: longer by at least their text
    assert after.prompt_eval_count > offered.prompt_eval_count + 15
    assert after.done
