"""Embeddings: POST /v1/embeddings (OpenAI), and the function Ollama's /api/embed shares.

A chat model's embedding of a text is the mean over its tokens of the last hidden states (the
output of the final RMSNorm, before the LM head), L2-normalized, as llama.cpp's server does
with `--pooling mean`. They are computed by the served network (the C runtime's hidden
states, or the PyTorch network's) in a worker thread, one text at a time (no padding, so a
text's vector does not depend on the others in the batch).
`encoding_format` "base64" is the float32 little-endian bytes, base64-encoded (what the
official client decodes).
"""
from __future__ import annotations

import asyncio
import base64

import numpy as np
from fastapi import APIRouter, Request
from pydantic import Field

from homellm.serve.errors import APIError, invalid
from homellm.serve.schemas import _Body

MAX_INPUTS = 2048   # OpenAI's limit on inputs per request


class EmbeddingsRequest(_Body):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str | None = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


def hidden_states(network, ids: list[int]):
    """(T, hidden) float32: the final-norm outputs of `network` (the C runtime's NativeModel or
    a homellm Llama) for ids."""
    if hasattr(network, "hidden_states"):
        return network.hidden_states(ids)  # numpy
    import torch
    with torch.inference_mode():
        tokens = torch.tensor([ids], dtype=torch.long, device=network.inv_freq.device)
        return network(tokens, hidden=True)[0].float().cpu()


def token_ids(model, inputs, param: str, truncate: bool = False) -> list[list[int]]:
    """Each input as token ids: text encoded as the model does (BOS where it adds one), id
    lists checked against the vocabulary; longer than the context: a 400 (or cut, `truncate`)."""
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not inputs:
        raise invalid(param, "expected at least one input")
    if len(inputs) > MAX_INPUTS:
        raise invalid(param, f"at most {MAX_INPUTS} inputs per request, got {len(inputs)}")
    vocab = model.network.args.vocab_size
    out = []
    for i, item in enumerate(inputs):
        where = f"{param}[{i}]" if len(inputs) > 1 else param
        if isinstance(item, str):
            if not item:
                raise invalid(where, "an empty string has no embedding")
            from homellm.serve.completion import check_length
            if not truncate:
                check_length(model, item, where)
            ids = model.tokenizer.encode(item)
        else:
            ids = list(item)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad or not ids:
                raise invalid(where, f"token ids must be in [0, {vocab}), got {bad[:3] or 'none'}")
        if len(ids) > model.ctx:
            if not truncate:
                raise APIError(400, f"{where}: {len(ids)} tokens, more than this model's context "
                               f"of {model.ctx}", param=where, code="context_length_exceeded")
            ids = ids[:model.ctx]
        out.append(ids)
    return out


def mean_pooled(network, ids: list[int], normalize: bool = True) -> np.ndarray:
    vector = np.asarray(hidden_states(network, ids).mean(0), dtype=np.float32)
    if normalize:
        norm = float(np.linalg.norm(vector))
        vector = vector / norm if norm > 0 else vector
    return vector


async def embed(registry, model_name: str, inputs, param: str = "input", truncate: bool = False,
                normalize: bool = True) -> tuple[str, list[np.ndarray], int]:
    """(model id, one vector per input, prompt tokens) for a served model."""
    model = await registry.acquire(model_name)
    try:
        def work():
            ids = token_ids(model, inputs, param, truncate)
            return [mean_pooled(model.network, x, normalize) for x in ids], sum(map(len, ids))
        vectors, n = await asyncio.to_thread(work)
        return model.id, vectors, n
    finally:
        registry.release(model)


def embeddings_router(auth) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/embeddings", dependencies=auth)
    async def embeddings(body: EmbeddingsRequest, request: Request):
        if body.encoding_format not in (None, "float", "base64"):
            raise invalid("encoding_format", f"expected 'float' or 'base64', got {body.encoding_format!r}")
        mid, vectors, n = await embed(request.app.state.registry, body.model, body.input)
        if body.dimensions is not None and body.dimensions != len(vectors[0]):
            raise invalid("dimensions", f"this model's embeddings have {len(vectors[0])} "
                          f"dimensions; it cannot shorten them to {body.dimensions}", "unsupported")
        data = []
        for i, v in enumerate(vectors):
            value = (base64.b64encode(v.astype("<f4").tobytes()).decode()
                     if body.encoding_format == "base64" else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": mid,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    return router
