"""The catalog commands as a user runs them: `python -m homellm ...` in a subprocess.

Each test gets an empty $HOMELLM_HOME. Error paths must print `error: ...` on stderr, exit
non-zero and never show a traceback.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_fixtures import TINY_LLAMA, write_tiny_gguf
from homellm.cli.list import human_count


def homellm(*args: str, home: Path, env: dict | None = None, check_rc: int | None = 0,
            python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HOMELLM_HOME": str(home), **(env or {})}
    full_env.pop("HOMELLM_DEBUG", None)
    proc = subprocess.run([sys.executable, *python_flags, "-m", "homellm", *args], env=full_env,
                          capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc


def expect_error(proc: subprocess.CompletedProcess, *fragments: str):
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr
    for f in fragments:
        assert f in proc.stderr, proc.stderr


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_tiny_gguf(tmp_path / "Tiny.Q8_0.gguf", out_type="q8_0")


@pytest.mark.parametrize("args", [["--help"], ["list"], ["list", "--json"], ["show", "t"],
                                  ["show", "nothing"], ["rm", "--help"]])
def test_no_torch_for_help_and_list(homellm_home, tiny, args):
    """`homellm --help`, `list` and `show` stay instant: torch is never imported."""
    homellm("pull", str(tiny), "--name", "t", home=homellm_home)
    proc = homellm(*args, home=homellm_home, check_rc=None, python_flags=("-X", "importtime"))
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "homellm.cli.main" in imported
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, "torch was imported"
    assert not {m for m in imported if m.startswith("homellm.model")}


def test_help_lists_every_command(homellm_home):
    out = homellm("--help", home=homellm_home).stdout
    for command in ["run", "chat", "pull", "list", "show", "rm", "bench"]:
        assert f"    {command} " in out
    assert homellm(home=homellm_home).stdout.startswith("usage: homellm")


def test_pull_list_show_rm(homellm_home, tiny):
    proc = homellm("pull", str(tiny), home=homellm_home)
    assert "pulled tiny.q8_0" in proc.stdout and "MB/s" in proc.stdout
    assert (homellm_home / "models" / "tiny.q8_0" / "Tiny.Q8_0.gguf").is_file()

    proc = homellm("pull", str(tiny), "--name", "tiny:q8", home=homellm_home)
    assert "pulled tiny:q8" in proc.stdout

    lines = homellm("list", home=homellm_home).stdout.splitlines()
    assert lines[0].split() == ["NAME", "FORMAT", "QUANT", "PARAMS", "SIZE", "MODIFIED"]
    rows = [line.split()[:4] for line in lines[1:]]
    params = human_count(TINY_LLAMA.n_params)
    assert params == f"{TINY_LLAMA.n_params / 1e3:.0f}K"
    assert rows == [["tiny.q8_0", "gguf", "Q8_0", params], ["tiny:q8", "gguf", "Q8_0", params]]

    out = homellm("show", "tiny:q8", home=homellm_home).stdout
    for fragment in ["architecture     llama", "quantization     Q8_0", "context length   128",
                     "size on disk", "license", "chat template   none"]:
        assert fragment in out, out

    shown = json.loads(homellm("show", "tiny:q8", "--json", home=homellm_home).stdout)
    assert shown["name"] == "tiny:q8" and shown["format"] == "gguf"
    assert shown["summary"]["n_params"] == TINY_LLAMA.n_params
    assert Path(shown["path"]).is_file() and shown["size"] == tiny.stat().st_size
    listed = json.loads(homellm("list", "--json", home=homellm_home).stdout)
    assert [e["name"] for e in listed] == ["tiny.q8_0", "tiny:q8"]

    proc = homellm("rm", "tiny:q8", home=homellm_home)
    assert "deleted tiny:q8" in proc.stdout
    assert not (homellm_home / "models" / "tiny:q8").exists()
    assert [e["name"] for e in json.loads(homellm("list", "--json", home=homellm_home).stdout)] \
        == ["tiny.q8_0"]


def test_show_prints_the_default_template(homellm_home, default_gguf):
    homellm("pull", str(default_gguf), "--name", "smol", home=homellm_home)
    out = homellm("show", "smol", home=homellm_home).stdout
    assert "parameters       135M (134,515,008)" in out and "license          apache-2.0" in out
    assert "<|im_start|>" in out and "chat template (" in out
    full = homellm("show", "smol", "--template", home=homellm_home).stdout
    assert full.count("<|im_start|>") == 3


def test_errors_missing_model(homellm_home, tiny, tmp_path):
    expect_error(homellm("show", "ghost", home=homellm_home, check_rc=1),
                 "no model named 'ghost'", "catalog is empty")
    expect_error(homellm("rm", "ghost", home=homellm_home, check_rc=1), "no model named 'ghost'")
    expect_error(homellm("pull", str(tmp_path / "absent.gguf"), home=homellm_home, check_rc=1),
                 "no such file")
    homellm("pull", str(tiny), home=homellm_home)
    expect_error(homellm("pull", str(tiny), home=homellm_home, check_rc=1),
                 "already in the catalog", "--name")
    expect_error(homellm("show", "ghost", home=homellm_home, check_rc=1), "available: tiny.q8_0")
    expect_error(homellm("pull", str(tiny), "--name", "a/b", home=homellm_home, check_rc=1),
                 "invalid model name")


def test_errors_corrupt_and_truncated(homellm_home, default_gguf, tmp_path):
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(os.urandom(20_000))
    cut = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as f:
        cut.write_bytes(f.read(default_gguf.stat().st_size // 3))
    for bad in (noise, cut):
        expect_error(homellm("pull", str(bad), home=homellm_home, check_rc=1), str(bad))
    assert json.loads(homellm("list", "--json", home=homellm_home).stdout) == []
    assert [p.name for p in (homellm_home / "models").iterdir()] == []  # no staging left


def test_broken_manifest_is_a_clear_error(homellm_home):
    folder = homellm_home / "models" / "m"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(
        {"name": "m", "format": "gguf", "files": [], "size": 0, "summary": {}}))
    expect_error(homellm("show", "m", home=homellm_home, check_rc=1), "files lists no .gguf file")
    assert "no models" in homellm("list", home=homellm_home).stdout  # skipped in the list


def test_unexpected_errors_are_short_unless_debugging(homellm_home, tiny, tmp_path):
    """A broken setup (HOMELLM_HOME is a file): one clear line, or the traceback with
    HOMELLM_DEBUG=1."""
    home = tmp_path / "a-file"
    home.write_text("")
    proc = homellm("pull", str(tiny), home=home, check_rc=1)
    assert "error: cannot write the model catalog" in proc.stderr and "HOMELLM_HOME" in proc.stderr
    assert "error: unexpected" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "homellm", "pull", str(tiny)], capture_output=True,
                          text=True, env={**os.environ, "HOMELLM_HOME": str(home),
                                          "HOMELLM_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr
