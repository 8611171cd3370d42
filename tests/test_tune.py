"""`homellm tune`: exact resume, DDP == one process, quantized bases, merge, clear errors.

A tiny random Llama (hidden 64, 2 layers) with the default model's tokenizer and chat
template stands in for a real model, so the whole pipeline runs in seconds.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from homellm.model.formats import open_checkpoint
from homellm.model.formats.hf import write_hf
from homellm.model.llama import ModelArgs
from homellm.train import dpo, sft
from homellm.train.config import LoraConfig, TuneConfig

sys.path.insert(0, str(Path(__file__).parent))
from gguf_fixtures import tiny_llama_state  # noqa: E402

TOPICS = ["the sky", "grass", "snow", "the sea", "a banana", "coal", "a tomato", "milk",
          "an orange", "a violet", "lava", "sand"]
COLORS = ["blue", "green", "white", "blue", "yellow", "black", "red", "white", "orange",
          "purple", "red", "beige"]


def tiny_model(folder: Path, default_gguf: Path) -> Path:
    """A random tiny Llama as a HF folder, with the default model's tokenizer and template."""
    from homellm.tokenizer import Tokenizer
    ckpt = open_checkpoint(default_gguf)
    tokenizer = Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)
    args = ModelArgs(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=ckpt.args.vocab_size, max_position_embeddings=256,
                     tie_word_embeddings=True)
    tokenizer_json, tokenizer_config = tokenizer.to_hf_files()
    return write_hf(folder, args, tiny_llama_state(args), dtype=torch.float32, tokenizer_json=tokenizer_json,
                    tokenizer_config=tokenizer_config, chat_template=ckpt.chat_template)


def sft_data(path: Path) -> Path:
    with open(path, "w") as f:
        for topic, color in zip(TOPICS, COLORS):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What color is {topic}?"},
                                             {"role": "assistant", "content": f"{topic.capitalize()} is {color}."}]}) + "\n")
    return path


def dpo_data(path: Path) -> Path:
    with open(path, "w") as f:
        for topic, color in zip(TOPICS, COLORS):
            f.write(json.dumps({"prompt": f"What color is {topic}?", "chosen": f"Sure! It is {color}.",
                                "rejected": f"No. It is {color}."}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_gguf):
    root = tmp_path_factory.mktemp("tune")
    return {"model": tiny_model(root / "tiny", default_gguf), "sft": sft_data(root / "sft.jsonl"),
            "dpo": dpo_data(root / "dpo.jsonl")}


def config(tiny, out, method="sft", **kw) -> TuneConfig:
    base = dict(method=method, model=str(tiny["model"]), data=str(tiny[method]), out=str(out),
                lora=LoraConfig(rank=4, alpha=8, dropout=0.1), lr=5e-3, warmup=2, max_steps=6,
                batch_tokens=96, max_length=48, seed=3, threads=1)
    return TuneConfig(**{**base, **kw})


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tiny, tmp_path, method):
    train = sft.train if method == "sft" else dpo.train
    whole = train(config(tiny, tmp_path / "whole", method))
    assert len(whole.losses) == 6 and not whole.stopped
    part = train(config(tiny, tmp_path / "part", method), stop_after=3)
    assert part.stopped and len(part.losses) == 3
    assert (tmp_path / "part" / "checkpoint" / "state.pt").is_file()
    with pytest.raises(Exception, match="holds a checkpoint"):  # not silently restarted
        train(config(tiny, tmp_path / "part", method))
    with pytest.raises(Exception, match="different lr"):
        train(config(tiny, tmp_path / "part", method, lr=1e-3), resume=True)
    rest = train(config(tiny, tmp_path / "part", method), resume=True)
    assert rest.losses == whole.losses  # bit for bit: same data, dropout masks, optimizer state
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    if method == "sft":
        assert whole.losses[-1] < whole.losses[0]


