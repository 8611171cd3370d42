"""run, chat and bench as a user runs them: `python -m homellm ...` in a subprocess.

Every command runs the real default model (SmolLM2-135M-Instruct Q4_1) given by path with
-m, so nothing is pulled; $HOMELLM_HOME is an empty folder. Token counts are checked against
the model's own tokenizer and chat template, loaded here. Loading the model costs a few
seconds a process, so each test makes one process answer several questions. Error paths
print `error: ...` on stderr, exit 1 and never show a traceback.
"""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from homellm.cli import options

QUESTION = "What is the capital of France?"
# the speed line run and chat print on stderr after a reply
SPEED = re.compile(r"prompt (\d+) tokens(?:, (\d+) cached)? at [\d.]+ tok/s"
                   r" \| reply (\d+) tokens at [\d.]+ tok/s")
JSON_KEYS = {"model", "text", "finish_reason", "load_s", "prompt_tokens", "cached_tokens",
             "prefill_s", "prefill_tps", "generated_tokens", "decode_s", "decode_tps"}


def homellm(*args: str, home: Path, stdin: str | None = "", check_rc: int | None = 0,
            timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOMELLM_HOME": str(home)}
    env.pop("HOMELLM_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "homellm", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc


def expect_error(proc: subprocess.CompletedProcess, *fragments: str):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    assert "unexpected" not in proc.stderr, proc.stderr  # bad input, not a bug
    for f in fragments:
        assert f in proc.stderr, proc.stderr


def speed_lines(stderr: str) -> list[tuple[int, int, int]]:
    """(prompt tokens, cached tokens, reply tokens) of each speed line."""
    return [(int(m[1]), int(m[2] or 0), int(m[3])) for m in SPEED.finditer(stderr)]


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    from homellm.model.formats import open_checkpoint
    from homellm.tokenizer import Tokenizer
    ckpt = open_checkpoint(default_gguf)
    return Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)


def n_chat(tokenizer, *messages: tuple[str, str]) -> int:
    """Prompt length of a conversation [(role, content), ...] under the chat template."""
    return len(tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                             add_generation_prompt=True))


# --- run ---------------------------------------------------------------------------------

def test_run_streams_the_reply_and_a_speed_line(homellm_home, default_gguf, tokenizer):
    proc = homellm("run", "-m", str(default_gguf), "--temperature", "0", "--max-tokens", "16",
                   QUESTION, home=homellm_home)
    assert "Paris" in proc.stdout
    assert proc.stdout.endswith("\n")
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"load [\d.]+ s \| ", last), proc.stderr
    [(prompt, cached, reply)] = speed_lines(last)
    assert prompt == n_chat(tokenizer, ("user", QUESTION)) and cached == 0
    assert 1 <= reply <= 16
    assert "loading" not in proc.stdout and "tok/s" not in proc.stdout


def test_run_json_system_and_stop(homellm_home, default_gguf, tokenizer):
    """--json prints one object; --system goes into the prompt; --stop cuts the text."""
    system = "Answer in one sentence."
    proc = homellm("run", "-m", str(default_gguf), "--json", "--temperature", "0",
                   "--max-tokens", "16", "--system", system, "--stop", "Paris", QUESTION,
                   home=homellm_home)
    assert proc.stdout.count("\n") == 1  # one JSON object, nothing else (no progress bar)
    out = json.loads(proc.stdout)
    assert JSON_KEYS <= set(out)
    assert out["prompt_tokens"] == n_chat(tokenizer, ("system", system), ("user", QUESTION))
    assert out["prompt_tokens"] != n_chat(tokenizer, ("user", QUESTION))
    # the greedy reply is "The capital of France is Paris."; the stop string ends it early
    assert out["finish_reason"] == "stop" and "Paris" not in out["text"]
    assert "France" in out["text"] and out["generated_tokens"] < 16
    assert out["cached_tokens"] == 0
    for key in ["prefill_tps", "decode_tps", "load_s", "prefill_s", "decode_s"]:
        assert out[key] > 0, key
    assert out["generated_tokens"] >= 2


