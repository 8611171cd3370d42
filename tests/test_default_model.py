"""The real default model (SmolLM2-135M-Instruct, GGUF Q4_1) through the production path."""
import pytest
import torch

import homellm

TEXT = (
    "The Open Assistant project collected conversations written and ranked by volunteers. "
    "Each reply was rated for quality, and the best branches of every conversation tree became "
    "training data for chat models. Meanwhile, people ran quantized LLaMA models on laptops: "
    "four bits per weight were enough to keep most of the quality, and a small model could "
    "answer questions at dozens of tokens per second on an ordinary CPU.\n\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nprint([fibonacci(i) for i in range(10)])  # [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]\n\n"
    "Paris is the capital of France; Berlin is the capital of Germany; Madrid is the capital "
    "of Spain. Water boils at 100 degrees Celsius at sea level, and freezes at 0 degrees. "
    "The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon, and "
    "Neil Armstrong was the first person to walk on its surface. Later missions brought back "
    "rocks, and the last astronauts left the Moon in December 1972."
)

# Greedy reply of the default model to QUESTION, with the production path (Q4_1 -> int4).
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GOLDEN = "The capital of France is Paris."


@pytest.fixture(scope="module")
def model(default_gguf):
    return homellm.load(default_gguf, device="cpu", ctx=1024)


@pytest.fixture(scope="module")
def reference(default_gguf):
    """transformers' LlamaForCausalLM with the weights its own GGUF loader dequantizes."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    parsed = load_gguf_checkpoint(str(default_gguf))
    ref = transformers.LlamaForCausalLM(transformers.AutoConfig.for_model(**parsed["config"]))
    tensors = load_gguf_checkpoint(str(default_gguf), return_tensors=True, model_to_load=ref)["tensors"]
    ref.load_state_dict(tensors, strict=False)
    ref.tie_weights()
    return ref.eval()


@pytest.mark.slow
def test_logits_match_transformers_on_the_same_gguf(model, reference):
    ids = model.tokenizer.encode(TEXT)
    assert len(ids) >= 256
    ours = model.logits(ids)
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0].float()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    diff = (ours - theirs).abs().max().item()
    # Q4_1 maps to int4 exactly; the tied Q8_0 head is requantized per row to int8, and
    # activations stay float32: measured 99.6-100% top-1 and a max |diff| of about 1.
    assert agree >= 0.99, f"top-1 agreement {agree:.4f}"
    assert diff < 2.0, f"max abs logit difference {diff:.3f}"


def test_golden_greedy_reply(model):
    text = "".join(s.text for s in model.chat(QUESTION, temperature=0, max_tokens=24))
    assert text == GOLDEN


def test_seed_reproduces_a_sampled_reply(model):
    def reply(seed):
        return "".join(s.text for s in model.chat(QUESTION, temperature=1.0, seed=seed, max_tokens=20))
    assert reply(123) == reply(123)
    assert reply(123) != reply(321)


def test_stop_string_and_eos(model):
    full = "".join(s.text for s in model.chat(QUESTION, temperature=0, max_tokens=24))
    word = full.split()[2]
    steps = list(model.chat(QUESTION, temperature=0, max_tokens=24, stop=[word]))
    assert "".join(s.text for s in steps) == full[:full.index(word)]
    assert steps[-1].finish_reason == "stop"
    short = list(model.chat([{"role": "user", "content": "Say hi."}], temperature=0, max_tokens=200))
    assert short[-1].finish_reason == "stop"  # the model ends its turn with <|im_end|>
    assert "<|im_end|>" not in "".join(s.text for s in short)


def test_chat_session_reuses_the_cache(model):
    session = model.session(system="You are brief.")
    first = list(session.send("Name a color.", temperature=0, max_tokens=10))
    second = list(session.send("Name another.", temperature=0, max_tokens=10))
    t1, t2 = first[-1].timings, second[-1].timings
    assert t1.cached_tokens < t1.prompt_tokens
    # the second turn's prompt starts with the whole first exchange, already cached
    assert t2.cached_tokens >= t1.prompt_tokens
    fresh = homellm.api.ChatSession(model)
    fresh.system = "You are brief."
    fresh.messages = list(session.messages[:-1])
    model.engine.reset()
    again = "".join(s.text for s in model.chat(fresh.conversation(), temperature=0, max_tokens=10))
    assert again == "".join(s.text for s in second)


def test_context_overflow_is_an_error_with_numbers(default_gguf):
    small = homellm.load(default_gguf, device="cpu", ctx=32)
    with pytest.raises(homellm.errors.ContextOverflowError, match="too many"):
        list(small.generate("word " * 40))
