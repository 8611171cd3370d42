"""GRPO (`homellm tune grpo`): advantages and loss against a reference written out here, a reward
function that pays for one rare word teaches the policy to say it (the base did not) while the
KL to the reference stays under its target, exact resume, rollouts on the engine's network
sharing the training adapters, and clear errors for a reward function that raises or returns
NaN (with a checkpoint to resume from).

The policy is a random tiny Llama on a tokenizer trained here (tests/rl_fixtures.py), whose
words are single tokens; the rare word is the one the base says least often, yet in at least
one completion of 64 (so that sampling finds it)."""
from __future__ import annotations

import json
import math
WORD = "zebra"
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from rl_fixtures import PROMPTS, WORDS, prompts_file, tiny_model, tiny_tokenizer  # noqa: E402

from homellm.train import grpo  # noqa: E402
from homellm.train.config import LoraConfig  # noqa: E402
from homellm.train.rl_config import RLConfig  # noqa: E402

REWARDS = '''
import math
WORD = "{word}"
def zebra(prompt, completion):
    return 1.0 if WORD in completion else 0.0
def broken(prompt, completion):
    raise ValueError("no score for " + prompt)
def nan(prompt, completion):
    return math.nan
def text(prompt, completion):
    return "good"
def with_extra(prompt, completion, extra):
    return float(len(completion) == extra["n"])
'''


def rare_word(model_dir: Path) -> tuple[str, float]:
    """The word of WORDS the base says least often in sampled completions, among those it says
    in at least 1 of 64 (and at most 1 in 10), with that rate."""
    from homellm.train.base import load_base
    from homellm.train.rollout import generate
    _, tok, model = load_base(str(model_dir))
    ids = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS[:8]]
    texts = [tok.decode(c.ids, skip_special_tokens=True)
             for c in generate(model, ids, 16, 12, stop_ids=tok.eos_ids, pad_id=0, seed=0)]
    rates = {w: sum(w in t for t in texts) / len(texts) for w in WORDS}
    rate, word = min((r, w) for w, r in rates.items() if 1 / 64 <= r <= 0.1)
    return word, rate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    tok = tiny_tokenizer(root / "tok")
    model = tiny_model(root / "policy", tok)
    word, rate = rare_word(model)
    (root / "rewards.py").write_text(REWARDS.replace("{word}", word))
    return {"root": root, "tok": tok, "model": model, "word": word, "rate": rate,
            "prompts": prompts_file(root / "prompts.jsonl", PROMPTS[:12]),
            "val": prompts_file(root / "val.jsonl", PROMPTS[12:] * 6),
            "fn": lambda name: f"{root / 'rewards.py'}:{name}"}


def config(tiny, out, **kw) -> RLConfig:
    base = dict(method="grpo", model=str(tiny["model"]), prompts=str(tiny["prompts"]), out=str(out),
                reward_fn=tiny["fn"]("zebra"), lora=LoraConfig(rank=8, alpha=16), lr=5e-2, steps=4,
                prompts_per_step=4, group_size=8, max_new_tokens=12, threads=1, seed=0)
    return RLConfig(**{**base, **kw})


def test_group_advantages_and_the_token_loss_match_a_reference():
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 3.0, 3.0])
    # groups of 3: [1, 0, 0] mean 1/3 std (unbiased) sqrt(1/3); [2, 3, 3] mean 8/3 std sqrt(1/3)
    s = math.sqrt(1 / 3) + 1e-4
    expected = [(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, (-2 / 3) / s, (1 / 3) / s, (1 / 3) / s]
    torch.testing.assert_close(grpo.group_advantages(rewards, 3), torch.tensor(expected))
    torch.testing.assert_close(grpo.group_advantages(rewards, 3, scale=False),
                               torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]))
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    old = torch.tensor([-1.5, -2.0, -0.1, -3.0])
    ref = torch.tensor([-1.0, -2.5, -0.5, -2.0])
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5])
    loss, clipped = grpo.grpo_token_loss(logp, old, ref, adv, eps=0.2, beta=0.1)
    by_hand = []
    for lp, o, r, a in zip(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist()):
        ratio = math.exp(lp - o)
        surrogate = min(ratio * a, min(max(ratio, 0.8), 1.2) * a)
        k3 = math.exp(r - lp) - (r - lp) - 1
        by_hand.append(-surrogate + 0.1 * k3)
    torch.testing.assert_close(loss, torch.tensor(by_hand))
    # ratio e^0.5 = 1.65 > 1.2 with A > 0: clipped; e^-0.4 = 0.67 < 0.8 with A > 0: not clipped
    assert clipped.tolist() == [True, False, False, False]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["hf", "gguf"])
