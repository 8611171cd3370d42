"""lm-evaluation-harness on homellm (`--model homellm`, `homellm eval tasks`), offline.

The task is the multiple-choice example shipped with homellm (homellm/eval/example_tasks:
homellm_capitals, 40 questions of 4 choices in a YAML over local JSONL files). The reference is
lm-eval's own `hf` back end (transformers) on the Hugging Face export of the default model
(`homellm export ... --type float32`: the GGUF's weights dequantized).

Which runs are held to 1e-3: the C runtime computes on the GGUF's blocks with int8 activations
and a float16 KV cache, and differs from the float export by up to ~1.5e-3 relative on this task.
So every per-sample log-likelihood within 1e-3 relative is asserted for `--model homellm` on the
same HF export (homellm's PyTorch path) against `hf`; the GGUF through the C runtime must give
the same accuracy (acc and acc_norm) with every log-likelihood within 5e-3 relative.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from homellm.eval import lm_eval_plugin
from homellm.eval import tasks as tasklib
from homellm.errors import HomellmError

TASK = "homellm_capitals"
EXAMPLES = tasklib.EXAMPLE_TASKS
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def hf_export(default_gguf, tmp_path_factory) -> Path:
    from homellm.catalog.export import export
    return export(default_gguf, tmp_path_factory.mktemp("hf") / "smollm2-f32", "hf", "float32")


@pytest.fixture(scope="module")
def gguf_lm(default_gguf):
    from homellm.eval.harness import HomellmLM
    lm = HomellmLM(model=str(default_gguf))
    assert lm.native
    return lm


def per_sample(results: dict, task: str = TASK) -> np.ndarray:
    """(docs, choices) log-likelihoods from a log_samples run, in document order."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return np.array([[float(r[0][0]) for r in s["resps"]] for s in samples])


def run(lm, task=TASK, **kw) -> dict:
    suite = tasklib.find_tasks([task])
    [result] = tasklib.run_task(lm, suite, suite.specs[0], log_samples=True, **kw)
    return result.raw


@pytest.mark.slow
def test_same_accuracy_and_loglikelihoods_as_lm_evals_hf_backend(hf_export, gguf_lm):
    from lm_eval.api.registry import get_model

    from homellm.eval.harness import HomellmLM
    hf = get_model("hf")(pretrained=str(hf_export), dtype="float32", device="cpu", batch_size=16)
    ref = run(hf)
    ours_hf = run(HomellmLM(model=str(hf_export)))
    ours_gguf = run(gguf_lm)
    want, got, got_gguf = per_sample(ref), per_sample(ours_hf), per_sample(ours_gguf)
    assert want.shape == (40, 4)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=0)
    np.testing.assert_allclose(got_gguf, want, rtol=5e-3, atol=0)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours_hf["results"][TASK][metric] == ref["results"][TASK][metric]
        assert ours_gguf["results"][TASK][metric] == ref["results"][TASK][metric]
    assert ref["results"][TASK]["acc,none"] > 0.4  # (a model that reads the questions: 4 choices)


def scratch(lm, requests, split: bool) -> list[tuple[float, bool]]:
    """Each (context, continuation) through the C runtime from an empty cache, nothing reused:
    split=False in one forward pass; split=True as the harness calls it (the context, then the
    continuation after it), so only the reuse differs."""
    from homellm.eval.harness import score_rows
    net, out = lm.model.network, []
    for _, ctx, cont in requests:
        net.reset()
        if split:
            rows = net.forward(ctx, 0, last_only=True)
            if len(cont) > 1:
                rows = np.concatenate([rows, net.forward(cont[:-1], len(ctx), last_only=False)])
        else:
            rows = net.forward(ctx + cont[:-1], 0, last_only=False)[len(ctx) - 1:]
        out.append(score_rows(rows, cont))
    return out


