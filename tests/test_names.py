"""Catalog names: Ollama's rule (letters, digits, '_', '-', '.', at most one ':' before a tag,
no '..', at most 128 characters), and no Windows device names. A bad name is refused with the
rule on pull, rm, show and run (never an OSError from the file system), and a name an older
homellm accepted can still be removed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gguf_fixtures import write_tiny_gguf
from homellm import catalog
from homellm.catalog.library import MAX_NAME, check_name, name_from, name_problem
from homellm.errors import HomellmError

GOOD = ["smollm2:135m", "a", "A1", "llama-3.2:1b-instruct-q4_K_M", "x_y.z:_tag", "UPPER:Case",
        "a.b", "n" * MAX_NAME, "cons", "com10", "nul2:x", "lpt", "auxiliary"]
BAD = ["", "a:..", "a..b", "CON", "con", "NUL", "nul.txt", "Aux:1", "COM1", "lpt9.gguf:q4",
       "x" * (MAX_NAME + 1), "x" * 300, "x" * 1000, ".hidden", "-dash", "_x", "a:", ":", "a:b:c",
       "a/b", "../../etc/x", "a b", "modèle", "a\nb", "a.", "a:b.", "a:-b", "a\x00b", "a:b/../c"]


@pytest.mark.parametrize("name", GOOD)
def test_good_names(name):
    assert name_problem(name) is None
    assert check_name(name) == name


@pytest.mark.parametrize("name", BAD)
def test_bad_names_say_the_rule(name):
    assert name_problem(name) is not None
    with pytest.raises(HomellmError, match="invalid model name .*letters, digits"):
        check_name(name)


@pytest.mark.parametrize("text", ["CON.gguf", "Some..Model", "x" * 300, "...", "nul"])
def test_names_made_from_files_are_valid(text):
    assert name_problem(name_from(text)) is None


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf", out_type="q8_0")


def homellm(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOMELLM_HOME": str(home)}
    env.pop("HOMELLM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "homellm", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def expect_error(proc, fragment: str):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr
    assert "error: " in err and "error: unexpected" not in err and "Traceback" not in err, err
    assert fragment in err, err


@pytest.mark.parametrize("name", ["a:..", "CON", "", "x" * 300])
def test_pull_refuses_bad_names_and_adds_nothing(homellm_home, tiny, name):
    with pytest.raises(HomellmError, match="invalid model name"):
        catalog.pull(tiny, name=name)
    assert catalog.list_models() == []
    assert not (homellm_home / "models").exists() or \
        [p.name for p in (homellm_home / "models").iterdir()] == []


@pytest.mark.slow
def test_cli_refuses_bad_names_everywhere(homellm_home, tiny):
    """pull, rm, show and run each say what is wrong with the name (a 300- or 1000-character
    name used to reach the file system: 'File name too long')."""
    long = "x" * 300
    expect_error(homellm("pull", str(tiny), "--name", "CON", home=homellm_home), "Windows device name")
    expect_error(homellm("pull", str(tiny), "--name", "a:..", home=homellm_home), "invalid model name")
    expect_error(homellm("pull", str(tiny), "--name", "", home=homellm_home), "a name is needed")
    expect_error(homellm("pull", str(tiny), "--name", long, home=homellm_home), "more than 128")
    for command in ("rm", "show"):
        expect_error(homellm(command, long, home=homellm_home), "more than 128")
        expect_error(homellm(command, "x" * 1000, home=homellm_home), "more than 128")
        expect_error(homellm(command, "a:..", home=homellm_home), "invalid model name")
        expect_error(homellm(command, "", home=homellm_home), "a name is needed")
    expect_error(homellm("run", "-m", long, "hi", home=homellm_home), "neither a file or folder nor a valid")
    expect_error(homellm("run", "-m", "x" * 5000, "hi", home=homellm_home), "more than 128")
    assert catalog.list_models() == []


def test_an_old_name_can_still_be_removed(homellm_home, tiny):
    """A catalog made before the rule may hold 'a..b': it is listed, shown and removable."""
    entry = catalog.pull(tiny, name="ok")
    models = homellm_home / "models"
    os.rename(models / "ok", models / "a..b")
    manifest = json.loads((models / "a..b" / "manifest.json").read_text())
    (models / "a..b" / "manifest.json").write_text(json.dumps({**manifest, "name": "a..b"}))
    assert [e.name for e in catalog.list_models()] == ["a..b"]
    assert catalog.get("a..b").format == entry.format
    catalog.rm("a..b")
    assert catalog.list_models() == []