def test_a_reward_for_one_rare_word_teaches_the_policy_to_say_it(tiny, gguf_policy, tmp_path, policy):
    """hf: rollouts on the training network; gguf: on the C runtime (where it is built)."""
    # saying one given token for sure where the base gives it p ~ 1/300 costs log(300) ~ 6 nats
    # at least: a target of 20 nats a completion leaves room for that, not for a collapse
    model = str(tiny["model"] if policy == "hf" else gguf_policy)
    cfg = config(tiny, tmp_path / "run", steps=24, val_prompts=str(tiny["val"]), lr=1e-2, kl_coef=0.2,
                 target_kl=20.0, kl_horizon=40, val_every=12, model=model)
    result = grpo.train(cfg)
    base, tuned = result.base_val, result.val[-1]
    assert base["reward"] <= 0.1, (tiny["word"], base)  # the base says the word in at most 1 of 10 replies
    assert tuned["reward"] >= 0.6, (tiny["word"], result.val)  # the tuned policy in most
    # nats a completion, against the reference: the adaptive coefficient steers toward the
    # target over its horizon (40 steps; 24 here), so near it, far from a collapse (60+)
    assert tuned["kl"] < 1.5 * cfg.target_kl, result.val
    from homellm.engine import kernels
    assert result.rollout == ("native" if policy == "gguf" and kernels.available() else "policy")
    assert result.logs[-1]["reward"] > result.logs[0]["reward"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == result.logs and len(logged) == 24
    assert {"reward", "kl", "clip_fraction", "tokens_per_s", "rollout_tokens_per_s"} <= set(logged[0])


def test_resume_equals_an_uninterrupted_run(tiny, tmp_path):
    kw = dict(steps=4, lora=LoraConfig(rank=4, alpha=8, dropout=0.1), epochs=2)
    whole = grpo.train(config(tiny, tmp_path / "whole", **kw))
    part = grpo.train(config(tiny, tmp_path / "part", **kw), stop_after=2)
    assert part.stopped and len(part.logs) == 2
    with pytest.raises(Exception, match="holds a checkpoint"):
        grpo.train(config(tiny, tmp_path / "part", **kw))
    with pytest.raises(Exception, match="different lr"):
        grpo.train(config(tiny, tmp_path / "part", **{**kw, "lr": 1e-3}), resume=True)
    rest = grpo.train(config(tiny, tmp_path / "part", **kw), resume=True)
    drop = ("seconds", "tokens_per_s", "rollout_tokens_per_s")
    strip = [[{k: v for k, v in log.items() if k not in drop} for log in r.logs] for r in (whole, rest)]
    assert strip[0] == strip[1]
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("whole", "part"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("name,fragment", [
    ("broken", "raised ValueError: no score for"),
    ("nan", "returned nan"),
    ("text", "returned 'good'"),
])
def test_a_reward_function_that_fails_stops_with_a_clear_error_and_a_checkpoint(tiny, tmp_path, name, fragment):
    from homellm.train.rl import RewardError
    out = tmp_path / "run"
    with pytest.raises(RewardError) as e:
        grpo.train(config(tiny, out, reward_fn=tiny["fn"](name)))
    text = str(e.value)
    assert fragment in text and "rewards.py" in text and "prompt" in text and "--resume" in text
    assert (out / "checkpoint" / "state.pt").is_file()


FAILS_LATER = """
WORD = "sky"
calls = 0
def f(prompt, completion):
    global calls
    calls += 1
    if calls > 64 and FAIL:  # the third step's rewards
        raise RuntimeError("the grader is down")
    return 1.0 if WORD in completion else 0.0
"""


def test_fixing_a_failed_reward_function_and_resuming_equals_an_uninterrupted_run(tiny, tmp_path):
    from homellm.train.rl import RewardError
    fn = tmp_path / "grader.py"
    fn.write_text("FAIL = True\n" + FAILS_LATER)
    with pytest.raises(RewardError, match="the grader is down") as e:
        grpo.train(config(tiny, tmp_path / "run", reward_fn=f"{fn}:f"))
    assert "The 2 steps done are checkpointed" in str(e.value)
    fn.write_text("FAIL = False\n" + FAILS_LATER)  # fixed in place: the same --reward-fn
    rest = grpo.train(config(tiny, tmp_path / "run", reward_fn=f"{fn}:f"), resume=True)
    whole = grpo.train(config(tiny, tmp_path / "whole", reward_fn=f"{fn}:f"))
    drop = ("seconds", "tokens_per_s", "rollout_tokens_per_s")
    assert [{k: v for k, v in log.items() if k not in drop} for log in rest.logs] == \
        [{k: v for k, v in log.items() if k not in drop} for log in whole.logs]
    assert len(rest.logs) == 4 and not rest.stopped


def test_bad_reward_specs_and_prompts_are_clear_errors(tiny, tmp_path):
    from homellm.errors import HomellmError
    cases = [
        (dict(reward_fn=str(tmp_path / "nope.py") + ":f"), "nope.py: no such file"),
        (dict(reward_fn=tiny["fn"]("missing")), "has no function 'missing'"),
        (dict(reward_fn="no-colon"), "expected FILE.py:FUNCTION"),
        (dict(reward_fn=None), "--reward RM"),
        (dict(reward="no-such-rm", reward_fn=None), "not a reward model folder"),
    ]
    for kw, fragment in cases:
        with pytest.raises(HomellmError, match=fragment):
            grpo.train(config(tiny, tmp_path / "o", **kw))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": ""}\n{"prompt": "  "}\n{"messages": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(HomellmError) as e:
        grpo.train(config(tiny, tmp_path / "o", prompts=str(empty)))
    assert f"{empty}:1: empty prompt" in str(e.value) and f"{empty}:3: the prompt must end with a user" in str(e.value)
    assert not (tmp_path / "o").exists()


def test_a_reward_function_gets_the_prompt_lines_other_fields(tiny, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "n": 3}) + "\n" for p in PROMPTS[:4]))
    (tmp_path / "r.py").write_text("def f(prompt, completion, extra):\n    return float(extra['n'])\n")
    result = grpo.train(config(tiny, tmp_path / "o", prompts=str(prompts), steps=1,
                               reward_fn=f"{tmp_path / 'r.py'}:f"))
    assert result.logs[0]["reward"] == 3.0