def test_kv_reuse_of_shared_context_equals_scoring_from_scratch(gguf_lm):
    """Continuations scored from a context kept in the KV cache (positions after it overwritten
    by each choice in turn; a context sharing another's beginning computed from there) equal a
    fresh computation: exactly with the same calls, and within 1e-4 of one forward pass (a
    one-token call runs the decode kernel, not the prefill one: ~3e-5 apart)."""
    lm = gguf_lm
    enc = lm.tok_encode
    contexts = ["Question: What is the capital of France?\nAnswer:",
                "Question: What is the capital of France? Think first.\nAnswer:",
                "The quick brown fox jumps over"]
    conts = [" Paris", " London, the capital of England", " Lyon", " the lazy dog", " a wall"]
    requests = [(None, enc(c), enc(c + k)[len(enc(c)):]) for c in contexts for k in conts]
    requests.append((None, [lm.prefix_token_id], enc("Hello world")))
    reused = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    stats = lm.stats
    assert reused == scratch(lm, requests, split=True)
    one_pass = scratch(lm, requests, split=False)
    np.testing.assert_allclose([r[0] for r in reused], [f[0] for f in one_pass], rtol=1e-4)
    assert [r[1] for r in reused] == [f[1] for f in one_pass]
    # each context ran through the network once, not once per continuation
    from_scratch = sum(len(c) + len(k) - 1 for _, c, k in requests)
    assert stats.contexts == len(contexts) + 1
    assert stats.computed + stats.reused == from_scratch
    assert stats.computed < from_scratch / 2


