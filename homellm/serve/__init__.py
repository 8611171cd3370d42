"""HTTP: the OpenAI-compatible API over the batching engine; the web app (serve/web) shares it.

create_app (app.py), ModelRegistry and ServeConfig (registry.py), the Python API for
streaming a completion without HTTP (completion.py), OpenAI-style errors (errors.py), what
every request passes first (guard.py: Host check, CORS (cors.py), API key, body size) and the
uvicorn protocol with read timeouts (connections.py). The routes: openai_routes.py (chat,
completions, models, health), tools.py (tool calling: rendering, grammars, parsing),
responses.py (/v1/responses), embeddings.py (/v1/embeddings), ollama_routes.py (Ollama's
/api/*), metrics.py (/metrics).
"""
from homellm.serve.app import create_app
from homellm.serve.completion import (CompletionStream, Delta, GenerationSettings, Result,
                                      start_chat, start_completion)
from homellm.serve.errors import APIError
from homellm.serve.registry import ModelRegistry, ServeConfig

__all__ = ["APIError", "CompletionStream", "Delta", "GenerationSettings", "ModelRegistry",
           "Result", "ServeConfig", "create_app", "start_chat", "start_completion"]