def test_run_raw_prompt_from_stdin_with_a_seed(homellm_home, default_gguf, tokenizer):
    """The same seed gives the same sampled text; --raw continues the prompt with no template."""
    prompt = "Once upon a time"
    args = ["run", "-m", str(default_gguf), "--raw", "--json", "--seed", "5", "--temperature", "1",
            "--max-tokens", "12"]
    first, second = (json.loads(homellm(*args, home=homellm_home, stdin=prompt + "\n").stdout)
                     for _ in range(2))
    assert first["text"] and first["text"] == second["text"]
    assert first["generated_tokens"] == second["generated_tokens"] >= 1
    # raw: exactly the prompt's own tokens (the newline `echo` adds is dropped)
    assert first["prompt_tokens"] == len(tokenizer.encode(prompt))


# --- chat --------------------------------------------------------------------------------

def test_chat_through_a_pipe(homellm_home, default_gguf, tokenizer):
    """Two turns share the KV cache; the commands answer; EOF ends the session."""
    system = "You are a terse assistant."
    script = ["/set temperature 0", "/set", QUESTION, "And of Germany?", "/set top_p 0",
              "/set max_tokens 0", "/set nothing 1", "/help", "/frobnicate",
              f"/system {system}", "Hi", "/reset", "Hi", ""]
    proc = homellm("chat", "-m", str(default_gguf), "--max-tokens", "12",
                   home=homellm_home, stdin="\n".join(script))
    out = proc.stdout
    assert "temperature = 0.0" in out
    assert set(out.splitlines()[1].split(", ")) == {"temperature=0.0", "max_tokens=12"}  # /set
    assert "Paris" in out and "Berlin" in out  # the second turn saw the first
    assert "invalid value for top_p" in out and "invalid value for max_tokens" in out
    assert "unknown setting 'nothing'" in out
    assert "commands:" in out and "/reset" in out and "/system" in out
    assert "unknown command /frobnicate" in out
    assert "(system prompt set; conversation cleared)" in out and "(conversation cleared)" in out
    assert out.index("Paris") < out.index("Berlin") < out.index("(system prompt set")

    turns = speed_lines(proc.stderr)
    assert len(turns) == 4, proc.stderr
    (p1, c1, g1), (p2, c2, _), (p3, c3, _), (p4, c4, _) = turns
    assert p1 == n_chat(tokenizer, ("user", QUESTION)) and c1 == 0
    assert p2 > p1 + g1
    # prefix reuse: the first turn (its prompt and its reply) is not prefilled again
    assert p1 + g1 - 1 <= c2 <= p1 + g1, proc.stderr
    # /system starts over with the new system prompt; /reset keeps it
    assert p3 == p4 == n_chat(tokenizer, ("system", system), ("user", "Hi"))
    assert c3 < p3 and c4 > c3  # after /reset, the system prompt is still cached