def test_rolling_loglikelihood_matches_hf_backend_windows(hf_export):
    """loglikelihood_rolling over a text longer than the context: lm-eval's rolling windows on a
    16-token context, against the `hf` back end with the same max_length."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from homellm.eval.harness import HomellmLM
    text = ("The history of the city begins with a small fishing village on the river. Over the "
            "centuries it grew into a market town, and later into the capital of the region.")
    req = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    ours = HomellmLM(model=str(hf_export), ctx=16)
    hf = get_model("hf")(pretrained=str(hf_export), dtype="float32", device="cpu", max_length=16)
    assert len(ours.tok_encode(text)) > 2 * 16  # several windows
    np.testing.assert_allclose(ours.loglikelihood_rolling(req, disable_tqdm=True),
                               hf.loglikelihood_rolling(req, disable_tqdm=True), rtol=1e-4)


def test_chat_template_as_transformers_writes_it(hf_export, gguf_lm):
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(str(hf_export))
    chat = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Question: What is the capital of Peru?"},
            {"role": "assistant", "content": "Answer: Lima"},
            {"role": "user", "content": "Question: What is the capital of Chile?"}]
    assert gguf_lm.apply_chat_template(chat) == hf_tok.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    prefilled = chat + [{"role": "assistant", "content": "Answer:"}]  # lm-eval's gen_prefix
    assert gguf_lm.apply_chat_template(prefilled, add_generation_prompt=False) == \
        hf_tok.apply_chat_template(prefilled, tokenize=False, continue_final_message=True)
    assert gguf_lm.chat_template(True) == hf_tok.chat_template


def homellm_cli(*args, home, cwd=None, env_extra=None, timeout=600):
    env = {**os.environ, "HOMELLM_HOME": str(home), **(env_extra or {})}
    env.pop("HOMELLM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "homellm", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_generate_until_greedy_equals_homellm_run(gguf_lm, default_gguf, tmp_path):
    """generate_until at temperature 0 gives `homellm run --temperature 0`'s reply: a raw
    prompt cut at a stop string, and a chat-templated prompt."""
    from lm_eval.api.instance import Instance
    raw = "Question: What is the capital of Peru?\nAnswer: Lima\n\nQuestion: What is the capital of Spain?\nAnswer:"
    chat = "Name three colors."
    gen = {"until": ["\n"], "max_gen_toks": 24, "do_sample": False}
    templated = gguf_lm.apply_chat_template([{"role": "user", "content": chat}])
    ours = gguf_lm.generate_until([Instance("generate_until", {}, (raw, gen), 0),
                                   Instance("generate_until", {}, (templated, {**gen, "until": []}), 1)],
                                  disable_tqdm=True)
    cli_raw = homellm_cli("run", "-m", str(default_gguf), "--raw", "--temperature", "0",
                          "--max-tokens", "24", "--stop", "\n", raw, home=tmp_path)
    cli_chat = homellm_cli("run", "-m", str(default_gguf), "--temperature", "0",
                           "--max-tokens", "24", chat, home=tmp_path)
    assert cli_raw.returncode == 0 and cli_chat.returncode == 0, cli_raw.stderr + cli_chat.stderr
    assert ours[0].strip() and ours[1].strip()
    assert ours[0] == cli_raw.stdout.removesuffix("\n")
    assert ours[1] == cli_chat.stdout.removesuffix("\n")


@pytest.mark.slow
def test_plain_lm_eval_command_with_model_homellm(default_gguf, gguf_lm, tmp_path):
    """`lm_eval --model homellm ...` in a subprocess, after `homellm eval tasks --install-plugin`:
    the same accuracy as the model type run in this process."""
    pth = lm_eval_plugin.site_dir() / lm_eval_plugin.PTH_NAME
    had = pth.exists()
    out = homellm_cli("eval", "tasks", "--install-plugin", home=tmp_path)
    assert out.returncode == 0 and pth.exists(), out.stderr
    try:
        proc = subprocess.run(
            [str(BIN / "lm_eval"), "--model", "homellm", "--model_args", f"model={default_gguf}",
             "--tasks", TASK, "--include_path", ".", "--limit", "12", "--output_path",
             str(tmp_path / "out")],
            cwd=EXAMPLES, capture_output=True, text=True, timeout=600,
            env={**os.environ, "HOMELLM_HOME": str(tmp_path), "HF_DATASETS_OFFLINE": "1",
                 "HF_HUB_OFFLINE": "1"})
    finally:
        if not had:
            homellm_cli("eval", "tasks", "--remove-plugin", home=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result_file] = (tmp_path / "out").rglob("results_*.json")
    got = json.loads(result_file.read_text())["results"][TASK]
    want = run(gguf_lm, limit=12)["results"][TASK]
    assert got["acc,none"] == want["acc,none"] and got["acc_norm,none"] == want["acc_norm,none"]
    assert "homellm: 48 loglikelihood requests over 12 contexts" in proc.stderr


def test_cli_runs_the_task_and_keeps_the_results(default_gguf, gguf_lm, tmp_path, monkeypatch):
    from homellm.eval.results import load_runs, model_identity
    out = homellm_cli("eval", "tasks", "-m", str(default_gguf), "--tasks", TASK, "--limit", "8",
                      "--num-fewshot", "2", "--json", home=tmp_path)
    assert out.returncode == 0, out.stderr
    [line] = [json.loads(x) for x in out.stdout.splitlines()]
    want = run(gguf_lm, limit=8, num_fewshot=2)["results"][TASK]
    assert line["task"] == TASK and line["metrics"]["acc"] == want["acc,none"]
    assert line["metrics"]["samples"] == 8 and line["metrics"]["samples_per_s"] > 0
    monkeypatch.setenv("HOMELLM_HOME", str(tmp_path))
    [kept] = load_runs("tasks")
    assert kept.model_hash == model_identity(default_gguf) and kept.model == str(default_gguf)
    assert kept.task == TASK and kept.metrics["acc"] == want["acc,none"]
    assert kept.settings["num_fewshot"] == 2 and kept.settings["limit"] == 8


@pytest.fixture(scope="module")
def adapter(default_gguf, hf_export, tmp_path_factory) -> Path:
    """A LoRA adapter on the default model with random B (a fresh one changes nothing),
    saved in PEFT's layout naming the HF export as its base."""
    import torch

    from homellm.train.adapter import save_adapter
    from homellm.train.base import load_base
    from homellm.train.config import LoraConfig
    from homellm.train.lora import apply_lora, lora_layers
    _, _, model = load_base(str(default_gguf), tokenizer=False)
    lora = LoraConfig(rank=4)
    apply_lora(model, lora, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
    return save_adapter(model, lora, tmp_path_factory.mktemp("lora") / "adapter", str(hf_export))


@pytest.mark.slow
def test_base_and_adapter_in_one_command_match_peft_on_the_hf_backend(default_gguf, hf_export,
                                                                      adapter, gguf_lm, tmp_path):
    """`-m base,base+adapter`: two kept runs; the adapter's log-likelihoods equal lm-eval's hf
    back end with PEFT on the float export (1e-3 relative) and differ from the base's."""
    from lm_eval.api.registry import get_model

    from homellm.eval.harness import HomellmLM
    out = homellm_cli("eval", "tasks", "-m", f"{default_gguf},{default_gguf}+{adapter}", "--tasks",
                      TASK, "--limit", "8", "--json", home=tmp_path)
    assert out.returncode == 0, out.stderr
    base, tuned = [json.loads(x) for x in out.stdout.splitlines()]
    assert tuned["model"] == f"{default_gguf}+{adapter}" and len(list(tmp_path.glob("evals/*.json"))) == 2
    ours = run(HomellmLM(model=str(default_gguf), adapter=str(adapter)), limit=8)
    ref = run(get_model("hf")(pretrained=str(hf_export), peft=str(adapter), dtype="float32",
                              device="cpu", batch_size=16), limit=8)
    np.testing.assert_allclose(per_sample(ours), per_sample(ref), rtol=1e-3, atol=0)
    assert tuned["metrics"]["acc"] == ours["results"][TASK]["acc,none"]
    plain = run(gguf_lm, limit=8)  # (the C runtime is within ~0.015 of the float base here)
    assert np.abs(per_sample(ours) - per_sample(plain)).max() > 0.1  # the adapter changed the scores


# -- bad input: clear errors, nothing kept ---------------------------------------------------

def write_task(folder: Path, rows: str | None) -> Path:
    """A copy of the example task reading `rows` as its test split (None: no such file)."""
    (folder / "capitals_fewshot.jsonl").write_text((EXAMPLES / "capitals_fewshot.jsonl").read_text())
    if rows is not None:
        (folder / "capitals.jsonl").write_text(rows)
    path = folder / "task.yaml"
    path.write_text((EXAMPLES / f"{TASK}.yaml").read_text())
    return path


@pytest.mark.parametrize("rows, expected", [
    (None, "capitals.jsonl: no such file"),
    ("", "capitals.jsonl: the file is empty"),
    ("\n\n", "capitals.jsonl: the file has no rows"),
    ('{"question": "x", "choices": ["a"], "answer": 0}\n{"question": \n', "line 2 is not JSON"),
])
def test_bad_local_data_is_a_clear_error(tmp_path, default_gguf, rows, expected):
    task = write_task(tmp_path, rows)
    out = homellm_cli("eval", "tasks", "-m", str(default_gguf), "--tasks", str(task), home=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: task homellm_capitals") and expected in out.stderr
    assert str(tmp_path) in out.stderr and not list(tmp_path.glob("evals/*.json"))  # no run kept


def test_unknown_model_and_hub_only_task_are_clear_errors(tmp_path):
    out = homellm_cli("eval", "tasks", "-m", "no-such-model", "--tasks", TASK, home=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ") and "no-such-model" in out.stderr
    hub = tmp_path / "arc.yaml"
    hub.write_text("task: arc_copy\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\n"
                   "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{question}}'\n"
                   "doc_to_choice: '{{choices.text}}'\ndoc_to_target: 0\n")
    before = {k: os.environ.get(k) for k in tasklib.OFFLINE_ENV}
    with pytest.raises(HomellmError, match="arc_copy reads its dataset from the Hugging Face hub"):
        tasklib.load_tasks(tasklib.find_tasks([str(hub)]))
    assert {k: os.environ.get(k) for k in tasklib.OFFLINE_ENV} == before  # put back


@pytest.mark.slow
def test_unknown_task_names_its_neighbours():
    with pytest.raises(HomellmError, match=r"unknown task 'homellm_capitalz' \(did you mean homellm_capitals"):
        tasklib.find_tasks(["homellm_capitalz"])


def test_without_lm_eval_the_error_names_the_extra(tmp_path, default_gguf):
    code = ("import sys; sys.modules['lm_eval'] = None; from homellm.cli.main import main; "
            f"sys.exit(main(['eval', 'tasks', '-m', {str(default_gguf)!r}, '--tasks', '{TASK}']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HOMELLM_HOME": str(tmp_path)})
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "pip install 'homellm[eval]'" in out.stderr
