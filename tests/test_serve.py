"""`homellm serve` against a live uvicorn server on 127.0.0.1, driven by the official `openai`
client (and httpx where headers or broken bodies matter), on the default model."""
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import torch
import uvicorn

from homellm.serve import ModelRegistry, ServeConfig, create_app

KEY = "test-key"
MODEL = "smollm2"


class LiveServer:
    """A uvicorn server for `app` on a free port of 127.0.0.1, in a thread (served=True: with
    the settings `homellm serve` runs, connections.server_config's guarded protocol)."""

    def __init__(self, app, served: bool = False):
        from homellm.serve.connections import server_config
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = uvicorn.Server(server_config(app, "127.0.0.1", port) if served else
                                     uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(20)


def registry_for(path, **config) -> ModelRegistry:
    # one matmul thread: these tests share the CPU with others (thread teams then stall)
    return ModelRegistry({MODEL: path}, ServeConfig(threads=1, **config))


@pytest.fixture(scope="module")
def server(default_gguf):
    live = LiveServer(create_app(registry_for(default_gguf, max_batch=16, ctx=512), api_key=KEY))
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    from homellm.model.formats import open_checkpoint
    from homellm.tokenizer import Tokenizer
    ckpt = open_checkpoint(default_gguf)
    return Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)


def ask(text):
    return [{"role": "user", "content": text}]


def greedy_chat(client, text, max_tokens=16, **kw):
    return client.chat.completions.create(model=MODEL, messages=ask(text), max_tokens=max_tokens,
                                          temperature=0, **kw)


# -- the basics ---------------------------------------------------------------------------------

def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert health["status"] == "ok" and health["models"][0]["id"] == MODEL
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # no key: no details


def test_chat_non_streaming_and_usage(client, tokenizer):
    r = greedy_chat(client, "What is the capital of France?", logprobs=True)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    prompt_ids = tokenizer.apply_chat_template(ask("What is the capital of France?"))
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(choice.logprobs.content) <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    long = greedy_chat(client, "Write a long story about a dragon.", max_tokens=7)
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 7


def test_chat_streaming_equals_non_streaming(client):
    whole = greedy_chat(client, "Name three colors.", max_tokens=20)
    chunks = list(greedy_chat(client, "Name three colors.", max_tokens=20, stream=True,
                              stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completions_streaming_and_not(client, tokenizer):
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=2)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt)) and r.usage.completion_tokens == 8
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 8
    assert all(len(t) == 2 for t in lp.top_logprobs)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == r.choices[0].text
    ids = client.completions.create(model=MODEL, prompt=tokenizer.encode(prompt), max_tokens=8,
                                    temperature=0)
    assert ids.choices[0].text == r.choices[0].text