@pytest.fixture(scope="module")
def gguf_policy(tiny, tmp_path_factory):
    from homellm.model.formats import open_checkpoint
    from homellm.model.formats.gguf import write_gguf
    from homellm.tokenizer.train import load
    ckpt = open_checkpoint(tiny["model"])
    return write_gguf(tmp_path_factory.mktemp("gguf") / "policy.gguf", ckpt.args, dict(ckpt.tensors),
                      out_type="q8_0", tokenizer_fields=load(tiny["tok"]).to_gguf_fields(),
                      chat_template=ckpt.chat_template)


@pytest.mark.parametrize("mode", ["native", "engine"])
def test_rollouts_on_the_fast_engines_follow_the_training_adapters(gguf_policy, mode):
    """A GGUF policy: the C runtime with an adapter over the training tensors' memory (native),
    or the engine's PyTorch network with LoRA layers holding the training Parameters (engine),
    computes the training network's logits, with the adapters and without, before and after
    the adapters change in place (an optimizer step)."""
    from homellm.engine import kernels
    if not kernels.available():
        pytest.skip(f"kernels: {kernels.status()}")
    from homellm.train.base import load_base
    from homellm.train.lora import adapters_disabled, apply_lora, lora_parameters
    from homellm.train.rollout import make_rollout
    _, tokenizer, policy = load_base(str(gguf_policy))
    apply_lora(policy, LoraConfig(rank=4, alpha=8), seed=0)
    roll = make_rollout(policy, gguf_policy, torch.device("cpu"), mode, threads=1)
    assert roll.kind == mode
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Is snow white?"}])
    x = torch.tensor([ids])

    def fast(adapters=True):
        if mode == "native":
            return roll.logits(ids, adapters)
        if adapters:
            return roll.net(x)[0]
        with adapters_disabled(roll.net):
            return roll.net(x)[0]

    with torch.no_grad():
        for p in lora_parameters(policy)[1::2]:  # B: the adapters now change the outputs
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        with adapters_disabled(policy):
            base = policy(x)[0]
        torch.testing.assert_close(fast(adapters=False), base, rtol=1e-3, atol=2e-3)  # int8 activations
        torch.testing.assert_close(fast(), policy(x)[0], rtol=1e-3, atol=2e-3)
        assert (fast() - base).abs().max() > 0.05  # ... which the adapters change
        lora_parameters(policy)[1].mul_(-3)  # an optimizer step, in place
        torch.testing.assert_close(fast(), policy(x)[0], rtol=1e-3, atol=2e-3)
    # sampled rollouts: the same seed draws the same completions; another seed others
    kw = dict(stop_ids=tokenizer.eos_ids, pad_id=0, temperature=1.0)
    prompts = [ids, ids[:-3]]
    a = roll.generate(prompts, 3, 10, seed=5, **kw)
    assert [c.prompt for c in a] == [0, 0, 0, 1, 1, 1]
    assert [c.ids for c in a] == [c.ids for c in roll.generate(prompts, 3, 10, seed=5, **kw)]
    assert [c.ids for c in a] != [c.ids for c in roll.generate(prompts, 3, 10, seed=6, **kw)]
    if mode == "native":  # the reference's log-probs on the C runtime == the training network's
        from homellm.train import rl
        rows = [(prompts[c.prompt], c.ids) for c in a]
        tokens, labels = rl.completion_batch(rows, 0, "cpu")
        with torch.no_grad():
            with adapters_disabled(policy):
                ref = rl.completion_logprobs(policy, tokens, labels)[0]
            pol = rl.completion_logprobs(policy, tokens, labels)[0]
        got = roll.logprobs(rows)
        assert got.shape == ref.shape and (got - ref).abs().max() < 0.02 and (got - ref).abs().mean() < 3e-3
        assert (roll.logprobs(rows, adapters=True) - pol).abs().max() < 0.02
        assert torch.equal(roll.logprobs(rows, chunk=5), got)  # however the calls are cut


