"""`homellm export`: the default model out to a HF folder and to GGUF, and back in."""
import subprocess
import sys

import pytest
import torch

import homellm
from homellm.catalog.export import export
from homellm.engine.loader import build_model
from homellm.errors import HomellmError
from homellm.model.formats import open_checkpoint

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_export_to_hf_loads_in_transformers_with_the_same_logits(default_gguf, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = export(default_gguf, tmp_path / "hf", "hf", "float32")
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ours = build_model(open_checkpoint(default_gguf), device="cpu", quant="none")
    with torch.no_grad():
        torch.testing.assert_close(theirs(torch.tensor([ids])).logits, ours(torch.tensor([ids])),
                                   rtol=1e-4, atol=1e-4)
    model = homellm.load(out, device="cpu", ctx=256)
    assert model.tokenizer.apply_chat_template(QUESTION) == list(ids)
    reply = "".join(s.text for s in model.chat(QUESTION, temperature=0, max_tokens=16))
    assert reply == "The capital of France is Paris."


def test_export_to_gguf_q8_0_round_trips(default_gguf, tmp_path):
    out = export(default_gguf, tmp_path / "m.q8_0.gguf", "gguf", "q8_0")
    ckpt = open_checkpoint(out)
    src = open_checkpoint(default_gguf)
    assert ckpt.args == src.args
    assert set(ckpt.metadata["tensor_types"]) == {"Q8_0", "F32"}
    assert ckpt.metadata["name"] == src.metadata["name"]
    assert ckpt.chat_template == src.chat_template
    model = homellm.load(out, device="cpu", ctx=256)
    reply = "".join(s.text for s in model.chat(QUESTION, temperature=0, max_tokens=16))
    assert reply == "The capital of France is Paris."


def test_export_errors(default_gguf, tmp_path):
    with pytest.raises(HomellmError, match="GGUF type 'q3_x'"):
        export(default_gguf, tmp_path / "x.gguf", "gguf", "q3_x")
    with pytest.raises(HomellmError, match="HF dtype"):
        export(default_gguf, tmp_path / "x", "hf", "int3")
    (tmp_path / "taken.gguf").write_bytes(b"x")
    proc = subprocess.run([sys.executable, "-m", "homellm", "export", "-m", str(default_gguf),
                           str(tmp_path / "taken.gguf")], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("error:") and "already exists" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "taken.gguf"]  # nothing half-written
