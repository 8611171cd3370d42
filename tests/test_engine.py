"""The engine on a tiny random model: cache reuse, sampling, limits, stop strings."""
import pytest
import torch

from homellm.api import StopStrings
from homellm.engine.generate import Engine
from homellm.engine.sampling import Sampler, SamplingParams
from homellm.errors import ContextOverflowError
from homellm.model.llama import Llama, ModelArgs

ARGS = ModelArgs(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=97, max_position_embeddings=256)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Llama(ARGS)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)  # larger than init: spread out the next-token distribution
        m.inv_freq.copy_(__import__("homellm.model.llama", fromlist=["x"]).rope_inv_freq(ARGS))
    return m.eval().requires_grad_(False)


def tokens_of(steps):
    return [s.token for s in steps if s.token is not None]


def test_greedy_generation_equals_argmax_of_full_forward(model):
    engine = Engine(model, ctx=64)
    prompt = [5, 9, 2, 40, 11]
    out = tokens_of(engine.generate(prompt, SamplingParams(temperature=0), max_tokens=12))
    seq = list(prompt)
    for _ in range(12):  # the reference: no cache, the whole sequence each time
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]


def test_prefix_reuse_prefills_only_the_new_tokens(model):
    engine = Engine(model, ctx=64)
    first = [3, 1, 4, 1, 5, 9, 2, 6]
    steps = list(engine.generate(first, SamplingParams(temperature=0), max_tokens=4))
    assert steps[-1].timings.cached_tokens == 0
    second = first + tokens_of(steps) + [7, 7]
    steps2 = list(engine.generate(second, SamplingParams(temperature=0), max_tokens=6))
    t = steps2[-1].timings
    # every token of the first prompt and the reply but the last reply token was cached
    assert t.cached_tokens == len(first) + 3
    fresh = Engine(model, ctx=64)
    assert tokens_of(steps2) == tokens_of(fresh.generate(second, SamplingParams(temperature=0),
                                                         max_tokens=6))


def test_a_diverging_prompt_rewinds_the_cache(model):
    engine = Engine(model, ctx=64)
    list(engine.generate([1, 2, 3, 4, 5, 6], SamplingParams(temperature=0), max_tokens=3))
    steps = list(engine.generate([1, 2, 3, 9, 9], SamplingParams(temperature=0), max_tokens=5))
    assert steps[-1].timings.cached_tokens == 3
    fresh = Engine(model, ctx=64)
    assert tokens_of(steps) == tokens_of(fresh.generate([1, 2, 3, 9, 9],
                                                        SamplingParams(temperature=0), max_tokens=5))


def test_seed_reproduces_a_sampled_output(model):
    params = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    runs = [tokens_of(Engine(model, ctx=64).generate([1, 2, 3], SamplingParams(seed=s, **params),
                                                     max_tokens=20)) for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_max_tokens_and_context_limits(model):
    engine = Engine(model, ctx=16)
    steps = list(engine.generate([1, 2, 3], SamplingParams(temperature=0), max_tokens=5))
    assert len(tokens_of(steps)) == 5 and steps[-1].finish_reason == "length"
    steps = list(engine.generate(list(range(10)), SamplingParams(temperature=0)))
    assert len(tokens_of(steps)) == 6 and steps[-1].finish_reason == "length"  # fills ctx=16
    with pytest.raises(ContextOverflowError, match="20 tokens but the context holds 16.*5 tokens too many"):
        list(engine.generate(list(range(20)), SamplingParams(temperature=0)))


def test_stop_token_ends_with_stop_and_is_not_yielded(model):
    engine = Engine(model, ctx=64)
    greedy = tokens_of(engine.generate([5, 6, 7], SamplingParams(temperature=0), max_tokens=10))
    stop = greedy[4]
    steps = list(Engine(model, ctx=64).generate([5, 6, 7], SamplingParams(temperature=0),
                                                max_tokens=10, stop_ids={stop}))
    assert tokens_of(steps) == greedy[:greedy.index(stop)]
    assert steps[-1].finish_reason == "stop"


def test_logprobs_are_the_models_log_softmax(model):
    engine = Engine(model, ctx=64)
    steps = list(engine.generate([4, 8, 15], SamplingParams(temperature=0), max_tokens=1,
                                 top_logprobs=3))
    expected = torch.log_softmax(model(torch.tensor([[4, 8, 15]]))[0, -1], -1)
    assert steps[0].logprob == pytest.approx(float(expected.max()), abs=1e-5)
    assert [i for i, _ in steps[0].top_logprobs] == expected.topk(3).indices.tolist()


def test_without_logprobs_the_same_tokens_and_no_logprob(model):
    """logprobs=False (bench, `run`, `chat`: nobody reads them) skips the pass over the
    vocabulary: the same tokens, sampled or greedy, and Step.logprob None."""
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.9, seed=3)):
        on = [s for s in Engine(model, ctx=64).generate([4, 8, 15], params, max_tokens=8) if s.token is not None]
        off = [s for s in Engine(model, ctx=64).generate([4, 8, 15], params, max_tokens=8, logprobs=False)
               if s.token is not None]
        assert [s.token for s in off] == [s.token for s in on]
        assert all(s.logprob is not None for s in on) and all(s.logprob is None for s in off)


