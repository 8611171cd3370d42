"""PPO (`homellm tune ppo`): GAE and the loss against a reference computed by hand here, PPO
against a reward model trained here raising the held-out reward while the KL to the reference
stays under its target, exact resume, and the command line.

The policy is a random tiny Llama on a tokenizer trained here (tests/rl_fixtures.py); the reward
model prefers replies made of the letters a-m to replies made of n-z, a preference every
completion has some of (so a few PPO steps can move it)."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from rl_fixtures import PROMPTS, prompts_file, tiny_model, tiny_tokenizer  # noqa: E402

from homellm.train import ppo, reward  # noqa: E402
from homellm.train.config import LoraConfig, TuneConfig  # noqa: E402
from homellm.train.rl_config import RLConfig  # noqa: E402


def letters_pairs(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)

    def text(letters):
        return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 5)))
                        for _ in range(rng.randint(2, 5)))
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": rng.choice(PROMPTS), "chosen": text("abcdefghijklm"),
                                "rejected": text("nopqrstuvwxyz")}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    tok = tiny_tokenizer(root / "tok")
    model = tiny_model(root / "policy", tok)
    reward.train(TuneConfig(method="rm", model=str(model), data=str(letters_pairs(root / "pairs.jsonl", 96, 0)),
                            out=str(root / "rm"), lora=LoraConfig(rank=8, alpha=16), lr=3e-3, max_steps=30,
                            batch_size=8, max_length=64, threads=1, seed=0))
    return {"root": root, "model": model, "rm": root / "rm",
            "prompts": prompts_file(root / "prompts.jsonl", PROMPTS[:12]),
            "val": prompts_file(root / "val.jsonl", PROMPTS[12:] * 4)}


def config(tiny, out, **kw) -> RLConfig:
    base = dict(method="ppo", model=str(tiny["model"]), prompts=str(tiny["prompts"]), out=str(out),
                reward=str(tiny["rm"]), lora=LoraConfig(rank=8, alpha=16), lr=3e-3, steps=3,
                prompts_per_step=16, max_new_tokens=12, threads=1, seed=0)
    return RLConfig(**{**base, **kw})


def test_gae_matches_the_recursion_written_out_by_hand():
    # two completions, of 3 tokens and 1 token (right-padded)
    rewards = torch.tensor([[0.1, -0.2, 1.5], [2.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.7, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    g, lam = 0.9, 0.8
    # row 0, backwards: t=2 is the last token (the value after it is 0)
    d2 = 1.5 + g * 0 - 0.3
    d1 = -0.2 + g * 0.3 - 0.4
    d0 = 0.1 + g * 0.4 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    # row 1: one token
    b0 = 2.0 - 0.7
    adv, ret = ppo.gae(rewards, values, mask, g, lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2], [b0, 0.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.3], [b0 + 0.7, 0.0, 0.0]]))
    # whitening over the masked entries only
    w = ppo.whiten(adv, mask)
    real = torch.tensor([a0, a1, a2, b0])
    expected = (real - real.mean()) / torch.sqrt(real.var(unbiased=False) + 1e-8)
    torch.testing.assert_close(w[mask], expected)
    assert (w[~mask] == 0).all()


def test_the_ppo_loss_matches_the_clipped_objective_by_hand():
    import math
    logp = torch.tensor([-1.0, -0.5, -2.0])
    old = torch.tensor([-1.3, -0.5, -1.5])
    v = torch.tensor([0.9, 0.1, -0.4])
    v_old = torch.tensor([0.5, 0.0, -0.1])
    adv = torch.tensor([1.0, -2.0, 0.5])
    ret = torch.tensor([1.2, -0.3, 0.0])
    eps, eps_v, c = 0.2, 0.2, 0.1
    pg, vf, clipped = [], [], 0
    for lp, o, vv, vo, a, r in zip(*(t.tolist() for t in (logp, old, v, v_old, adv, ret))):
        ratio = math.exp(lp - o)
        u, k = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
        pg.append(max(u, k))
        clipped += k > u
        vc = vo + min(max(vv - vo, -eps_v), eps_v)
        vf.append(0.5 * max((vv - r) ** 2, (vc - r) ** 2))
    expected = sum(pg) / 3 + c * sum(vf) / 3
    loss, parts = ppo.ppo_loss(logp, old, v, v_old, adv, ret, eps, eps_v, c)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts["pg_loss"] == pytest.approx(sum(pg) / 3, rel=1e-6)
    assert parts["value_loss"] == pytest.approx(sum(vf) / 3, rel=1e-6)
    assert parts["clip_fraction"] == pytest.approx(clipped / 3)
    # the gradient flows to the new log-probs and values only where the terms are not clipped
    logp.requires_grad_(True)
    v.requires_grad_(True)
    ppo.ppo_loss(logp, old, v, v_old, adv, ret, eps, eps_v, c)[0].backward()
    assert logp.grad[0] == 0  # ratio e^0.3 = 1.35 > 1.2 with A > 0: clipped
    assert logp.grad[1] != 0 and logp.grad[2] != 0


@pytest.mark.slow
def test_ppo_raises_the_held_out_reward_and_keeps_the_kl_under_its_target(tiny, tmp_path):
    cfg = config(tiny, tmp_path / "run", steps=20, val_prompts=str(tiny["val"]), target_kl=8.0,
                 kl_horizon=100, val_every=10)
    result = ppo.train(cfg)
    base, tuned = result.base_val, result.val[-1]
    assert base["kl"] == pytest.approx(0.0, abs=1e-6)  # the base is the reference
    assert tuned["reward"] > base["reward"] + 0.5, (base, result.val)
    assert 0 < tuned["kl"] < cfg.target_kl, result.val
    log = result.logs[-1]
    for key in ("reward", "kl", "entropy", "clip_fraction", "value_loss", "tokens_per_s",
                "rollout_tokens_per_s", "kl_coef"):
        assert isinstance(log[key], float), key
    assert result.logs[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy == reference
    assert (tmp_path / "run" / "value_head.safetensors").is_file()


def test_resume_equals_an_uninterrupted_run(tiny, tmp_path):
    kw = dict(steps=4, prompts_per_step=6, lora=LoraConfig(rank=4, alpha=8, dropout=0.1), minibatches=2,
              epochs=2, target_kl=1.0, kl_horizon=10)
    whole = ppo.train(config(tiny, tmp_path / "whole", **kw))
    part = ppo.train(config(tiny, tmp_path / "part", **kw), stop_after=2)
    assert part.stopped
    rest = ppo.train(config(tiny, tmp_path / "part", **kw), resume=True)
    drop = ("seconds", "tokens_per_s", "rollout_tokens_per_s")
    a = [{k: v for k, v in log.items() if k not in drop} for log in whole.logs]
    b = [{k: v for k, v in log.items() if k not in drop} for log in rest.logs]
    assert a == b  # the KL coefficient and the running reward moments were restored too
    logged = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged] == [1, 2, 3, 4]
    from safetensors.torch import load_file
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        x, y = load_file(tmp_path / "whole" / name), load_file(tmp_path / "part" / name)
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)


def test_tune_ppo_on_the_command_line(tiny, tmp_path, capsys):
    from homellm.cli.main import main
    capsys.readouterr()
    code = main(["tune", "ppo", "-m", str(tiny["model"]), "--reward", str(tiny["rm"]), "--prompts",
                 str(tiny["prompts"]), "--val-prompts", str(tiny["val"]), "--steps", "2",
                 "--max-new-tokens", "8", "--threads", "1", "--device", "cpu", "--dtype", "float32",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "ppo: 2 steps" in err and "tok/s" in err and "held-out: base reward" in err
    with pytest.raises(SystemExit) as e:  # argparse: one reward, not both
        main(["tune", "ppo", "-m", str(tiny["model"]), "--reward", str(tiny["rm"]), "--prompts",
              str(tiny["prompts"]), "--reward-fn", "x.py:f"])
    assert e.value.code == 2 and "not allowed with argument --reward" in capsys.readouterr().err
    code = main(["tune", "ppo", "-m", str(tiny["model"]), "--reward", str(tiny["model"]), "--prompts",
                 str(tiny["prompts"]), "--out", str(tmp_path / "o2"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "not a reward model folder" in err and "Traceback" not in err
