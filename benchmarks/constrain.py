"""The cost of constrained decoding (response_format) with the default model; prints JSON.

- setup: building llguidance's tokenizer for the model's vocabulary (once per tokenizer), the
  first compile of each response format, and a repeated (cached) one;
- per token: replaying a real JSON reply of the model through a fresh matcher `--repeat`
  times, the mean ms/token of `mask_logits` (llguidance's mask + -inf into the (vocab,)
  float32 logits) and of `advance`;
- end to end: decode tok/s of the same prompt with and without the constraint, for the same
  number of tokens, best of `--repeat` rounds (interleaved, as the machine drifts).

    python benchmarks/constrain.py [--repeat 5] [--max-tokens 128]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

import homellm
from homellm.engine import constrain
from homellm.engine.constrain import compile_response_format
from homellm.engine.generate import Timings
from homellm.engine.sampling import SamplingParams

PROMPT = "Give me a JSON object describing a cat with a name, an age, a list of colors and an owner."
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 32},
    "age": {"type": "integer", "minimum": 0, "maximum": 30},
    "colors": {"type": "array", "items": {"enum": ["black", "white", "orange", "grey"]},
               "minItems": 1, "maxItems": 3},
    "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 32},
                                               "city": {"type": "string", "maxLength": 32}},
              "required": ["name", "city"], "additionalProperties": False}},
    "required": ["name", "age", "colors", "owner"], "additionalProperties": False}
FORMATS = {"json_object": {"type": "json_object"},
           "json_schema": {"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA}}}


def timed(f) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


def generate(model, ids, fmt, max_tokens) -> tuple[list[int], Timings, str]:
    """One greedy generation through the engine; the tokens, timings and finish reason."""
    grammar = compile_response_format(model.tokenizer, fmt)
    timings = Timings()
    steps = list(model.engine.generate(ids, SamplingParams(temperature=0), max_tokens,
                                       model.tokenizer.eos_ids, 0, timings,
                                       constraint=grammar.start() if grammar else None))
    return [s.token for s in steps if s.token is not None], timings, steps[-1].finish_reason


def replay_ms(model, fmt, tokens: list[int], repeat: int) -> dict:
    """Mean ms/token of mask_logits and advance over a recorded reply, best of `repeat`."""
    grammar = compile_response_format(model.tokenizer, fmt)
    logits = np.zeros(model.args.vocab_size, dtype=np.float32)
    best_mask = best_advance = float("inf")
    allowed = []
    for _ in range(repeat):
        c = grammar.start()
        mask_s = advance_s = 0.0
        allowed.clear()
        for token in tokens:
            logits[:] = 0.0
            t0 = time.perf_counter()
            c.mask_logits(logits)
            t1 = time.perf_counter()
            c.advance(token)
            t2 = time.perf_counter()
            mask_s += t1 - t0
            advance_s += t2 - t1
            allowed.append(int(np.isfinite(logits).sum()))
        best_mask = min(best_mask, mask_s / len(tokens))
        best_advance = min(best_advance, advance_s / len(tokens))
    return {"mask_ms_per_token": round(best_mask * 1e3, 4),
            "advance_ms_per_token": round(best_advance * 1e3, 4),
            "allowed_tokens_median": int(np.median(allowed)), "allowed_tokens_max": max(allowed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    a = ap.parse_args()

    model = homellm.load(None, ctx=1024)
    tokenizer = model.tokenizer
    constrain._BY_TOKENIZER.pop(tokenizer, None)  # measure the first build too
    _, tokenizer_s = timed(lambda: constrain._grammars_for(tokenizer))
    setup = {"vocab_size": tokenizer.vocab_size, "llguidance_tokenizer_s": round(tokenizer_s, 4)}
    for name, fmt in FORMATS.items():
        _, first = timed(lambda: compile_response_format(tokenizer, fmt))
        _, again = timed(lambda: compile_response_format(tokenizer, fmt))
        setup[f"{name}_compile_ms"] = round(first * 1e3, 3)
        setup[f"{name}_cached_ms"] = round(again * 1e3, 4)

    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    result = {"model": "default (SmolLM2-135M-Instruct Q4_1)",
              "runtime": getattr(model, "runtime", "torch"), "setup": setup}
    for name, fmt in FORMATS.items():
        tokens, _, finish = generate(model, ids, fmt, a.max_tokens)
        text = tokenizer.decode(tokens)
        parsed = True
        try:
            json.loads(text)
        except json.JSONDecodeError:
            parsed = False
        row = {"reply_tokens": len(tokens), "finish_reason": finish, "parses": parsed,
               **replay_ms(model, fmt, tokens, a.repeat)}
        # end to end, same prompt and number of tokens; interleaved rounds, best of
        best = {"constrained": 0.0, "plain": 0.0}
        for _ in range(a.repeat):
            for kind in best:
                _, t, _ = generate(model, ids, fmt if kind == "constrained" else None, len(tokens))
                best[kind] = max(best[kind], t.decode_tps)
        row["decode_tps_constrained"] = round(best["constrained"], 1)
        row["decode_tps_plain"] = round(best["plain"], 1)
        if best["constrained"] and best["plain"]:
            row["ms_per_token_overhead"] = round(1e3 / best["constrained"] - 1e3 / best["plain"], 4)
        row["text"] = text
        result[name] = row
    print(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