def test_closing_early_leaves_a_consistent_cache(model):
    engine = Engine(model, ctx=64)
    gen = engine.generate([1, 2, 3, 4], SamplingParams(temperature=0), max_tokens=10)
    first = [next(gen).token for _ in range(3)]
    gen.close()
    assert engine.cache.tokens == [1, 2, 3, 4] + first[:2]  # the third was never fed back
    steps = list(engine.generate([1, 2, 3, 4] + first, SamplingParams(temperature=0), max_tokens=2))
    fresh = Engine(model, ctx=64)
    assert tokens_of(steps) == tokens_of(fresh.generate([1, 2, 3, 4] + first,
                                                        SamplingParams(temperature=0), max_tokens=2))


def test_sampler_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, -5.0])
    assert {Sampler(SamplingParams(top_k=2, min_p=0, seed=s))(logits, []) for s in range(50)} == {0, 1}
    # min_p 0.3: only tokens with p >= 0.3 * p_max survive (e^-1 = 0.37 > 0.3 > e^-2)
    assert {Sampler(SamplingParams(top_k=0, top_p=1, min_p=0.3, seed=s))(logits, [])
            for s in range(50)} == {0, 1}
    # top_p 0.5: the first token alone holds 0.64 of the mass
    assert {Sampler(SamplingParams(top_k=0, top_p=0.5, min_p=0, seed=s))(logits, [])
            for s in range(20)} == {0}
    # repetition penalty turns greedy away from a seen token
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=3.0))(logits, [0]) == 1
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_stop_strings_hold_back_partial_matches():
    s = StopStrings(["</end>", "STOP"])
    assert s.feed("hello </") == ("hello ", False)
    assert s.feed("en") == ("", False)
    assert s.feed("x more") == ("</enx more", False)
    assert s.feed(" ST") == (" ", False)
    assert s.feed("OP and after") == ("", True)
    t = StopStrings(["\n\n"])
    assert t.feed("a\n") == ("a", False)
    assert t.flush() == "\n"


def test_timings_never_report_negative_speeds():
    from homellm.engine.generate import Timings
    assert Timings(generated_tokens=0, decode_s=1e-5).decode_tps == 0.0
    assert Timings(generated_tokens=1, decode_s=1e-5).decode_tps == 0.0
    assert Timings(generated_tokens=11, decode_s=0.5).decode_tps == 20.0


def test_logit_bias_goes_to_the_sampler_and_logprobs_stay_the_models(model):
    """logit_bias (the generation step's, OpenAI's): +100 forces a token, -100 bans the greedy
    one; the reported logprobs are the model's own, before the bias."""
    from homellm.api import check_logit_bias
    from homellm.engine.generate import logsumexp
    from homellm.errors import HomellmError
    engine = Engine(model, ctx=64)
    greedy = SamplingParams(temperature=0)
    free = list(engine.generate([3, 4, 5], greedy, max_tokens=4))
    forced = list(engine.generate([3, 4, 5], greedy, max_tokens=4, logit_bias={17: 100.0}))
    assert tokens_of(forced) == [17] * 4
    logits = model(torch.tensor([[3, 4, 5]]))[0, -1].float().numpy()
    assert forced[0].logprob == pytest.approx(float(logits[17]) - logsumexp(logits), abs=1e-4)
    banned = tokens_of(engine.generate([3, 4, 5], greedy, max_tokens=4,
                                       logit_bias={free[0].token: -100.0}))
    assert banned[0] != free[0].token
    assert check_logit_bias({"5": 2, 7: -1.5}, 97) == {5: 2.0, 7: -1.5}
    for bad, needle in (({"97": 1}, "outside the vocabulary"), ({"x": 1}, "not a token id"),
                        ({3: float("nan")}, "finite number")):
        with pytest.raises(HomellmError, match=needle):
            check_logit_bias(bad, 97)
