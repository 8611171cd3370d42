"""`homellm serve` as a subprocess: the startup line, a request through the official client,
and bad flags refused with `error: ...`."""
import os
import socket
import subprocess
import sys
import time

import openai
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_starts_says_where_and_answers(default_gguf, homellm_home):
    from homellm import catalog
    catalog.pull(str(default_gguf), name="mini:q4")  # a catalog model next to a path
    port = free_port()
    env = dict(os.environ, HOMELLM_HOME=str(homellm_home))
    proc = subprocess.Popen([sys.executable, "-m", "homellm", "serve", "-m", str(default_gguf),
                             "mini", "--port", str(port), "--ctx", "1024", "--api-key", "k",
                             "--max-batch", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert f"http://127.0.0.1:{port}/v1" in line
        assert "smollm2-135m-instruct.q4_1 (ctx 1024)" in line and "API key required" in line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        deadline = time.time() + 60
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.2)
        assert [m.id for m in models.data] == ["smollm2-135m-instruct.q4_1", "mini:q4"]
        r = client.chat.completions.create(model="smollm2-135m-instruct.q4_1", max_tokens=4,
                                           messages=[{"role": "user", "content": "Hi"}])
        assert r.usage.completion_tokens >= 1 and r.timings["predicted_n"] == r.usage.completion_tokens
        r = client.completions.create(model="mini", prompt="Hello", max_tokens=2)  # a family alias
        assert r.model == "mini:q4" and r.usage.completion_tokens == 2
    finally:
        proc.terminate()
        proc.wait(30)
    log = proc.stderr.read()
    assert "completion mini:q4: prompt 1 tokens (0 cached), first token" in log
    assert "chat smollm2-135m-instruct.q4_1: prompt " in log
    assert "reply 2 tokens at" in log and "tok/s, length" in log and "Traceback" not in log


@pytest.mark.parametrize("flags,message", [
    (["--port", "70000"], "--port 70000: expected at most 65535"),
    (["--max-batch", "0"], "--max-batch 0: expected at least 1"),
    (["--ctx", "1"], "--ctx 1: the context must hold at least 2 tokens"),
    (["--threads", "0"], "--threads 0: expected at least 1"),
    (["-m", "no-such-model"], "no model named 'no-such-model'"),
])
def test_bad_flags_are_refused(flags, message, homellm_home):
    env = dict(os.environ, HOMELLM_HOME=str(homellm_home))
    r = subprocess.run([sys.executable, "-m", "homellm", "serve", *flags], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and message in r.stderr
    assert "Traceback" not in r.stderr
