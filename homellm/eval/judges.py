"""The judge behind `homellm eval judge`: a model homellm runs, or an OpenAI-compatible endpoint;
its replies kept under $HOMELLM_HOME/evals/judgments/ so a stopped run resumes.

    judge = open_judge("http://127.0.0.1:8080/v1", model="judge")   # or a catalog model name
    replies = run_judgments(judge, prompts, JudgmentCache(judge.id), max_tokens=1024)

A local judge is loaded on first use (homellm.load) and answers greedily. An endpoint is asked
at `{url}/chat/completions` with temperature 0, through the `openai` client when installed,
else httpx. A judge that cannot be reached, or answers with an HTTP error other than 400,
stops the run (JudgeUnavailable); a prompt it refuses (HTTP 400, or too long for a local
judge's context) is one failed judgment, reported with the others.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence
from urllib.parse import urlsplit

from homellm.errors import HomellmError
from homellm.eval.answers import JsonlCache

if TYPE_CHECKING:
    from homellm.eval.models import ModelRef

ENDPOINT_TIMEOUT_S = 600.0  # one judgment of a big local model on a CPU can take minutes


# -- judges ------------------------------------------------------------------------------

class JudgeUnavailable(HomellmError):
    """The judge cannot be reached or refuses every request: the run stops, resumable."""


class JudgmentError(Exception):
    """One judgment failed (its prompt is too long for the judge): counted as an error."""


class ModelJudge:
    """A model homellm runs, loaded on first use; greedy replies."""

    def __init__(self, ref: "ModelRef", ctx: int | None = None, progress=None):
        from homellm.eval.models import model_hash
        self.ref = ref
        self.ctx = ctx
        self.progress = progress
        self.id = "model:" + model_hash(ref)  # (resolves the name: an unknown one fails here)
        self.describe = ref.label
        self.model = None
        self.parallel_ok = False

    def complete(self, messages: list[dict], max_tokens: int) -> str:
        from homellm.errors import ContextOverflowError
        if self.model is None:
            from homellm.eval.models import open_model
            self.model = open_model(self.ref, ctx=self.ctx, progress=self.progress)
        try:
            return "".join(s.text for s in self.model.chat(messages, max_tokens=max_tokens,
                                                           temperature=0.0))
        except ContextOverflowError as e:
            raise JudgmentError(f"the judge prompt does not fit: {e}") from None

    def close(self):
        self.model = None


class EndpointJudge:
    """An OpenAI-compatible server: POST {base_url}/chat/completions, temperature 0."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.model_name = model
        self.parallel_ok = True
        self._client = None
        self._http = None

    @property
    def id(self) -> str:
        return f"endpoint:{self.base_url}|{self.model_name}"

    @property
    def describe(self) -> str:
        return f"{self.model_name} at {self.base_url}"

    def _unreachable(self, e: Exception) -> JudgeUnavailable:
        return JudgeUnavailable(f"the judge at {self.base_url} is unreachable ({_reason(e)})")

    def _refused(self, status: int, body: str) -> JudgeUnavailable:
        return JudgeUnavailable(f"the judge at {self.base_url} answered HTTP {status}: "
                                f"{body.strip()[:300] or '(no body)'}")

    def connect(self) -> None:
        """Make the client; without --judge-model, take the one model the server lists."""
        try:
            import openai
            self._client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key,
                                         timeout=ENDPOINT_TIMEOUT_S, max_retries=1)
        except ImportError:
            try:
                import httpx
            except ImportError:
                raise HomellmError("a judge at a URL needs the `openai` or the `httpx` package: "
                                   "pip install openai") from None
            self._http = httpx.Client(base_url=self.base_url, timeout=ENDPOINT_TIMEOUT_S,
                                      headers={"Authorization": f"Bearer {self.api_key}"})
        if self.model_name is None:
            names = self._list_models()
            if not names:
                raise JudgeUnavailable(f"the judge at {self.base_url} lists no models; "
                                       f"name one with --judge-model")
            if len(names) > 1:
                raise HomellmError(f"the judge at {self.base_url} serves {len(names)} models "
                                   f"({', '.join(names[:8])}): choose one with --judge-model")
            self.model_name = names[0]

    def _list_models(self) -> list[str]:
        if self._client is not None:
            import openai
            try:
                return [m.id for m in self._client.models.list()]
            except openai.APIConnectionError as e:
                raise self._unreachable(e) from None
            except openai.APIStatusError as e:
                raise self._refused(e.status_code, e.response.text) from None
        import httpx
        try:
            r = self._http.get("/models")
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        if r.status_code != 200:
            raise self._refused(r.status_code, r.text)
        try:
            return [m["id"] for m in r.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise JudgeUnavailable(f"the judge at {self.base_url}: GET /models is not an "
                                   f"OpenAI model list: {r.text[:200]}") from None

    def complete(self, messages: list[dict], max_tokens: int) -> str:
        if self._client is None and self._http is None:
            self.connect()
        if self._client is not None:
            import openai
            try:
                out = self._client.chat.completions.create(
                    model=self.model_name, messages=messages, max_tokens=max_tokens, temperature=0)
            except openai.APIConnectionError as e:
                raise self._unreachable(e) from None
            except openai.BadRequestError as e:  # this prompt (too long, ...): one error
                raise JudgmentError(f"the judge refused the prompt: HTTP 400 "
                                    f"{e.response.text[:300]}") from None
            except openai.APIStatusError as e:
                raise self._refused(e.status_code, e.response.text) from None
            content = out.choices[0].message.content if out.choices else None
        else:
            import httpx
            try:
                r = self._http.post("/chat/completions", json={
                    "model": self.model_name, "messages": messages, "max_tokens": max_tokens,
                    "temperature": 0})
            except httpx.HTTPError as e:
                raise self._unreachable(e) from None
            if r.status_code == 400:
                raise JudgmentError(f"the judge refused the prompt: HTTP 400 {r.text[:300]}")
            if r.status_code != 200:
                raise self._refused(r.status_code, r.text)
            try:
                content = r.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                content = None
        if not isinstance(content, str):
            raise JudgmentError("the judge's response has no message content")
        return content

    def close(self):
        if self._http is not None:
            self._http.close()


def _reason(e: Exception) -> str:
    """The root cause of a connection error ("[Errno 111] Connection refused")."""
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    return str(cause) or str(e) or type(cause).__name__


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def open_judge(spec: str, *, model: str | None = None, api_key: str | None = None,
               ctx: int | None = None, progress=None):
    """A judge from --judge: an http(s) URL of an OpenAI-compatible API (a bare host:port gets
    /v1), else a model as `homellm run -m` takes it (an unknown one fails here)."""
    if is_url(spec):
        parts = urlsplit(spec)
        if not parts.hostname:
            raise HomellmError(f"--judge {spec}: expected http://HOST:PORT/v1")
        if parts.path in ("", "/"):
            spec = spec.rstrip("/") + "/v1"
        return EndpointJudge(spec, model, api_key)
    if model is not None or api_key is not None:
        raise HomellmError("--judge-model and --judge-key are for a judge at a URL; "
                           f"--judge {spec} is a local model")
    from homellm.eval.models import parse_model
    return ModelJudge(parse_model(spec), ctx=ctx, progress=progress)


# -- running judgments, kept ----------------------------------------------------------------

def judgments_dir() -> Path:
    from homellm.eval.results import evals_dir
    return evals_dir() / "judgments"


class JudgmentCache(JsonlCache):
    """A judge's kept replies: `judgments/<hash of the judge>.jsonl`, keyed by the exact prompt."""

    def __init__(self, judge_id: str, folder: Path | None = None):
        self.judge_id = judge_id
        name = hashlib.sha256(judge_id.encode()).hexdigest()[:16]
        super().__init__((folder or judgments_dir()) / f"{name}.jsonl")

    def key(self, messages: list[dict], max_tokens: int) -> str:
        blob = json.dumps({"judge": self.judge_id, "messages": messages, "max_tokens": max_tokens,
                           "temperature": 0}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class Reply:
    text: str | None  # None: the judgment failed (error says why)
    error: str = ""
    cached: bool = False
    seconds: float = 0.0


def run_judgments(judge, prompts: Sequence[list[dict]], cache: JudgmentCache, max_tokens: int,
                  parallel: int = 1, on_done: Callable[[Reply], None] | None = None) -> list[Reply]:
    """The judge's reply to each prompt: kept ones from the cache, the others asked (each kept
    as soon as it comes). JudgeUnavailable stops the run; what was judged stays kept."""
    replies: list[Reply | None] = [None] * len(prompts)
    todo = []
    for i, messages in enumerate(prompts):
        kept = cache.get(cache.key(messages, max_tokens))
        if kept is not None and isinstance(kept.get("reply"), str):
            replies[i] = Reply(kept["reply"], cached=True)
            if on_done:
                on_done(replies[i])
        else:
            todo.append(i)

    def ask(i: int) -> Reply:
        t0 = time.perf_counter()
        try:
            text = judge.complete(prompts[i], max_tokens)
        except JudgmentError as e:
            return Reply(None, error=str(e), seconds=time.perf_counter() - t0)
        reply = Reply(text, seconds=time.perf_counter() - t0)
        cache.add({"key": cache.key(prompts[i], max_tokens), "judge": cache.judge_id,
                   "reply": text, "seconds": round(reply.seconds, 4)})
        return reply

    workers = max(1, parallel) if getattr(judge, "parallel_ok", False) else 1
    if workers == 1:
        for i in todo:
            replies[i] = ask(i)
            if on_done:
                on_done(replies[i])
    elif todo:
        if isinstance(judge, EndpointJudge) and judge._client is None and judge._http is None:
            judge.connect()  # once, before the threads share the client
        with ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(ask, i): i for i in todo}
            try:
                for future in futures:
                    replies[futures[future]] = future.result()
                    if on_done:
                        on_done(replies[futures[future]])
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    return replies  # type: ignore[return-value]
