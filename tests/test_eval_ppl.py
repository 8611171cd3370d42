"""`homellm eval ppl`: perplexity, bits per byte and KL divergence against references computed
here from full logits, on the default model (C runtime and PyTorch) and a tiny GGUF with a
LoRA adapter."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_fixtures import TINY_LLAMA, byte_tokenizer_fields, write_tiny_gguf

from homellm.cli.main import main as cli
from homellm.eval import ppl
from homellm.eval import reference as reffile

# ~330 tokens of plain ASCII prose (the default model's byte-level BPE decodes it exactly)
TEXT = """\
The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as
his father had done before him. There were one hundred and twelve of them, worn smooth in the
middle by a century of boots. At the top he trimmed the wick, polished the great lens with a
soft cloth, and wrote the time in a ledger whose first pages were brittle and brown.

Ships no longer needed the light; their captains trusted satellites and screens. Still, the
keeper believed that a coast without a lamp was like a house without a window. On stormy
nights he stayed awake until dawn, listening to the wind test the glass, and in the morning he
walked along the cliffs to see what the sea had left behind: driftwood, a child's red boot,
once a bottle holding a letter written in a language he could not read.

He kept the letter in the ledger. Years later a young woman arrived on the ferry, asking about
a bottle her grandmother had thrown from a ship in a storm. The keeper made tea, opened the
ledger, and watched her read the words aloud, laughing and crying at once. That night, for the
first time in decades, two people climbed the hundred and twelve steps to light the lamp.
"""
CTX = 64


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "story.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def reference_nll(network, tokenizer, text: str, ctx: int) -> tuple[np.ndarray, int]:
    """llama-perplexity's recipe written out on a PyTorch network's full logits: NLL (nats) of
    the second half of each whole chunk, and the UTF-8 bytes of the scored tokens' text."""
    ids = tokenizer.encode(text)
    nll, n_bytes = [], 0
    for c in range(len(ids) // ctx):
        chunk = ids[c * ctx:(c + 1) * ctx]
        if tokenizer.add_bos:
            chunk[0] = tokenizer.bos_id
        with torch.no_grad():
            logits = network(torch.tensor([chunk]))[0].double()  # (ctx, vocab)
        logp = torch.log_softmax(logits, dim=-1)
        for j in range(ctx // 2, ctx - 1):
            nll.append(-float(logp[j, chunk[j + 1]]))
        n_bytes += len(tokenizer.decode(chunk[ctx // 2 + 1:]).encode("utf-8"))
    return np.asarray(nll), n_bytes


def full_kld(p_logits: torch.Tensor, q_logits: torch.Tensor) -> np.ndarray:
    """KL(P || Q) over the whole vocabulary, per row."""
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).numpy()


@pytest.mark.slow
def test_perplexity_equals_the_pytorch_reference(default_gguf, monkeypatch):
    from homellm.api import load
    monkeypatch.setenv("HOMELLM_RUNTIME", "torch")
    torch_model = load(default_gguf, ctx=CTX)
    assert torch_model.runtime == "torch"
    expected_nll, expected_bytes = reference_nll(torch_model.network, torch_model.tokenizer, TEXT, CTX)
    chunks = ppl.make_chunks(torch_model.tokenizer, TEXT, CTX)
    assert chunks.n_chunks == len(torch_model.tokenizer.encode(TEXT)) // CTX >= 4
    assert chunks.n_chunks * chunks.scored_per_chunk == len(expected_nll)
    assert int(chunks.scored_bytes.sum()) == expected_bytes

    for batch in (1, 3):  # B chunks in one forward: the same numbers
        run = ppl.evaluate(torch_model, chunks, batch=batch)
        np.testing.assert_allclose(run.nll, expected_nll, rtol=1e-5, atol=1e-5)
        assert run.ppl == pytest.approx(math.exp(expected_nll.mean()), rel=1e-5)
        assert run.bpb == pytest.approx(expected_nll.sum() / math.log(2) / expected_bytes, rel=1e-5)
    # llama.cpp's +-: ppl x the standard error of the mean NLL
    sem = expected_nll.std(ddof=0) / math.sqrt(len(expected_nll) - 1)
    assert run.ppl_err == pytest.approx(run.ppl * sem, rel=1e-4)

    # the C runtime (int8 activations) on the same file: the same chunks, close numbers
    monkeypatch.delenv("HOMELLM_RUNTIME")
    native = load(default_gguf, ctx=CTX)
    assert native.runtime == "native"
    run_native = ppl.evaluate(native, ppl.make_chunks(native.tokenizer, TEXT, CTX))
    assert run_native.ppl == pytest.approx(run.ppl, rel=0.01)
    assert np.abs(run_native.nll - expected_nll).mean() < 0.02
    # the scored half in calls of 7 rows (long chunks' memory bound): the same logits, bit for bit
    monkeypatch.setattr(ppl, "ROWS_PER_CALL", 7)
    np.testing.assert_array_equal(ppl.evaluate(native, ppl.make_chunks(native.tokenizer, TEXT, CTX)).nll,
                                  run_native.nll)


@pytest.mark.slow
def test_kld_against_own_reference_is_zero_and_the_file_is_complete(default_gguf, text_file,
                                                                    homellm_home, tmp_path, capsys):
    ref_path = tmp_path / "ref.npz"
    assert cli(["eval", "ppl", "-m", str(default_gguf), "--data", str(text_file), "--ctx", str(CTX),
                "--save-logits", str(ref_path), "--json"]) == 0
    saved = json.loads(capsys.readouterr().out)
    ref = reffile.load(ref_path)
    assert ref.top_k == ppl.DEFAULT_TOP_K and ref.ctx == CTX
    assert ref.meta["model_hash"] == saved["model_hash"] and ref.meta["data"] == "story.txt"
    # top-k in order, and top-k plus the rest bucket hold all the probability
    assert (np.diff(ref.top_logp, axis=1) <= 0).all()
    total = np.exp(ref.top_logp.astype(np.float64)).sum(1) + np.exp(ref.tail_logp.astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    assert math.exp(-ref.target_logp.astype(np.float64).mean()) == pytest.approx(saved["ppl"], rel=1e-5)

    assert cli(["eval", "ppl", "-m", str(default_gguf), "--kl-divergence", str(ref_path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["kld_mean"] == 0 and got["kld_max"] == 0 and got["same_top1"] == 1
    assert got["delta_ppl"] == 0 and got["ppl"] == got["ppl_base"] == saved["ppl"]
    assert got["bpb"] == saved["bpb"]  # the reference keeps the scored bytes
    # with the text given, it is checked to be the same; the text output has llama.cpp's lines
    assert cli(["eval", "ppl", "-m", str(default_gguf), "--data", str(text_file),
                "--kl-divergence", str(ref_path)]) == 0
    out = capsys.readouterr().out
    assert "Mean    KLD:   0.000000" in out and "Same top p : 100.000" in out

    from homellm.eval.results import load_runs
    runs = load_runs()
    assert [r.kind for r in runs] == ["ppl", "kld", "kld"]
    assert runs[0].settings["saved_logits"] == str(ref_path)
    assert runs[1].settings["reference_hash"] == saved["model_hash"]
    assert runs[0].settings["data_sha256"] == runs[2].settings["data_sha256"]


@pytest.mark.slow
def test_top_k_kld_is_the_full_kld_with_all_tokens_and_a_lower_bound_with_fewer(default_gguf, monkeypatch):
    """Reference P: the PyTorch network on the default model; compared Q: the same with its final
    norm scaled by 0.8 (a flatter distribution: a real divergence)."""
    from homellm.api import load
    monkeypatch.setenv("HOMELLM_RUNTIME", "torch")
    p_model = load(default_gguf, ctx=CTX)
    chunks = ppl.make_chunks(p_model.tokenizer, TEXT, CTX)
    chunks.tokens = chunks.tokens[:2]  # 2 chunks: 62 scored tokens
    chunks.scored_bytes = chunks.scored_bytes[:2]
    vocab = p_model.args.vocab_size
    full_ref = ppl.evaluate(p_model, chunks, top_k=vocab - 1).reference(chunks, {})
    small_ref = ppl.evaluate(p_model, chunks, top_k=8).reference(chunks, {})
    first = chunks.first
    p_logits = ppl.scored_logits(p_model, chunks.tokens, first).reshape(-1, vocab)
    q_model = load(default_gguf, ctx=CTX)
    with torch.no_grad():
        q_model.network.model.norm.weight.mul_(0.8)
    q_logits = ppl.scored_logits(q_model, chunks.tokens, first).reshape(-1, vocab)
    expected = full_kld(p_logits, q_logits)
    assert expected.mean() > 0.01

    run = ppl.evaluate(q_model, chunks, reference=full_ref)
    assert run.kld.kld_mean == pytest.approx(expected.mean(), rel=1e-3)
    assert run.kld.kld_max == pytest.approx(expected.max(), rel=1e-3)
    same = (p_logits.argmax(-1) == q_logits.argmax(-1)).double().mean().item()
    assert run.kld.same_top1 == pytest.approx(same)
    nll_p = -full_ref.target_logp.astype(np.float64)
    assert run.kld.delta_ppl == pytest.approx(run.ppl - math.exp(nll_p.mean()), rel=1e-6)

    top8 = ppl.evaluate(q_model, chunks, reference=small_ref)
    assert top8.kld.kld_mean <= expected.mean() * (1 + 1e-4)  # merging tokens lowers a KLD
    assert top8.kld.kld_mean > 0.3 * expected.mean()


def dequantized_with_dither(src: Path, out: Path) -> Path:
    """An F16 model off the Q4_1 grid: the default model's weights plus a deterministic uniform
    dither of +-half a Q4_1 step of each 32-value block."""
    from homellm.model.formats import open_checkpoint
    from homellm.model.formats.checkpoint import GGMLTensor
    from homellm.model.formats.gguf import write_gguf
    from homellm.tokenizer import Tokenizer
    ckpt = open_checkpoint(src)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, t in ckpt.tensors.items():
        if isinstance(t, GGMLTensor):
            w = t.dequantize_numpy()
            blocks = w.reshape(-1, 32)
            step = (blocks.max(1, keepdims=True) - blocks.min(1, keepdims=True)) / 15
            blocks = blocks + step * rng.uniform(-0.5, 0.5, blocks.shape).astype(np.float32)
            tensors[name] = torch.from_numpy(blocks.reshape(w.shape))
        else:
            tensors[name] = t
    tok = Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)
    return write_gguf(out, ckpt.args, tensors, out_type="f16", tokenizer_fields=tok.to_gguf_fields(),
                      chat_template=ckpt.chat_template)


@pytest.mark.slow
def test_kld_q8_0_is_below_q4_1_against_f16(default_gguf, text_file, homellm_home, tmp_path, capsys):
    """KLD(Q8_0 || F16) < KLD(Q4_1 || F16) on the default model.

    The only original weights offline are the Q4_1 file: an F16 made from it alone is on the
    Q4_1 grid, and quantizing that back to Q4_1 would be (nearly) lossless. So the F16 reference
    is the dequantized model plus a deterministic dither of +-half a Q4_1 step in each block,
    which puts every weight anywhere in its cell, as real float weights are. Both quantized
    files are made from that F16 with `homellm export --type`: Q4_1 rounds the dither away (the
    error Q4_1 makes on real weights), Q8_0 keeps it to 1/17 of a Q4_1 step."""
    f16 = dequantized_with_dither(default_gguf, tmp_path / "f16.gguf")
    for qtype in ("q8_0", "q4_1"):
        assert cli(["export", "-m", str(f16), str(tmp_path / f"{qtype}.gguf"), "--type", qtype]) == 0
    ref_path = tmp_path / "f16.npz"
    assert cli(["eval", "ppl", "-m", str(f16), "--data", str(text_file), "--ctx", str(CTX),
                "--save-logits", str(ref_path), "--json"]) == 0
    capsys.readouterr()
    models = f"{tmp_path / 'q8_0.gguf'},{tmp_path / 'q4_1.gguf'}"
    assert cli(["eval", "ppl", "-m", models, "--kl-divergence", str(ref_path), "--json"]) == 0
    q8, q4 = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert q8["runtime"] == q4["runtime"] == "native"
    assert 0 < q8["kld_mean"] < q4["kld_mean"] / 5
    assert q8["same_top1"] >= q4["same_top1"]
    assert abs(q8["delta_ppl"]) < abs(q4["delta_ppl"]) or q4["delta_ppl_ci95"][0] <= 0 <= q4["delta_ppl_ci95"][1]


def test_adapter_and_model_lists(tmp_path, homellm_home, capsys):
    """tiny.gguf,tiny.gguf+ADAPTER: both on the C runtime (as served: the adapter's rows beside
    the file's blocks), each equal to the recipe on the PyTorch network's full logits."""
    from homellm.api import load
    from homellm.train.adapter import save_adapter
    from homellm.train.config import LoraConfig
    from homellm.train.lora import apply_lora, lora_layers
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", TINY_LLAMA, "f32")
    lora = LoraConfig(rank=4, alpha=8)
    model = load(gguf_path, device="cpu", dtype=torch.float32)
    apply_lora(model.network, lora, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model.network):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    save_adapter(model.network, lora, tmp_path / "adapter")
    data = tmp_path / "story.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in TEXT.split("\n\n")))
    text = "\n\n".join(TEXT.split("\n\n"))

    assert cli(["eval", "ppl", "-m", f"{gguf_path},{gguf_path}+{tmp_path / 'adapter'}",
                "--data", str(data), "--ctx", "128", "--json"]) == 0
    base, tuned = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert base["runtime"] == "native" and tuned["runtime"] == "native"
    assert tuned["model"] == f"{gguf_path}+{tmp_path / 'adapter'}"
    assert base["model_hash"] != tuned["model_hash"]
    for got, adapter in ((base, None), (tuned, tmp_path / "adapter")):
        m = load(gguf_path, ctx=128, adapter=adapter, device="cpu", dtype=torch.float32, native_adapter=False)
        nll, n_bytes = reference_nll(m.network, m.tokenizer, text, 128)
        assert got["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-4)
        assert got["bpb"] == pytest.approx(nll.sum() / math.log(2) / n_bytes, rel=1e-4)
    assert abs(base["ppl"] - tuned["ppl"]) > 0.01 * base["ppl"]

    # a Hugging Face folder of the same model (PyTorch) against the GGUF's reference (C runtime)
    assert cli(["export", "-m", str(gguf_path), str(tmp_path / "hf"), "--format", "hf", "--type", "float32"]) == 0
    assert cli(["eval", "ppl", "-m", str(gguf_path), "--data", str(data), "--ctx", "128",
                "--save-logits", str(tmp_path / "ref.npz"), "--json"]) == 0
    capsys.readouterr()
    assert cli(["eval", "ppl", "-m", str(tmp_path / "hf"), "--data", str(data),
                "--kl-divergence", str(tmp_path / "ref.npz"), "--json"]) == 0
    hf = json.loads(capsys.readouterr().out)
    # (a random tiny model has near-ties: one top token in a few hundred may flip between the
    # two float orders; the divergence is what must be nil)
    assert hf["runtime"] == "torch" and hf["same_top1"] > 0.99 and hf["kld_max"] < 1e-5
    assert hf["ppl"] == pytest.approx(base["ppl"], rel=1e-4)


def test_chunks_start_with_bos_when_the_model_adds_one(tmp_path):
    """llama-perplexity's chunks: BOS before the text, and each later chunk's first token
    replaced by BOS; scored bytes are the text of each chunk's second half."""
    from homellm.api import load
    fields = dict(byte_tokenizer_fields(), add_bos_token=True)
    model = load(write_tiny_gguf(tmp_path / "bos.gguf", TINY_LLAMA, "f32", tokenizer_fields=fields))
    ids = model.tokenizer.encode(TEXT)
    assert ids[0] == model.tokenizer.bos_id == 1 and ids[1] != 1
    ctx = 100
    chunks = ppl.make_chunks(model.tokenizer, TEXT, ctx)
    assert chunks.n_chunks == len(ids) // ctx and chunks.left_out == len(ids) % ctx
    for c in range(chunks.n_chunks):
        assert chunks.tokens[c].tolist() == [1] + ids[c * ctx + 1:(c + 1) * ctx]
        scored = model.tokenizer.decode(ids[c * ctx + ctx // 2 + 1:(c + 1) * ctx])
        assert chunks.scored_bytes[c] == len(scored.encode())
    nll, _ = reference_nll(load(tmp_path / "bos.gguf", dtype=torch.float32).network, model.tokenizer, TEXT, ctx)
    assert ppl.evaluate(model, chunks).ppl == pytest.approx(math.exp(nll.mean()), rel=1e-4)


# --- bad input: a clear error, nothing kept or written ------------------------------------

def run_error(capsys, *argv) -> str:
    assert cli(["eval", "ppl", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "bug in homellm" not in err
    return err


def test_bad_input(default_gguf, text_file, homellm_home, tmp_path, capsys):
    m = ["-m", str(default_gguf)]
    assert "no-such-model" in run_error(capsys, "-m", "no-such-model", "--data", str(text_file))
    assert "no such file" in run_error(capsys, *m, "--data", str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    assert "empty" in run_error(capsys, *m, "--data", str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    assert "bad.jsonl, line 2" in run_error(capsys, *m, "--data", str(tmp_path / "bad.jsonl"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "not UTF-8" in run_error(capsys, *m, "--data", str(tmp_path / "latin1.txt"))
    (tmp_path / "short.txt").write_text("Just a few words here.")
    err = run_error(capsys, *m, "--data", str(tmp_path / "short.txt"), "--ctx", "512")
    assert "short.txt is 6 tokens long" in err and "--ctx 512 needs at least 512 tokens" in err
    assert "--ctx 2" in run_error(capsys, *m, "--data", str(text_file), "--ctx", "2")
    assert "--data FILE is required" in run_error(capsys, *m)
    assert "does not exist" in run_error(capsys, *m, "--data", str(text_file), "--save-logits",
                                         str(tmp_path / "nowhere" / "ref.npz"))
    assert "adapter folder" in run_error(capsys, "-m", f"{default_gguf}+{tmp_path / 'no-adapter'}",
                                         "--data", str(text_file))
    not_ref = tmp_path / "not-a-ref.npz"
    not_ref.write_bytes(b"PK\x03\x04 garbage")
    assert "not a homellm logits reference" in run_error(capsys, *m, "--kl-divergence", str(not_ref))
    from homellm.eval.results import load_runs
    assert load_runs() == []

    # a reference from another text or another ctx is refused before any work
    ref_path = tmp_path / "ref.npz"
    assert cli(["eval", "ppl", *m, "--data", str(text_file), "--ctx", str(CTX), "--save-logits",
                str(ref_path), "--json"]) == 0
    capsys.readouterr()
    other = tmp_path / "other.txt"
    other.write_text(TEXT.replace("lighthouse", "windmill"))
    err = run_error(capsys, *m, "--data", str(other), "--kl-divergence", str(ref_path))
    assert "other tokens than" in err and "story.txt" in err and "chunk 1" in err
    err = run_error(capsys, *m, "--data", str(text_file), "--ctx", "128", "--kl-divergence", str(ref_path))
    assert "--ctx 128" in err and f"chunks of {CTX} tokens" in err
    assert len(load_runs()) == 1


def test_an_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "ref.npz"
    ref = reffile.Reference(meta={"ctx": 8}, tokens=np.zeros((1, 8), np.int32),
                            scored_bytes=np.zeros(1, np.int64), top_ids=np.zeros((3, 2), np.int32),
                            top_logp=np.zeros((3, 2), np.float32), tail_logp=np.zeros(3, np.float32),
                            target_logp=np.zeros(3, np.float32))
    reffile.save(path, ref)
    before = path.read_bytes()

    def broken(f, **arrays):
        f.write(b"half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez_compressed", broken)
    with pytest.raises(KeyboardInterrupt):
        reffile.save(path, ref)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]