class Terminal:
    """A process on a pseudo-terminal: type into it and read what it shows."""

    def __init__(self, argv: list[str], env: dict):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
            # the pty becomes the controlling terminal, so ^C sends SIGINT as in a real one
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.screen = ""

    def type(self, text: str):
        os.write(self.master, text.encode())

    def wait_for(self, pattern: str, start: int = 0, timeout: float = 120) -> re.Match:
        """Read until `pattern` shows up in the output after offset `start`."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.screen, start)
            if m:
                return m
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} within {timeout} s; the screen:\n{self.screen}"
            if select.select([self.master], [], [], min(left, 1.0))[0]:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: the process closed the terminal
                    data = b""
                assert data or self.proc.poll() is None, f"exited; the screen:\n{self.screen}"
                self.screen += data.decode(errors="replace").replace("\r", "")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def test_chat_ctrl_c_stops_the_reply_not_the_session(homellm_home, default_gguf):
    env = {**os.environ, "HOMELLM_HOME": str(homellm_home)}
    env.pop("HOMELLM_DEBUG", None)
    term = Terminal([sys.executable, "-m", "homellm", "chat", "-m", str(default_gguf),
                     "--max-tokens", "400", "--temperature", "0"], env)
    try:
        at = term.wait_for(r">>> ").end()
        term.type("Write a very long story about a dragon who learns to fly.\n")
        at = term.wait_for(r"learns to fly\.\n", at).end()  # the terminal's echo
        term.wait_for(r"\w+ \w+ \w+ \w+", at)  # the reply is streaming
        term.type("\x03")
        at = term.wait_for(r"\(stopped\)\n", at, timeout=30).end()
        at = term.wait_for(r">>> ", at).end()
        assert term.proc.poll() is None
        assert "Traceback" not in term.screen and "interrupted" not in term.screen

        term.type(QUESTION + "\n")
        m = term.wait_for(SPEED.pattern, at)
        assert "Paris" in term.screen[at:m.start()]
        assert m[2] is not None and int(m[2]) > 0  # the stopped reply's cache is reused
        term.wait_for(r">>> ", m.end())
        assert term.proc.poll() is None
        term.type("/bye\n")
        assert term.proc.wait(timeout=30) == 0
        assert "Traceback" not in term.screen
    finally:
        term.close()


# --- bench -------------------------------------------------------------------------------

def test_bench_json_and_text(homellm_home, default_gguf):
    args = ["bench", "-m", str(default_gguf), "--prompt-tokens", "32", "--gen-tokens", "8"]
    out = json.loads(homellm(*args, "--json", home=homellm_home).stdout)
    assert out["prompt_tokens"] == 32 and out["gen_tokens"] == 8  # EOS is ignored
    for key in ["prefill_tps", "decode_tps", "load_s", "weight_gbps", "weight_bytes_per_token"]:
        assert out[key] > 0, key
    # a decode step reads about every weight once (the tied embedding as the output head)
    size = default_gguf.stat().st_size
    assert 0.5 * size < out["weight_bytes_per_token"] < 1.5 * size
    assert out["weight_gbps"] == pytest.approx(
        out["weight_bytes_per_token"] * out["decode_tps"] / 1e9, abs=0.011)
    assert out["peak_rss_mb"] > out["weight_bytes_per_token"] / 2**20 / 2
    assert out["device"] == "cpu" and out["threads"] >= 1

    text = homellm(*args, home=homellm_home).stdout
    for pattern in [r"^model +\S+ on cpu \(native runtime\), \d+ threads$", r"^load +[\d.]+ s$",
                    r"^prefill +[\d.]+ tok/s \(32 tokens\)$",
                    r"^decode +[\d.]+ tok/s \(8 tokens\), [\d.]+ GB/s of weights$",
                    r"^peak RSS +\d+ MB$"]:
        assert re.search(pattern, text, re.M), (pattern, text)


# --- errors ------------------------------------------------------------------------------

def test_errors_model_files(homellm_home, default_gguf, tmp_path):
    expect_error(homellm("run", "-m", "/nonexistent.gguf", "hi", home=homellm_home, check_rc=None),
                 "/nonexistent.gguf")

    corrupt = tmp_path / "x.gguf"
    corrupt.write_bytes(os.urandom(100_000))
    expect_error(homellm("run", "-m", str(corrupt), "hi", home=homellm_home, check_rc=None),
                 str(corrupt), "GGUF")

    truncated = tmp_path / "truncated.gguf"
    with open(default_gguf, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    expect_error(homellm("run", "-m", str(truncated), "hi", home=homellm_home, check_rc=None),
                 str(truncated), "truncated")


def test_error_prompt_longer_than_the_context(homellm_home, default_gguf, tokenizer):
    prompt = "word " * 50
    n = n_chat(tokenizer, ("user", prompt))
    proc = homellm("run", "-m", str(default_gguf), "--ctx", "16", prompt, home=homellm_home,
                   check_rc=None)
    expect_error(proc, f"the prompt is {n} tokens", f"{n - 15} tokens too many", "--ctx")
    assert proc.stdout == ""


@pytest.mark.parametrize("args, stdin, fragments", [
    (["run", "--top-p", "0", "hi"], "", ["top_p", "(0, 1]"]),
    (["run", "--temperature", "-1", "hi"], "", ["temperature", ">= 0"]),
    (["run", "--max-tokens", "0", "hi"], "", ["--max-tokens 0"]),
    (["run", "--raw", "--system", "be brief", "hi"], "", ["--system", "--raw"]),
    (["run"], " \n\n", ["the prompt is empty"]),
    (["bench", "--ctx", "10", "--prompt-tokens", "32"], "", ["--ctx 10", "--prompt-tokens"]),
    (["bench", "--repeat", "0"], "", ["--repeat"]),
    (["chat", "--min-p", "2"], "", ["min_p"]),
], ids=["top-p", "temperature", "max-tokens", "raw-system", "empty-stdin", "bench-ctx",
        "bench-repeat", "chat-min-p"])
def test_errors_bad_options(homellm_home, default_gguf, args, stdin, fragments):
    """Bad options are refused with a message that names the option."""
    proc = homellm(args[0], "-m", str(default_gguf), *args[1:], home=homellm_home, stdin=stdin,
                   check_rc=None)
    expect_error(proc, *fragments)
    assert proc.stdout == ""


# --- flags -------------------------------------------------------------------------------

def test_sampling_flags_match_sampling_params():
    """Every SamplingParams field is a flag of run and chat, with the field's type."""
    from dataclasses import fields

    from homellm.api import SAMPLING_FIELDS
    from homellm.cli.main import build_parser
    from homellm.engine.sampling import SamplingParams

    assert options.check_flags_match_params()
    assert set(options.SAMPLING_FLAGS) == SAMPLING_FIELDS
    for f in fields(SamplingParams):
        kind = options.SAMPLING_FLAGS[f.name][0]
        if f.default is not None:
            assert type(f.default) is kind, f.name
    parser = build_parser()
    for command in ["run", "chat"]:
        argv = [command]
        for name, (kind, _) in options.SAMPLING_FLAGS.items():
            argv += ["--" + name.replace("_", "-"), "1"]
        args = parser.parse_args(argv)
        for name, (kind, _) in options.SAMPLING_FLAGS.items():
            value = getattr(args, name)
            assert type(value) is kind and value == 1, (command, name)
        assert options.sampling_options(args) == {name: 1 for name in options.SAMPLING_FLAGS}


