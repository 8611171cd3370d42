"""/v1/embeddings and Ollama's /api/embed (serve/embeddings.py) on a live server with the
default model: the vectors equal a reference mean-pool of the PyTorch model's final hidden
states (taken with a forward hook on its final norm during a plain forward), equal texts give
equal vectors and different texts different ones, base64 == float, a batch == its items one by
one, token ids == their text, and bad input is a 400 naming the field."""
from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import torch

from homellm.serve import create_app
from test_serve import MODEL, LiveServer, registry_for


@pytest.fixture(scope="module")
def server(default_gguf):
    live = LiveServer(create_app(registry_for(default_gguf, max_batch=2, ctx=512)))
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(default_gguf):
    """text -> the mean over its tokens of the final norm's output, L2-normalized."""
    from homellm.engine.loader import build_model
    from homellm.model.formats import open_checkpoint
    from homellm.tokenizer import Tokenizer
    ckpt = open_checkpoint(default_gguf)
    tokenizer = Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)
    net = build_model(ckpt, device="cpu")
    seen = []
    net.model.norm.register_forward_hook(lambda module, args, out: seen.append(out))

    def embed(text: str, normalize: bool = True) -> np.ndarray:
        seen.clear()
        with torch.inference_mode():
            net(torch.tensor([tokenizer.encode(text)]))
        v = seen[0][0].float().mean(0).numpy()
        return v / np.linalg.norm(v) if normalize else v
    embed.tokenizer = tokenizer
    return embed


TEXTS = ["The cat sat on the mat.", "Quantum chromodynamics describes the strong force.",
         "The cat sat on the mat."]


def test_vectors_equal_the_reference_mean_pool(client, reference):
    r = client.embeddings.create(model=MODEL, input=TEXTS)
    vectors = [np.array(d.embedding) for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and len(vectors[0]) == 576
    assert r.usage.prompt_tokens == sum(len(reference.tokenizer.encode(t)) for t in TEXTS)
    for text, v in zip(TEXTS, vectors):
        np.testing.assert_allclose(v, reference(text), atol=2e-4)
        assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
    assert np.array_equal(vectors[0], vectors[2])
    assert np.abs(vectors[0] - vectors[1]).max() > 0.05
    # a batch is its items one by one; token ids are their text
    alone = client.embeddings.create(model=MODEL, input=TEXTS[1]).data[0].embedding
    assert alone == r.data[1].embedding
    ids = reference.tokenizer.encode(TEXTS[1])
    assert client.embeddings.create(model=MODEL, input=[ids]).data[0].embedding == alone


def test_base64_is_the_float_vector(server, client):
    floats = client.embeddings.create(model=MODEL, input="hello", encoding_format="float").data[0].embedding
    raw = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": "hello",
                                                          "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, np.array(floats, dtype=np.float32))


def test_ollama_embed_and_embeddings(server, client, reference):
    import ollama
    c = ollama.Client(host=server.url)
    r = c.embed(model=MODEL, input=["hello", "world"])
    openai_vectors = client.embeddings.create(model=MODEL, input=["hello", "world"]).data
    assert r.embeddings == [d.embedding for d in openai_vectors]
    assert r.prompt_eval_count == client.embeddings.create(model=MODEL, input=["hello", "world"]).usage.prompt_tokens
    legacy = np.array(c.embeddings(model=MODEL, prompt="hello").embedding)
    np.testing.assert_allclose(legacy, reference("hello", normalize=False), rtol=1e-4, atol=5e-4)


@pytest.mark.parametrize("body,param", [
    ({"input": ""}, "input"),
    ({"input": ["a", ""]}, "input[1]"),
    ({"input": [[1, 2, 99999999]]}, "input"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "dimensions": 64}, "dimensions"),
])
def test_bad_input_is_a_400_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_text_longer_than_the_context(server):
    long = "word " * 2000
    r = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": long}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # Ollama's truncate (default true) cuts it to the context instead
    r = httpx.post(server.url + "/api/embed", json={"model": MODEL, "input": long}, timeout=120)
    assert r.status_code == 200 and r.json()["prompt_eval_count"] == 512
    r = httpx.post(server.url + "/api/embed", json={"model": MODEL, "input": long, "truncate": False})
    assert r.status_code == 400 and "error" in r.json()