def test_the_resolved_config_is_saved_next_to_the_weights(tiny, tmp_path):
    cfg = config(tiny, tmp_path / "out", val=str(tiny["sft"]), val_every=2)
    result = sft.train(cfg)
    assert [v["step"] for v in result.val] == [2, 4, 6]
    assert result.val[-1]["loss"] < result.val[0]["loss"]
    saved = TuneConfig.load(tmp_path / "out")
    assert saved == cfg.resolved(12) and saved.epochs == 9  # epochs "auto" for 12 examples, saved resolved
    assert saved.lora.targets == ["q", "k", "v", "o", "gate", "up", "down"] and result.config == saved
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and adapter["peft_type"] == "LORA"


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_lora_trains_over_a_quantized_base(tiny, tmp_path, quant):
    float_run = sft.train(config(tiny, tmp_path / "float", max_steps=8))
    q_run = sft.train(config(tiny, tmp_path / quant, quant=quant, max_steps=8))
    # the same model up to rounding of the frozen weights: the first losses agree closely
    assert abs(q_run.losses[0] - float_run.losses[0]) < 0.02 * float_run.losses[0]
    assert q_run.losses[-1] < q_run.losses[0] - 0.1


@pytest.mark.slow
def test_two_processes_under_torchrun_equal_one_with_the_same_global_batch(tiny, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this python")
    common = ["tune", "sft", "-m", str(tiny["model"]), "--data", str(tiny["sft"]), "--steps", "4",
              "--batch-tokens", "96", "--max-length", "48", "--rank", "4", "--lr", "5e-3", "--threads", "1",
              "--device", "cpu", "--seed", "1", "--dtype", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "homellm", *common, "--grad-accum", "2", "--out",
                          str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "homellm", *common,
                          "--grad-accum", "1", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 28
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert any(a[k].abs().max() > 1e-3 for k in a if "lora_B" in k)  # it did train
    assert TuneConfig.load(tmp_path / "two").grad_accum == 1


def homellm_cli(*args, home: Path, timeout=300):
    """The CLI in a subprocess (what a user sees, tracebacks included)."""
    env = {**os.environ, "HOMELLM_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "homellm", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


def cli(capsys, *args) -> tuple[int, str]:
    """The CLI in this process: (exit code, stderr)."""
    from homellm.cli.main import main
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_merge_registers_a_model_that_matches_the_adapter(tiny, tmp_path, homellm_home, capsys):
    import homellm
    sft.train(config(tiny, tmp_path / "adapter", lora=LoraConfig(rank=4, alpha=8, dropout=0.0)))
    code, err = cli(capsys, "merge", "-m", tiny["model"], "--adapter", tmp_path / "adapter", "--name",
                    "tiny-tuned", "--gguf", tmp_path / "tuned.gguf", "--gguf-type", "f32")
    assert code == 0, err
    assert "merged into tiny-tuned" in err and "MB/s" in err
    manifest = json.loads((homellm_home / "models" / "tiny-tuned" / "manifest.json").read_text())
    assert manifest["format"] == "hf" and manifest["source"]["kind"] == "merge"
    with_adapter = homellm.load(tiny["model"], device="cpu", ctx=64, adapter=tmp_path / "adapter")
    plain = homellm.load(tiny["model"], device="cpu", ctx=64)
    merged = homellm.load("tiny-tuned", device="cpu", ctx=64)
    gguf = homellm.load(tmp_path / "tuned.gguf", device="cpu", ctx=64, quant="none")
    ids = with_adapter.tokenizer.apply_chat_template([{"role": "user", "content": "What color is snow?"}])
    expected = with_adapter.logits(ids)
    assert (plain.logits(ids) - expected).abs().max() > 1e-3  # the adapter changes the outputs
    torch.testing.assert_close(merged.logits(ids), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gguf.logits(ids), expected, rtol=1e-4, atol=1e-4)
    code, err = cli(capsys, "merge", "-m", tiny["model"], "--adapter", tmp_path / "adapter", "--name", "tiny-tuned")
    assert code == 1 and "already in the catalog" in err


def test_bad_data_missing_model_and_unwritable_output_are_clear_errors(tiny, tmp_path, homellm_home, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n{"x": 1}\n')
    cases = [
        (["tune", "sft", "-m", tiny["model"], "--data", bad, "--out", tmp_path / "o1"],
         [f"{bad}:1: no assistant reply", f"{bad}:2: not JSON", "3 of 3 records are malformed"]),
        (["tune", "sft", "-m", tiny["model"], "--data", tmp_path / "nope.jsonl", "--out", tmp_path / "o2"],
         ["nope.jsonl: cannot read the data file"]),
        (["tune", "sft", "-m", "no-such-model", "--data", tiny["sft"], "--out", tmp_path / "o3"],
         ["no-such-model"]),
        (["tune", "sft", "-m", tiny["model"], "--data", tiny["sft"], "--out", tiny["sft"] / "sub"],
         ["cannot write to the output folder", "is not a folder"]),
        (["tune", "dpo", "-m", tiny["model"], "--data", tiny["sft"], "--out", tmp_path / "o5"],
         ["a preference pair needs 'prompt', 'chosen' and 'rejected'"]),
        (["tune", "sft", "-m", tiny["model"], "--data", tiny["sft"], "--out", tmp_path / "o6", "--targets", "q,zz"],
         ["LoRA targets zz"]),
        (["tune", "sft", "-m", tiny["model"], "--data", tiny["sft"], "--out", tmp_path / "o7", "--resume"],
         ["no checkpoint to resume from"]),
        (["merge", "-m", tiny["model"], "--adapter", tmp_path, "--name", "x"], ["not a LoRA adapter"]),
    ]
    for args, messages in cases:
        code, err = cli(capsys, *args)
        assert code == 1, (args, err)
        assert err.startswith("error: ") and "Traceback" not in err, err
        for m in messages:
            assert m in err, (m, err)
    # and as a user sees it: one subprocess, no traceback
    proc = homellm_cli(*cases[0][0], home=homellm_home)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert {p.name for p in tmp_path.iterdir()} <= {"bad.jsonl", "home"}  # nothing half-written
    assert not (homellm_home / "models").exists() or \
        not [p for p in (homellm_home / "models").iterdir() if not p.name.startswith(".")]


def test_cli_trains_and_reports_speed(tiny, tmp_path, homellm_home, capsys):
    code, err = cli(capsys, "tune", "sft", "-m", tiny["model"], "--data", tiny["sft"], "--val", tiny["sft"],
                    "--out", tmp_path / "out", "--steps", "3", "--batch-tokens", "96", "--max-length", "48",
                    "--threads", "1")
    assert code == 0, err
    assert "sft: 3 steps" in err and "tok/s" in err and "validation loss" in err
    from homellm.cli.tune import auto_dtype
    assert TuneConfig.load(tmp_path / "out").dtype == auto_dtype("cpu", "none")  # --dtype auto, resolved
    assert auto_dtype("cpu", "int4") == "float32"
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "adapter_model.safetensors", "adapter_config.json", "training_config.json"}


# ------------------------------------------------------------------ long examples (issue 14, item 9)

def _full_then_cut(tokenizer, messages, max_length):
    """The reference: tokenize everything, then cut (what sft_item did before)."""
    ids, mask = tokenizer.encode_chat(messages)
    return ids[:max_length], [i if m else -100 for i, m in zip(ids[:max_length], mask[:max_length])]


def test_long_examples_are_cut_before_tokenizing_to_the_same_ids(default_gguf):
    import random

    from homellm.tokenizer import Tokenizer
    from homellm.train.batches import completion_row, dpo_item, sft_item, within_reach
    ckpt = open_checkpoint(default_gguf)
    tk = Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)
    rng = random.Random(0)
    pieces = ["the ", "sky ", "is ", "blue", ". ", "\n\n", "  ", "é", "日本語", "🙂", "1234567", "----",
              "x" * 40, " " * 30, "<|im_end|>", "https://example.com/a?b=c ", "\t"]
    checked_cut = 0
    for trial in range(60):
        max_length = rng.choice([16, 48, 100])
        budget = (max_length + 64) * min(tk.max_token_bytes, 256)

        def text():
            n = rng.choice([3, 50, budget // 4, budget + rng.randint(-200, 2000)])
            out = "".join(rng.choice(pieces) for _ in range(n // 4 + 1))
            return out if rng.random() < 0.7 else rng.choice(pieces[:4]) * (n // 3 + 1)  # one long run

        messages = [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        if rng.random() < 0.4:
            messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        checked_cut += within_reach(tk, messages, max_length) != messages
        ids, labels = _full_then_cut(tk, messages, max_length)
        item = sft_item(tk, messages, max_length)
        if item is None:
            assert all(x == -100 for x in labels[1:])
        else:
            assert item.rows == [(ids, labels)]
        prompt, reply = messages[:-1], messages[-1:]
        n_prompt = len(tk.apply_chat_template(prompt))
        ids, mask = tk.encode_chat(prompt + reply)
        want = (ids[:max_length], [i if m and t >= n_prompt else -100
                                   for t, (i, m) in enumerate(zip(ids, mask))][:max_length])
        got = completion_row(tk, prompt, reply, max_length)
        assert got == want or (got == ([], []) and all(x == -100 for x in want[1][1:]))
        pair = {"prompt": prompt, "chosen": reply, "rejected": [{"role": "assistant", "content": "No."}]}
        assert (dpo_item(tk, pair, max_length) is None) == all(x == -100 for x in want[1][1:])
    assert checked_cut > 20  # most trials did cut the text


@pytest.mark.slow
def test_a_30_mb_example_trains_in_bounded_memory(tiny, tmp_path, homellm_home):
    """The review's case (M5): one 30 MB line took 8.5 GB and 53 s to tokenize in full before
    being cut to --max-length. Under a 4 GB address-space cap it must train on the cut example."""
    data = tmp_path / "huge.jsonl"
    with open(data, "w") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "Tell me a story."},
                                         {"role": "assistant", "content": "Once upon a time, " * 1_700_000}]}) + "\n")
        f.write(tiny["sft"].read_text())
    assert data.stat().st_size > 30_000_000
    dpo_file = tmp_path / "huge_dpo.jsonl"
    dpo_file.write_text(tiny["dpo"].read_text() +
                        json.dumps({"prompt": "Long?", "chosen": "Yes. " * 6_000_000, "rejected": "No."}) + "\n")
    cap = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
           "sys.argv[0] = 'homellm'; runpy.run_module('homellm', run_name='__main__')")
    env = {**os.environ, "HOMELLM_HOME": str(homellm_home)}
    for method, path in (("sft", data), ("dpo", dpo_file)):
        proc = subprocess.run([sys.executable, "-c", cap, "tune", method, "-m", str(tiny["model"]), "--data",
                               str(path), "--out", str(tmp_path / method), "--steps", "2", "--batch-tokens", "96",
                               "--max-length", "48", "--threads", "1"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"{method}: 2 steps" in proc.stderr


@pytest.mark.slow
def test_ctrl_c_names_the_checkpoint_to_resume(tiny, tmp_path, homellm_home):
    """Ctrl+C mid-run: exit 130 and which folder to --resume, no traceback."""
    import signal
    import time
    out = tmp_path / "run"
    args = [sys.executable, "-m", "homellm", "tune", "sft", "-m", str(tiny["model"]), "--data",
            str(tiny["sft"]), "--out", str(out), "--steps", "400", "--save-every", "1", "--threads", "1",
            "--max-length", "48", "--batch-tokens", "96", "--rank", "4"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HOMELLM_HOME": str(homellm_home)})
    deadline = time.monotonic() + 240
    while not (out / "checkpoint").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert f"checkpoint saved in {out}: continue with the same command and --resume" in err
    assert "interrupted" in err and "Traceback" not in err