def test_speed_line_rates_only_what_was_timed():
    """The first reply token comes out of the prefill: a one-token reply gets no decode rate
    (not a 0.0 tok/s), and the rate counts the tokens after the first over the decode time."""
    from homellm.engine.generate import Timings
    one = options.speed_line(Timings(prompt_tokens=31, prefill_s=0.02, generated_tokens=1), load_s=0.3)
    assert one == "load 0.30 s | prompt 31 tokens at 1550.0 tok/s | reply 1 token (from the prefill)"
    many = options.speed_line(Timings(prompt_tokens=31, cached_tokens=11, prefill_s=0.01,
                                      generated_tokens=11, decode_s=0.5))
    assert SPEED.fullmatch(many) and many.endswith("reply 11 tokens at 20.0 tok/s")
    assert "cached" in many and "at 2000.0 tok/s" in many


# --- hostile options and environments --------------------------------------------------------

@pytest.mark.parametrize("args, fragments", [
    (["--device", "tpu"], ["device 'tpu'", "'cpu'"]),
    (["--device", "cuda:99"], ["device 'cuda:99'"]),
    (["--ctx", "1000000000"], ["--ctx 1000000000", "KV cache", "GiB"]),
    (["--ctx", "2147483648"], ["--ctx 2147483648", "KV cache"]),
], ids=["device-tpu", "device-cuda99", "ctx-1e9", "ctx-2e31"])
def test_errors_bad_devices_and_contexts(homellm_home, default_gguf, args, fragments):
    """Used to be raw torch errors (RuntimeError, AssertionError: Torch not compiled with
    CUDA) and a MemoryError for a 358 GiB KV cache."""
    proc = homellm("run", "-m", str(default_gguf), *args, "hi", home=homellm_home, check_rc=None)
    expect_error(proc, *fragments)


