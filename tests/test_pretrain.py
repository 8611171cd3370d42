"""homellm pretrain: a tiny Llama learns a small corpus, resumes exactly, trains the same under
torchrun, and what it writes is a model that our C runtime, transformers and tune open."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from homellm.cli.main import main as cli
from homellm.data.shards import open_tokens
from homellm.errors import HomellmError
from homellm.train.muon import Muon, newton_schulz
from homellm.train.pretrain import PretrainConfig, lr_factor, pretrain, unigram_entropy

sys.path.insert(0, os.path.dirname(__file__))
from pretrain_fixtures import make_corpus  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("pretrain"), n_docs=150, vocab=384)


def tiny(corpus: Path, out: Path, **kw) -> PretrainConfig:
    base = dict(data=str(corpus), out=str(out), depth=2, seq_len=64, batch_tokens=512,
                device_batch=4, steps=8, lr=3e-3, dtype="float32", threads=1, val_tokens=2048)
    return PretrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_loss_goes_well_below_the_unigram_entropy(corpus, tmp_path):
    data = open_tokens(corpus)
    h1 = unigram_entropy(data.train, data.vocab_size)
    result = pretrain(tiny(corpus, tmp_path / "m", steps=60, val_every=20))
    assert result.losses[0] > h1  # a fresh model knows nothing: ~ln(vocab)
    val = result.val[-1]
    assert [v["step"] for v in result.val] == [20, 40, 60]
    assert result.val[0]["loss"] > result.val[-1]["loss"]
    # the grammar makes each next word predictable from the last few: far below unigram
    assert val["loss"] < 0.6 * h1, (val, h1)
    assert val["bpb"] == pytest.approx(val["loss"] / np.log(2) / data.bytes_per_token("val"))
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["hidden_size"] == 128 and config["num_hidden_layers"] == 2
    assert config["vocab_size"] == 384 and config["tie_word_embeddings"] is True


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, schedule", [("adamw", "cosine"), ("muon", "wsd")])
def test_resume_is_exact(corpus, tmp_path, optimizer, schedule):
    config = tiny(corpus, tmp_path / "whole", steps=6, optimizer=optimizer, schedule=schedule,
                  device_batch=2, val_every=3)
    whole = pretrain(config)
    cut = replace(config, out=str(tmp_path / "cut"))
    first = pretrain(cut, stop_after=3)
    assert first.stopped and first.steps == 3
    with pytest.raises(HomellmError, match="holds an earlier run"):
        pretrain(cut)
    with pytest.raises(HomellmError, match="cannot resume.*lr"):
        pretrain(replace(cut, lr=1e-3), resume=True)
    second = pretrain(cut, resume=True)
    assert second.steps == 6 and not second.stopped
    assert second.losses == whole.losses  # bit for bit
    assert second.val == whole.val
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_muon_orthogonalizes_and_trains(corpus, tmp_path):
    g = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(newton_schulz(g))
    assert s.min() > 0.5 and s.max() < 1.3  # every direction pushed to ~1 (a raw g: 4.8 to 24)
    t = torch.linalg.svdvals(newton_schulz(g.T.contiguous()))  # tall: the same values
    torch.testing.assert_close(s, t, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="2-D"):
        Muon([dict(params=[torch.nn.Parameter(torch.zeros(3))], muon=True)])
    result = pretrain(tiny(corpus, tmp_path / "m", steps=20, optimizer="muon"))
    assert result.losses[-1] < result.losses[0] - 1.5


def test_schedules():
    c = PretrainConfig(schedule="wsd", decay=0.2, min_lr_ratio=0.1)
    f = [lr_factor(s, 100, 10, c) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0
    assert f[10:80] == [1.0] * 70  # stable
    assert f[80] < 1.0 and f[99] == pytest.approx(0.1) and all(a > b for a, b in zip(f[80:], f[81:]))
    cos = [lr_factor(s, 100, 10, replace(c, schedule="cosine")) for s in range(100)]
    assert cos[10] == 1.0 and cos[99] == pytest.approx(0.1) and 0.5 < cos[55] < 0.6


def test_bad_settings_are_clear_errors(corpus, tmp_path):
    with pytest.raises(HomellmError, match="not a multiple of seq_len x device_batch"):
        pretrain(tiny(corpus, tmp_path / "a", batch_tokens=500))
    with pytest.raises(HomellmError, match="--seq-len 100000 needs at least"):
        pretrain(tiny(corpus, tmp_path / "b", seq_len=100_000, batch_tokens=100_000, device_batch=1))
    with pytest.raises(HomellmError, match="no tokenized corpus"):
        pretrain(tiny(tmp_path, tmp_path / "c"))
    with pytest.raises(HomellmError, match="size 'huge'"):
        PretrainConfig(size="huge")
    with pytest.raises(HomellmError, match="Muon orthogonalizes whole matrices"):
        PretrainConfig(fsdp=True, optimizer="muon")
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_the_model_exports_to_gguf_and_the_c_runtime_matches_pytorch(corpus, tmp_path, monkeypatch):
    import homellm
    from homellm.catalog.export import export
    from homellm.engine import kernels
    pretrain(tiny(corpus, tmp_path / "m", steps=10))
    gguf_path = export(str(tmp_path / "m"), tmp_path / "m.gguf", "gguf", "f32")
    text = "The quiet dog finds the old river at night."
    ref_model = homellm.load(str(tmp_path / "m"))  # the HF folder: the PyTorch network
    assert ref_model.runtime == "torch"
    ids = ref_model.tokenizer.encode(text)
    ref = ref_model.logits(ids)
    fast = homellm.load(str(gguf_path))
    assert fast.tokenizer.encode(text) == ids  # the BPE vocabulary went into the GGUF
    if kernels.available():
        assert fast.runtime == "native"
    got = fast.logits(ids)
    assert (got - ref).abs().max() < 2e-3 * ref.abs().max()  # test_native.py's tolerance
    # and transformers reads the folder as the same network
    from transformers import LlamaForCausalLM
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "m", torch_dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(torch.tensor([ids])).logits[0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_the_pretrained_model_runs_and_fine_tunes(corpus, tmp_path, capsys):
    out = tmp_path / "m"
    assert cli(["pretrain", "--data", str(corpus), "--depth", "2", "--seq-len", "64", "--no-compile",
                "--batch-tokens", "512", "--steps", "6", "--out", str(out), "--threads", "1",
                "--val-every", "3"]) == 0
    err = capsys.readouterr().err
    assert "validation loss" in err and "bits per byte" in err and "tok/s" in err
    assert cli(["run", "-m", str(out), "--temperature", "0", "--max-tokens", "5", "The cat"]) == 0
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Where is the {w}?"},
        {"role": "assistant", "content": f"The {w} is near the sea."}]}) + "\n"
        for w in ("cat", "dog", "bird", "ship")))
    assert cli(["tune", "sft", "-m", str(out), "--data", str(chats), "--out", str(tmp_path / "sft"),
                "--steps", "3", "--threads", "1"]) == 0
    assert cli(["run", "-m", str(out), "--adapter", str(tmp_path / "sft"), "--temperature", "0",
                "--max-tokens", "5", "Where is the cat?"]) == 0


def _torchrun(args: list[str], nproc: int, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HOMELLM_HOME=str(tmp / "home"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), "-m", "homellm", *args] if nproc > 1 else [sys.executable, "-m", "homellm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_under_torchrun_equal_one(corpus, tmp_path, mode):
    """2 processes x 1 micro-batch each == 1 process x 2 micro-batches (same global batch)."""
    common = ["pretrain", "--data", str(corpus), "--depth", "2", "--seq-len", "64",
              "--batch-tokens", "256", "--device-batch", "2", "--steps", "4", "--threads", "1",
              "--dtype", "float32", "--val-every", "2"]
    one = _torchrun(common + ["--out", str(tmp_path / "one")], 1, tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    extra = ["--fsdp"] if mode == "fsdp" else []
    two = _torchrun(common + ["--out", str(tmp_path / "two")] + extra, 2, tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 process(es) x 1 micro-batch" in two.stderr
    a = json.loads((tmp_path / "one" / "history.json").read_text())
    b = json.loads((tmp_path / "two" / "history.json").read_text())
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    np.testing.assert_allclose([v["loss"] for v in a["val"]], [v["loss"] for v in b["val"]], rtol=1e-5)
    wa = load_file(tmp_path / "one" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_fused_projections_equal_the_separate_ones():
    from homellm.train.pretrain import LMLoss, build_model, fuse_projections, model_args
    args = model_args(2, 300, 32)
    x = torch.randint(0, 300, (3, 33), generator=torch.Generator().manual_seed(0))
    grads = []
    for fuse in (False, True):
        model = build_model(args, seed=1)
        if fuse:
            fuse_projections(model)
        loss = LMLoss(model)(x[:, :-1], x[:, 1:])
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-4)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-4, atol=1e-5)