def test_stop_strings(client):
    free = greedy_chat(client, "Count from one to ten in words.", max_tokens=30).choices[0].message.content
    words = free.split()
    assert len(words) > 4
    stop = " " + words[3]
    r = greedy_chat(client, "Count from one to ten in words.", max_tokens=30, stop=[stop, "zzz"])
    assert r.choices[0].message.content == free[:free.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    chunks = greedy_chat(client, "Count from one to ten in words.", max_tokens=30, stop=stop,
                         stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == free[:free.index(stop)]


def test_seed_reproduces_a_sampled_reply(client):
    def sample(seed):
        return client.chat.completions.create(
            model=MODEL, messages=ask("Tell me a short story."), max_tokens=12, temperature=1.0,
            seed=seed).choices[0].message.content
    a, b, c = sample(42), sample(42), sample(43)
    assert a == b and a != c


def test_logprobs_are_the_models(client, tokenizer, default_gguf):
    """The reported logprobs equal log_softmax of the serving runtime's own logits (the C
    runtime teacher-forced over prompt + reply: the same rows, so the same numbers), and stay
    near the float network's (PyTorch, float32 activations and KV cache: over 400 tokens of text
    the two runtimes' log-probabilities differ by 8e-4 on average, at most ~7e-3)."""
    from homellm.engine.kernels import build
    from homellm.engine.kernels.native import NativeModel
    from homellm.engine.loader import build_model
    from homellm.model.formats import open_checkpoint
    r = greedy_chat(client, "Why is the sea salty?", max_tokens=10, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    prompt = tokenizer.apply_chat_template(ask("Why is the sea salty?"))
    reply = tokenizer.encode(r.choices[0].message.content, add_special_tokens=False)
    own = None  # without a C compiler the server ran on the float network itself
    if build.load() is not None:
        ckpt = open_checkpoint(default_gguf)
        native = NativeModel(ckpt.args, ckpt.tensors, len(prompt) + len(reply), threads=2)
        own = torch.from_numpy(native.forward(prompt + reply, 0, last_only=False)).double().log_softmax(-1)
    net = build_model(open_checkpoint(default_gguf), device="cpu")
    with torch.inference_mode():
        logp = net(torch.tensor([prompt + reply])).float()[0].log_softmax(-1)
    for i, t in enumerate(content[:len(reply)]):
        j = len(prompt) - 1 + i
        if own is not None:
            assert t.logprob == pytest.approx(float(own[j, reply[i]]), abs=1e-6)
        assert t.logprob == pytest.approx(float(logp[j, reply[i]]), abs=1e-2)
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs),
                                                              reverse=True)


def test_json_schema_response_parses_and_validates(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pets"],
              "properties": {"name": {"type": "string", "maxLength": 20},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120},
                             "pets": {"type": "array", "maxItems": 2,
                                      "items": {"type": "string", "maxLength": 12}}}}
    r = client.chat.completions.create(
        model=MODEL, messages=ask("Describe a person as JSON."), max_tokens=120, temperature=0.7,
        seed=1, response_format={"type": "json_schema",
                                 "json_schema": {"name": "person", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    obj = client.chat.completions.create(
        model=MODEL, max_tokens=60, temperature=0, response_format={"type": "json_object"},
        messages=ask('Reply with a JSON object with a key "answer" whose value is the capital of France.'))
    assert obj.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_multi_turn_reuses_the_prefix(client):
    convo = ask("Tell me about cats.")
    first = client.chat.completions.create(model=MODEL, messages=convo, max_tokens=24, temperature=0)
    convo += [{"role": "assistant", "content": first.choices[0].message.content},
              {"role": "user", "content": "And dogs?"}]
    second = client.chat.completions.create(model=MODEL, messages=convo, max_tokens=8, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_n_choices_are_seeded_one_after_another(client):
    def make(n, seed):
        return client.chat.completions.create(model=MODEL, messages=ask("Say something."),
                                              max_tokens=6, temperature=1.0, seed=seed, n=n)
    r = make(3, 5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert 3 <= r.usage.completion_tokens <= 18
    texts = [c.message.content for c in r.choices]
    assert texts[1] == make(1, 6).choices[0].message.content  # choice i has seed + i
    assert [c.message.content for c in make(3, 5).choices] == texts


# -- batching -------------------------------------------------------------------------------

def test_sixteen_concurrent_streams_each_equal_the_request_served_alone(client):
    """Greedy replies (text and every token's logprob, bit for bit) are the same alone and
    among 16 concurrent streaming clients."""
    topics = ["cats", "dogs", "the sea", "rain", "bread", "music", "trains", "stars", "chess",
              "tea", "snow", "bees", "maps", "clocks", "paper", "glass"]

    def run(topic, stream):
        kw = dict(model=MODEL, messages=ask(f"Write one sentence about {topic}."), max_tokens=12,
                  temperature=0, logprobs=True)
        if not stream:
            c = client.chat.completions.create(**kw).choices[0]
            return c.message.content, [(t.token, t.logprob) for t in c.logprobs.content]
        text, lps = "", []
        for chunk in client.chat.completions.create(stream=True, **kw):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                lps += [(t.token, t.logprob) for t in (chunk.choices[0].logprobs or
                                                      openai.types.chat.chat_completion_chunk.ChoiceLogprobs()).content or []]
        return text, lps

    alone = [run(t, False) for t in topics]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda t: run(t, True), topics))
    assert together == alone
    assert all(len(lps) > 2 for _, lps in alone)


# -- errors ---------------------------------------------------------------------------------

def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=ask("hi"))
    assert e.value.code == "model_not_found" and e.value.body["param"] == "model"


@pytest.mark.parametrize("field,value", [("temperature", 5), ("max_tokens", 0), ("top_p", "x"),
                                         ("top_logprobs", 50), ("n", 0), ("presence_penalty", 9),
                                         ("seed", 2**70), ("stop", [1, 2])])
def test_invalid_parameters_are_400_naming_them(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ask("hi"), extra_body={field: value})
    assert e.value.status_code == 400 and e.value.body["param"] == field
    assert field in e.value.message


def test_a_bad_response_format_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ask("hi"),
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"type": "object", "not": {}}}})
    assert e.value.body["param"] == "response_format"


@pytest.mark.parametrize("schema", [
    {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},   # fails at its first mask
    {"type": "string", "pattern": "^(a{1000}){1000}$"},              # ... at its first token
])
@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_that_fails_at_its_first_token_is_400(client, schema, stream):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=4, stream=stream,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": schema}})
    assert e.value.body["param"] == "response_format"
    assert "first token" in e.value.message