def test_error_cuda_without_cuda(homellm_home, default_gguf):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = homellm("run", "-m", str(default_gguf), "--device", "cuda", "hi", home=homellm_home,
                   check_rc=None)
    expect_error(proc, "device 'cuda'", "use 'cpu'")


def test_error_unwritable_home(tmp_path):
    """HOMELLM_HOME under /proc (or any folder that cannot be made): a clear error, not a
    FileNotFoundError from deep inside the catalog."""
    proc = homellm("run", "hi", home=Path("/proc/homellm-nope"), check_rc=None)
    expect_error(proc, "HOMELLM_HOME", "/proc/homellm-nope")


def test_error_prompt_that_is_not_utf8(homellm_home, default_gguf):
    """Bytes that are not UTF-8 in argv reach Python as lone surrogates (they used to be an
    unexpected TypeError in the tokenizer); on stdin they were a UnicodeDecodeError."""
    env = {**os.environ, "HOMELLM_HOME": str(homellm_home)}
    proc = subprocess.run([sys.executable.encode(), b"-m", b"homellm", b"run", b"-m",
                           os.fsencode(default_gguf), b"caf\xe9 \xff"], env=env,
                          capture_output=True, timeout=300)
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                       proc.stderr.decode())
    expect_error(proc, "not valid UTF-8", "byte 0xe9 at byte 3")
    proc = subprocess.run([sys.executable, "-m", "homellm", "run", "-m", str(default_gguf)],
                          env=env, input=b"ok \xff\xfe", capture_output=True, timeout=300)
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                       proc.stderr.decode())
    expect_error(proc, "standard input is not valid UTF-8", "byte 0xff at byte 3")


@pytest.mark.slow
def test_negative_seed_on_the_command_line(homellm_home, default_gguf):
    """--seed -1 used to be 'unexpected ValueError: expected non-negative integer'. Any integer
    is a seed, taken modulo 2**64: -1 and 2**64 - 1 are the same run, and a run repeats."""
    def text(seed):
        proc = homellm("run", "-m", str(default_gguf), "--seed", str(seed), "--temperature", "1.5",
                       "--top-k", "0", "--top-p", "1", "--min-p", "0", "--max-tokens", "12",
                       "--json", QUESTION, home=homellm_home)
        return json.loads(proc.stdout)["text"]

    first = text(-1)
    assert first and text(-1) == first
    assert text(2**64 - 1) == first


@pytest.mark.slow
def test_negative_seed_through_the_api(default_gguf):
    """The API takes an int64 seed as OpenAI's does; -1 used to be a 500 ('generation failed:
    expected non-negative integer'). Through a live server and the official client."""
    import socket
    import threading

    import openai
    import uvicorn

    from homellm.serve import ModelRegistry, ServeConfig, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(ModelRegistry({"m": default_gguf}, ServeConfig(threads=1, ctx=256)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started:
            assert time.time() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                               timeout=120)

        def reply(seed):
            out = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": QUESTION}], seed=seed,
                temperature=1.5, top_p=1, max_tokens=12)
            return out.choices[0].message.content

        first = reply(-1)
        assert first and reply(-1) == first
        assert reply(-2**63) and reply(-7)  # the whole int64 range is taken
    finally:
        server.should_exit = True
        thread.join(20)


def test_checked_text_names_a_lone_surrogate_that_is_no_byte():
    """A lone surrogate outside argv's escaped bytes (U+D800, from an API caller or a decoded
    file) is named too (it was a NameError: the except clause's name was read after it)."""
    from homellm.cli.options import checked_text
    from homellm.errors import HomellmError
    with pytest.raises(HomellmError, match="the prompt is not valid Unicode: a lone surrogate at character 1"):
        checked_text("a\ud800b", "the prompt")
    assert checked_text("café", "the prompt") == "café"
