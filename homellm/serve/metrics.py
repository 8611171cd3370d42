"""GET /metrics: the server's counters in Prometheus' text format (version 0.0.4).

    homellm_requests_total{path,status}                 HTTP answers (the guard counts them)
    homellm_prompt_tokens_total{model}                  prompt tokens of finished generations
    homellm_completion_tokens_total{model}              generated tokens
    homellm_generations_total{model,finish_reason}
    homellm_time_to_first_token_seconds{model}          histogram: admission to first token
    homellm_time_per_output_token_seconds{model}        histogram: decode time / (tokens - 1)
    homellm_queue_depth{model}                          requests waiting for a slot (now)
    homellm_active_sequences{model}                     slots generating (now)
    homellm_kv_cache_usage_ratio{model}                 positions held by active slots / all
    homellm_model_loaded{model}                         1 when loaded

Generations report to `Metrics.observe` when they finish (serve/completion.py); the gauges
are read from the registry's engines when scraped. The route needs the API key like any other.
"""
from __future__ import annotations

import threading
from collections import defaultdict

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# paths counted under their own label; anything else (unknown routes, scanners) is "other"
KNOWN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings",
               "/v1/models", "/health", "/metrics", "/api/chat", "/api/generate", "/api/embed",
               "/api/embeddings", "/api/tags", "/api/show", "/api/ps", "/api/version", "/api/pull",
               "/api/delete")


def path_label(path: str) -> str:
    if path in KNOWN_PATHS:
        return path
    for prefix in ("/v1/responses/", "/v1/models/"):
        if path.startswith(prefix):
            return prefix + "{id}"
    if path.startswith("/api/"):
        return "/api/(web app)"
    return "other"


class Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float):
        for i, le in enumerate(self.buckets):
            if value <= le:
                self.counts[i] += 1
        self.sum += value
        self.count += 1


def _esc(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.completion_tokens: dict[str, int] = defaultdict(int)
        self.generations: dict[tuple[str, str], int] = defaultdict(int)
        self.ttft: dict[str, Histogram] = {}
        self.tpot: dict[str, Histogram] = {}

    def count_request(self, path: str, status: int):
        with self._lock:
            self.requests[(path_label(path), status)] += 1

    def observe(self, result):
        """A finished generation (serve/completion.py Result)."""
        with self._lock:
            m = result.model
            self.prompt_tokens[m] += result.prompt_tokens
            self.completion_tokens[m] += result.completion_tokens
            self.generations[(m, result.finish_reason)] += 1
            if result.completion_tokens:
                self.ttft.setdefault(m, Histogram(TTFT_BUCKETS)).observe(result.ttft_s)
            if result.completion_tokens > 1 and result.decode_s > 0:
                self.tpot.setdefault(m, Histogram(TPOT_BUCKETS)).observe(
                    result.decode_s / (result.completion_tokens - 1))

    def render(self, registry) -> str:
        lines: list[str] = []

        def family(name, kind, help_):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            family("homellm_requests_total", "counter", "HTTP requests answered, by path and status.")
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'homellm_requests_total{{path="{_esc(path)}",status="{status}"}} {n}')
            for name, table, help_ in (
                    ("homellm_prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished generations."),
                    ("homellm_completion_tokens_total", self.completion_tokens, "Generated tokens.")):
                family(name, "counter", help_)
                for model, n in sorted(table.items()):
                    lines.append(f'{name}{{model="{_esc(model)}"}} {n}')
            family("homellm_generations_total", "counter", "Finished generations, by finish reason.")
            for (model, reason), n in sorted(self.generations.items()):
                lines.append(f'homellm_generations_total{{model="{_esc(model)}",finish_reason="{reason}"}} {n}')
            for name, table, help_ in (
                    ("homellm_time_to_first_token_seconds", self.ttft,
                     "Time from a request's admission to its first token."),
                    ("homellm_time_per_output_token_seconds", self.tpot,
                     "Decode time per generated token after the first.")):
                family(name, "histogram", help_)
                for model, h in sorted(table.items()):
                    label = f'model="{_esc(model)}"'
                    for le, c in zip(h.buckets, h.counts):
                        lines.append(f'{name}_bucket{{{label},le="{le}"}} {c}')
                    lines.append(f'{name}_bucket{{{label},le="+Inf"}} {h.count}')
                    lines.append(f"{name}_sum{{{label}}} {h.sum:.6f}")
                    lines.append(f"{name}_count{{{label}}} {h.count}")
        gauges = {"homellm_queue_depth": ("Requests waiting for a slot.", {}),
                  "homellm_active_sequences": ("Sequences being generated.", {}),
                  "homellm_kv_cache_usage_ratio": ("KV cache positions held by active sequences, "
                                                   "of all slots' positions.", {}),
                  "homellm_model_loaded": ("1 when the model is loaded.", {})}
        for mid in registry.ids():
            m = registry.loaded.get(mid)
            gauges["homellm_model_loaded"][1][mid] = 1 if m is not None else 0
            if m is None:
                continue
            engine = m.engine
            active = list(engine.active)
            held = sum(len(engine.cache.tokens[s.slot]) for s in active)
            gauges["homellm_queue_depth"][1][mid] = len(engine.waiting)
            gauges["homellm_active_sequences"][1][mid] = len(active)
            gauges["homellm_kv_cache_usage_ratio"][1][mid] = round(
                held / (engine.config.max_batch * engine.config.ctx), 6)
        for name, (help_, values) in gauges.items():
            family(name, "gauge", help_)
            for model, v in sorted(values.items()):
                lines.append(f'{name}{{model="{_esc(model)}"}} {v}')
        return "\n".join(lines) + "\n"


def metrics_router(auth) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics", dependencies=auth)
    async def metrics(request: Request):
        registry = request.app.state.registry
        text = registry.metrics.render(registry)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return router