def test_api_key(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=ask("hi"))
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    r = httpx.get(server.url + "/v1/models")  # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key


def test_context_length_exceeded(client, tokenizer):
    n = len(tokenizer.encode("hello " * 600))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hello " * 600, max_tokens=4)
    assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "prompt"
    assert f"context length is 512 tokens" in e.value.message
    assert f"{n} prompt tokens: {n - 511} too many" in e.value.message


def test_malformed_requests_leave_the_server_healthy(client, server):
    url = server.url + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bodies = [b"", b"{", b"[]", b"null", b"\xff\xfe\x00", b'{"model": 1}',
              b'{"model": "smollm2", "messages": "hi"}',
              b'{"model": "smollm2", "messages": []}',
              b'{"model": "smollm2", "messages": [{"role": "user"}], "max_tokens": 1e99}',
              b'{"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
              b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "stop": [1]}',
              b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "seed": "s"}',
              b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "response_format": 3}',
              b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"a": 1},'
              b' "tools": [{"type": "function"}]}',
              json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "x"}],
                          "response_format": {"type": "json_schema", "json_schema": {"schema": "no"}}}).encode()]
    with httpx.Client(timeout=30) as http:
        for _ in range(3):
            for body in bodies:
                r = http.post(url, content=body, headers=headers)
                assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"]
        r = http.post(server.url + "/v1/completions", headers=headers,
                      json={"model": MODEL, "prompt": [10**9], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert greedy_chat(client, "Hi", max_tokens=3).usage.completion_tokens >= 1


# -- a one-slot server: disconnects, a full queue, keep_alive -----------------------------------

@pytest.fixture(scope="module")
def one_slot(default_gguf):
    registry = registry_for(default_gguf, max_batch=1, max_queue=0, ctx=512, keep_alive_s=1.5)
    live = LiveServer(create_app(registry, reap_every_s=0.2))
    yield live, registry
    live.close()


def engine_stats(url):
    models = httpx.get(url + "/health").json()["models"]
    return models[0].get("engine")


def wait_until(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_disconnected_stream_frees_its_slot(one_slot):
    live, _ = one_slot
    body = {"model": MODEL, "messages": ask("Write a very long essay about the ocean."),
            "max_tokens": 500, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", live.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            assert engine_stats(live.url)["active"] == 1
        # the connection is closed: the slot is freed at once (no 400-token wait)
        t0 = time.time()
        assert wait_until(lambda: engine_stats(live.url)["active"] == 0, timeout=5)
        freed_s = time.time() - t0
        generated = engine_stats(live.url)["generated_tokens"]
        assert generated < 100 and freed_s < 5  # uncancelled, it would run to ~490 tokens
        r = http.post(live.url + "/v1/chat/completions",
                      json={"model": MODEL, "messages": ask("Hi"), "max_tokens": 3})
        assert r.status_code == 200


def test_a_full_queue_answers_503_with_retry_after(one_slot):
    live, _ = one_slot
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=ask("Write an essay."),
                                            max_tokens=300, temperature=0, stream=True)
    next(iter(stream))  # the one slot is busy now, and the queue holds nothing
    r = httpx.post(live.url + "/v1/chat/completions",
                   json={"model": MODEL, "messages": ask("Hi"), "max_tokens": 3})
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "queue_full"
    stream.close()
    assert wait_until(lambda: engine_stats(live.url)["active"] == 0)


def test_keep_alive_unloads_an_idle_model_and_reloads_on_demand(one_slot):
    live, registry = one_slot
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert MODEL in registry.loaded
    assert wait_until(lambda: MODEL not in registry.loaded, timeout=10)
    assert httpx.get(live.url + "/health").json()["models"][0]["loaded"] is False
    loads = registry.loads
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert r.usage.completion_tokens == 2 and registry.loads == loads + 1


def test_memory_budget_unloads_the_least_recently_used_idle_model(default_gguf):
    import asyncio

    from homellm.serve import APIError, GenerationSettings, start_chat
    size = default_gguf.stat().st_size
    config = ServeConfig(max_batch=1, ctx=256, prefix_cache_bytes=1 << 20,
                         memory_budget_bytes=int(1.5 * (size + (1 << 20))), keep_alive_s=-1)
    registry = ModelRegistry({"a": default_gguf, "b": default_gguf}, config)

    async def scenario():
        settings = GenerationSettings(max_tokens=2, temperature=0)
        s = await start_chat(registry, "a", ask("hi"), settings)
        await s.collect()
        assert list(registry.loaded) == ["a"] and s.result.completion_tokens == 2
        s = await start_chat(registry, "b", ask("hi"), settings)  # a is idle: it goes
        assert list(registry.loaded) == ["b"]
        with pytest.raises(APIError) as e:  # b is busy (s still open): no room for a
            await start_chat(registry, "a", ask("hi"), settings)
        assert e.value.status == 503 and e.value.code == "insufficient_memory"
        s.cancel()
    try:
        asyncio.run(scenario())
    finally:
        registry.close()


def test_penalties_match_a_reference_loop(client, tokenizer, default_gguf):
    """frequency_penalty and presence_penalty as OpenAI defines them (logit -= count *
    frequency + presence, over the text so far), checked against a plain loop of full
    forwards over the same network."""
    from homellm.engine.loader import build_model
    from homellm.model.formats import open_checkpoint
    prompt = tokenizer.encode("The cat sat on the mat. The cat sat on the")
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                  frequency_penalty=1.2, presence_penalty=0.6)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    net = build_model(open_checkpoint(default_gguf), device="cpu")
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(8):
            logits = net(torch.tensor([seq])).float()[0, -1]
            ids, counts = torch.tensor(seq).unique(return_counts=True)
            logits[ids] -= counts.float() * 1.2 + 0.6
            seq.append(int(logits.argmax()))
    assert r.choices[0].text == tokenizer.decode(seq[len(prompt):])
    assert r.choices[0].text != plain.choices[0].text  # the penalties changed the reply


def test_python_api_streams_reports_and_cancels(default_gguf):
    """serve/completion.py without HTTP (what the web app calls): deltas, the result with the
    seed it drew, and `async with` freeing the one slot when the reader stops early."""
    import asyncio

    from homellm.serve import GenerationSettings, start_chat
    registry = registry_for(default_gguf, max_batch=1, max_queue=0, ctx=256)

    async def scenario():
        s = await start_chat(registry, MODEL, ask("Hi"), GenerationSettings(max_tokens=5))
        text, tokens = await s.collect()
        r = s.result
        # the tokens decode to the text together (one token's own text can be part of a character)
        tokenizer = registry.loaded[MODEL].tokenizer
        assert r.completion_tokens == len(tokens) <= 5 and tokenizer.decode([t.token for t in tokens]) == text
        assert r.finish_reason in ("stop", "length") and 0 <= r.seed < 2**63
        again = await start_chat(registry, MODEL, ask("Hi"),
                                 GenerationSettings(max_tokens=5, seed=r.seed))
        assert (await again.collect())[0] == text  # the reported seed reproduces the reply
        async with await start_chat(registry, MODEL, ask("Write an essay."),
                                    GenerationSettings(max_tokens=200)) as long:
            async for _ in long:
                break
        engine = registry.loaded[MODEL].engine
        deadline = time.time() + 5
        while not engine.idle and time.time() < deadline:
            await asyncio.sleep(0.02)
        assert engine.idle and engine.stats()["generated_tokens"] < 100
        s = await start_chat(registry, MODEL, ask("Hi"), GenerationSettings(max_tokens=2))
        await s.collect()  # the slot was free: no 503
        assert registry.loaded[MODEL].in_use == 0
    try:
        asyncio.run(scenario())
    finally:
        registry.close()


def test_a_disconnected_non_streaming_request_is_cancelled(one_slot):
    live, _ = one_slot
    body = {"model": MODEL, "messages": ask("Write a very long essay about mountains."),
            "max_tokens": 500, "temperature": 0}
    httpx.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    before = engine_stats(live.url)["generated_tokens"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/chat/completions", json=body, timeout=1.0)  # gives up
    assert wait_until(lambda: engine_stats(live.url)["active"] == 0, timeout=5)
    assert engine_stats(live.url)["generated_tokens"] - before < 300  # not run to ~490 tokens


# -- logit_bias, echo, prompt lists, suffix, open schemas (issue 17) ----------------------------

def test_logit_bias_forces_and_bans_tokens(client, tokenizer):
    plain = greedy_chat(client, "Name a color.", max_tokens=6, logprobs=True)
    first = tokenizer.token_to_id(plain.choices[0].logprobs.content[0].token)
    banned = greedy_chat(client, "Name a color.", max_tokens=6, logprobs=True,
                         logit_bias={str(first): -100})
    assert first not in [tokenizer.token_to_id(t.token) for t in banned.choices[0].logprobs.content]
    banana = tokenizer.encode(" banana", add_special_tokens=False)[0]
    forced = client.chat.completions.create(model=MODEL, messages=ask("Name a color."), max_tokens=5,
                                            temperature=1.0, seed=3, logit_bias={str(banana): 100})
    assert forced.choices[0].message.content == tokenizer.decode([banana] * 5)
    for bias, needle in (({"49152": 5}, "outside"), ({"7": 100.5}, "-100 to 100"), ({"x": 1}, "token id")):
        r = httpx.post(client.base_url.join("chat/completions").__str__(), headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": MODEL, "messages": ask("hi"), "logit_bias": bias})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias" and needle in r.text


def test_echo_with_max_tokens_0_gives_the_prompts_teacher_forced_logprobs(client, tokenizer, default_gguf):
    from homellm.engine.loader import build_model
    from homellm.model.formats import open_checkpoint
    prompt = "The quick brown fox jumps over the lazy dog."
    r = client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=0, logprobs=3)
    choice = r.choices[0]
    ids = tokenizer.encode(prompt)
    assert choice.text == prompt and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in ids] and lp.token_logprobs[0] is None
    assert lp.text_offset == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
    net = build_model(open_checkpoint(default_gguf), device="cpu")
    with torch.inference_mode():
        logp = net(torch.tensor([ids])).float()[0].log_softmax(-1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(logp[i - 1, ids[i]]), abs=2e-3)
        top = sorted(lp.top_logprobs[i].items(), key=lambda kv: -kv[1])
        want = logp[i - 1].topk(3)
        assert [tokenizer.decode([int(t)]) for t in want.indices] == [k for k, _ in top]
    # echo with a completion: the prompt's tokens, then the reply's, one offset scale
    both = client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=4,
                                     temperature=0, logprobs=0)
    alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert both.choices[0].text == prompt + alone.choices[0].text
    assert both.choices[0].logprobs.token_logprobs[:len(ids)] == pytest.approx(lp.token_logprobs, abs=1e-6)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, echo=True, max_tokens=4, temperature=0, stream=True) if c.choices)
    assert streamed == both.choices[0].text