def test_a_left_padded_row_decodes_as_the_row_alone(tiny):
    from homellm.train.base import load_base
    from homellm.train.lora import apply_lora, lora_parameters
    from homellm.train.rollout import generate
    _, tokenizer, policy = load_base(str(tiny["model"]))
    apply_lora(policy, LoraConfig(rank=4, alpha=8), seed=0)
    with torch.no_grad():  # a policy whose greedy replies are not one token repeated
        for p in lora_parameters(policy)[1::2]:
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))
    long = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about the sea, please."}])
    short = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    kw = dict(stop_ids=tokenizer.eos_ids, pad_id=0, temperature=0.0)
    seen_both, seen_alone = {}, {}
    both = generate(policy, [long, short], 1, 12, record=seen_both, **kw)
    alone = generate(policy, [short], 1, 12, record=seen_alone, **kw)
    assert len(short) + 5 < len(long) and both[1].ids == alone[0].ids
    assert len(seen_both[1]) == len(seen_alone[0]) == 12
    for a, b in zip(seen_both[1], seen_alone[0]):  # every step's logits, padded or not
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(seen_both[1][0], seen_both[0][0], atol=1e-2)  # the rows differ


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.5), (1.3, 8, 0.8)])
def test_the_c_runtime_rollouts_sample_the_filtered_distribution(temperature, top_k, top_p):
    """_sample_np (numpy, for the C runtime's rollouts) against softmax(logits / t) cut to the top
    k tokens and the top p mass, written out here: 40,000 draws a row."""
    import numpy as np

    from homellm.train.rollout import _sample_np
    logits = np.random.default_rng(0).normal(size=(3, 40)).astype(np.float32) * 2
    draws = 40_000
    rows = np.repeat(logits, draws, axis=0)
    got = _sample_np(rows, temperature, top_k, top_p, np.random.Generator(np.random.PCG64(1)))
    for r in range(3):
        z = logits[r].astype(np.float64) / temperature
        keep = np.ones(40, bool)
        if top_k:
            keep &= z >= np.sort(z)[-top_k]
        p = np.where(keep, np.exp(z - z.max()), 0)
        p /= p.sum()
        if top_p < 1:
            order = np.argsort(-p, kind="stable")
            before = np.cumsum(p[order]) - p[order]
            p[order[before > top_p]] = 0
            p /= p.sum()
        empirical = np.bincount(got[r * draws:(r + 1) * draws], minlength=40) / draws
        assert np.abs(empirical - p).max() < 0.01, (r, empirical, p)
        assert (empirical[p == 0] == 0).all()  # nothing outside the cut is ever drawn
    assert (_sample_np(logits, 0.0, 0, 1.0, None) == logits.argmax(-1)).all()