def test_a_list_of_prompts_gives_their_choices_in_order(client):
    prompts = ["One, two,", "Monday, Tuesday,"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, n=2)
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0)
               for p in prompts]
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [s.choices[0].text for s in singles for _ in range(2)]
    assert r.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert r.usage.completion_tokens == sum(c.usage.completion_tokens for c in singles) * 2


@pytest.mark.parametrize("body,param,code", [
    ({"prompt": "def f(", "suffix": "    return x"}, "suffix", "unsupported"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"prompt": ["a"] * 65}, "prompt", "invalid_value"),
])
def test_completion_requests_refused_with_the_field(server, body, param, code):
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": MODEL, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert r.json()["error"]["code"] == code


@pytest.mark.slow
def test_a_schema_without_additional_properties_false_ends_with_its_keys(client):
    """Before: 2 of these 3 seeds invented keys after name and age until max_tokens."""
    schema = {"type": "object", "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 20},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=ask("Describe a person as JSON."), max_tokens=100, temperature=0.8,
            seed=seed, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        value = json.loads(r.choices[0].message.content)
        jsonschema.validate(value, schema)
        assert set(value) == {"name", "age"}
        assert "\n\n" not in r.choices[0].message.content


def test_suffix_is_written_with_the_models_fim_tokens():
    from types import SimpleNamespace

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from homellm.serve.completion import fim_prompt_ids
    from homellm.serve.errors import APIError
    from homellm.tokenizer import Tokenizer
    hf = HFTokenizer(models.WordLevel({"[UNK]": 0, "def": 1, "f": 2, "return": 3, "x": 4}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = SimpleNamespace(id="plain", tokenizer=Tokenizer(hf, bos_id=None, eos_id=None))
    with pytest.raises(APIError) as e:
        fim_prompt_ids(plain, "def f", "return x")
    assert e.value.param == "suffix" and e.value.code == "unsupported"
    for names in (["<fim_prefix>", "<fim_suffix>", "<fim_middle>"],
                  ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]):
        hf = HFTokenizer(models.WordLevel({"[UNK]": 0, "def": 1, "f": 2, "return": 3, "x": 4}, unk_token="[UNK]"))
        hf.pre_tokenizer = pre_tokenizers.Whitespace()
        hf.add_special_tokens(names)
        tiny = SimpleNamespace(id="tiny", tokenizer=Tokenizer(hf, bos_id=None, eos_id=None))
        # prefix-suffix-middle: <PRE> prefix <SUF> suffix <MID>, the middle is generated next
        assert fim_prompt_ids(tiny, "def f", "return x") == [5, 1, 2, 6, 3, 4, 7]
