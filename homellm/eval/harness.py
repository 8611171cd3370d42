"""homellm as an lm-evaluation-harness model type.

    lm_eval --model homellm --model_args model=smollm2,adapter=./runs/sft/adapter --tasks ...
    lm = HomellmLM(model="smollm2")          # or HomellmLM.from_loaded(homellm.load(...), "label")

`model` is anything `homellm run -m` takes (a catalog name, a .gguf file, a Hugging Face
folder); `adapter` a LoRA adapter folder. Other model_args: `ctx` (the context length, default
the model's own up to 4096), `threads`, `device`, `batch_size` (rows of one PyTorch forward;
lm-eval passes its --batch_size, 1 unless given: say 16 for a Hugging Face folder).

Scoring (loglikelihood, loglikelihood_rolling):
- A GGUF file on the CPU runs on the C runtime. Requests are grouped by their context (the
  tokens before the last one that predicts the continuation's first token): the context goes
  through the network once, in one prefill call, and its keys and values stay in the runtime's
  KV cache; each continuation then runs from there, overwriting the positions after the
  context for the next one. The choices of a multiple-choice question share their context, so
  it is computed once, not once per choice. Contexts are visited in token order, so those that
  share a beginning (a task description, few-shot examples) also reuse it.
- Everything else (a Hugging Face folder, an adapter, a GPU) runs on the PyTorch network as
  lm-eval's `hf` back end does: whole sequences, longest first, right-padded into batches.

Both score exactly what lm-eval's `hf` back end scores (the same tokenization of context and
continuation, the same left truncation to the context length, the same rolling windows).

generate_until runs `Model.generate` (the engine behind `homellm run`): greedy when
temperature is 0, stopping at the `until` strings and after `max_gen_toks` tokens.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

import lm_eval.models  # noqa: F401  (lm-eval's own back ends: its registry loads them only while empty)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from homellm.errors import HomellmError

MAX_GEN_TOKS = 256           # lm-eval's default for generate_until
DEFAULT_BATCH = 16           # sequences per PyTorch forward when lm-eval names no batch size
LOGITS_BATCH_BYTES = 256 << 20  # PyTorch path: float32 logits of one batch at most this big
SAMPLING_KEYS = {"top_p", "top_k", "min_p", "seed", "repeat_penalty"}


@dataclass
class ScoreStats:
    """What one scoring call did: requests, distinct contexts, tokens run through the network
    and tokens whose keys and values were reused from the cache."""
    requests: int = 0
    contexts: int = 0
    computed: int = 0
    reused: int = 0
    seconds: float = 0.0

    def line(self, kind: str) -> str:
        rate = self.requests / self.seconds if self.seconds > 0 else 0.0
        return (f"homellm: {self.requests} {kind} requests over {self.contexts} contexts in "
                f"{self.seconds:.1f} s ({rate:.1f} requests/s; {self.computed} tokens computed, "
                f"{self.reused} reused from the KV cache)")


def score_rows(rows: np.ndarray, targets: list[int]) -> tuple[float, bool]:
    """Sum of log-softmax(rows)[i, targets[i]], and whether every target is the argmax.

    rows: (n, vocab) float32 logits, row i predicting targets[i]."""
    rows = np.asarray(rows, dtype=np.float32)
    n = len(targets)
    m = rows.max(axis=1)
    lse = m + np.log(np.exp(rows - m[:, None]).sum(axis=1, dtype=np.float64))  # (n,)
    picked = rows[np.arange(n), targets]
    greedy = bool((rows.argmax(axis=1) == np.asarray(targets)).all())
    return float((picked - lse).sum()), greedy


@register_model("homellm")
class HomellmLM(TemplateLM):
    """lm-eval's LM interface on a homellm model (see the module docstring)."""

    def __init__(self, model: str | None = None, adapter: str | None = None, ctx: int | None = None,
                 threads: int | None = None, device: str | None = None, batch_size=None,
                 max_batch_size=None, max_length: int | None = None, label: str | None = None,
                 **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"--model_args: unknown key(s) {', '.join(sorted(unknown))} for homellm "
                             f"(expected model, adapter, ctx, threads, device, batch_size)")
        from homellm.eval.models import ModelRef, open_model
        ref = ModelRef(str(model) if model not in (None, "") else None,
                       str(adapter) if adapter not in (None, "") else None)
        loaded = open_model(ref, ctx=_opt_int("ctx", ctx or max_length), device=_device(device))
        self._setup(loaded, label or ref.label, threads, batch_size)

    @classmethod
    def from_loaded(cls, model, label: str, threads: int | None = None,
                    batch_size=None) -> "HomellmLM":
        """Wrap a model already opened (`homellm.eval.models.open_model`, `homellm.load`)."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm._setup(model, label, threads, batch_size)
        return lm

    def _setup(self, model, label: str, threads, batch_size):
        self.model = model
        self.label = label
        self.tok = model.tokenizer
        self.native = model.runtime == "native"
        threads = _opt_int("threads", threads)
        if threads:
            if self.native:
                self.model.network.set_threads(threads)
            else:
                import torch
                torch.set_num_threads(threads)
        # lm-eval's --batch_size (its default 1; "auto" or none: ours) sizes the PyTorch path's
        # batches; the C runtime scores one context at a time
        bs = str(batch_size) if batch_size is not None else ""
        self.batch_size = int(bs) if bs.isdigit() and int(bs) > 0 else DEFAULT_BATCH
        self.stats = ScoreStats()
        self._warned_kwargs = False
        self._bos_text = (self.tok.decode([self.tok.bos_id], skip_special_tokens=False)
                          if self.tok.bos_id is not None else None)

    # -- what lm-eval asks of a model -------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        if self.tok.eos_id is None:
            raise HomellmError(f"{self.label}: the tokenizer names no end-of-sequence token, "
                               f"which lm-eval uses as the context of an empty prompt")
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        # as lm-eval's hf back end: BOS where the model has one, else EOS
        return self.tok.bos_id if self.tok.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.model.ctx

    @property
    def max_gen_toks(self) -> int:
        return MAX_GEN_TOKS

    @property
    def device(self):
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return self.label.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        return self.model.tokenizer.chat_template.source

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The conversation as text, by the model's own template. Without a generation prompt
        the last (assistant) message is left open for the continuation, as transformers'
        continue_final_message does."""
        text = self.tok.render_chat(chat_history, add_generation_prompt=add_generation_prompt)
        if add_generation_prompt or not chat_history:
            return text
        final = chat_history[-1].get("content") or ""
        for piece in (final, final.strip()):
            if piece and piece in text:
                return text[:text.rindex(piece) + len(piece)]
        raise HomellmError(f"{self.label}: the chat template does not write the last message's "
                           f"text verbatim, so the reply cannot continue it")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # as lm-eval's hf back end: the tokenizer's own special tokens (BOS where the model adds
        # one) unless asked otherwise, and never a second BOS before a text that starts with it
        add = True if add_special_tokens is None else bool(add_special_tokens)
        if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
            add = False
        return self.tok.encode(string, add_special_tokens=add)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        return {"model": self.label, "runtime": self.model.runtime, "device": self.model.device,
                "threads": self.model.threads, "ctx": self.model.ctx}

    # -- scoring ----------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """requests: (key, context ids, continuation ids) -> (log-probability, is greedy)."""
        L = self.max_length
        items = []  # (prefix, continuation): prefix ends with the token that predicts cont[0]
        for _, context, cont in requests:
            if not context or not cont:
                raise ValueError("loglikelihood: empty context or continuation ids "
                                 "(lm-eval gives the prefix token for an empty context)")
            if len(cont) > L:
                raise HomellmError(f"a continuation of {len(cont)} tokens does not fit the "
                                   f"context of {L} (ctx=)")
            inp = (list(context) + list(cont))[-(L + 1):][:-1]  # left-truncated as hf does
            items.append((tuple(inp[:len(inp) - len(cont) + 1]), list(cont)))
        results: list = [None] * len(items)
        stats = ScoreStats(requests=len(items))
        t0 = time.perf_counter()
        with tqdm(total=len(items), desc="homellm loglikelihood", unit="req",
                  disable=disable_tqdm, file=sys.stderr) as bar:
            score = self._score_native if self.native else self._score_torch
            score(items, results, stats, bar)
        stats.seconds = time.perf_counter() - t0
        self.stats = stats
        if not disable_tqdm and items:
            print(stats.line("loglikelihood"), file=sys.stderr, flush=True)
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def _score_native(self, items, results, stats: ScoreStats, bar) -> None:
        """C runtime: each distinct prefix once, then every continuation from its cache."""
        net = self.model.network
        groups: dict[tuple, list[int]] = {}
        for i, (prefix, _) in enumerate(items):
            groups.setdefault(prefix, []).append(i)
        stats.contexts = len(groups)
        for prefix in sorted(groups):  # token order: shared beginnings are neighbours
            ids = list(prefix)
            start = min(net.common_prefix(ids), len(ids) - 1)  # (the last one gives logits)
            last = net.forward(ids[start:], start, last_only=True)[-1]  # (vocab,)
            stats.computed += len(ids) - start
            stats.reused += start + len(ids) * (len(groups[prefix]) - 1)
            for i in groups[prefix]:
                cont = items[i][1]
                rows = last[None]
                if len(cont) > 1:  # overwrites the positions after the shared prefix
                    more = net.forward(cont[:-1], len(ids), last_only=False)  # (len - 1, vocab)
                    rows = np.concatenate([rows, more])
                    stats.computed += len(cont) - 1
                results[i] = score_rows(rows, cont)
                bar.update(1)

    def _score_torch(self, items, results, stats: ScoreStats, bar) -> None:
        """PyTorch network, as lm-eval's hf back end runs it: whole sequences, longest first,
        right-padded into batches (rows see only earlier positions, so padding after a row
        changes nothing in it). Computing a shared context once and its continuations from a
        cache was tried here too: on the CPU the two small forwards per question cost more
        than the padded batches (30 vs 23 s for homellm_capitals)."""
        stats.contexts = len(set(p for p, _ in items))
        order = sorted(range(len(items)),
                       key=lambda i: (-(len(items[i][0]) + len(items[i][1])), items[i][0]))
        vocab = self.model.args.vocab_size
        pos = 0
        while pos < len(order):
            longest = len(items[order[pos]][0]) + len(items[order[pos]][1]) - 1
            rows = max(1, min(self.batch_size, LOGITS_BATCH_BYTES // (longest * vocab * 4)))
            batch = order[pos:pos + rows]
            pos += len(batch)
            logits = self._forward_padded([list(items[i][0]) + items[i][1][:-1] for i in batch])
            for b, i in enumerate(batch):
                prefix, cont = items[i]
                first = len(prefix) - 1
                results[i] = score_rows(logits[b, first:first + len(cont)], cont)
                stats.computed += len(prefix) + len(cont) - 1
            bar.update(len(batch))

    def _forward_padded(self, seqs: list[list[int]]) -> np.ndarray:
        """float32 logits (B, longest, vocab) of right-padded sequences, as numpy."""
        import torch
        tokens = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for b, seq in enumerate(seqs):
            tokens[b, :len(seq)] = torch.tensor(seq)
        with torch.inference_mode():
            logits = self.model.network(tokens.to(self.model.device))
        return logits.float().cpu().numpy()

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood in windows of the context length, each token
        predicted once (lm-eval's rolling windows, as its hf back end makes them)."""
        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            ids = self.tok_encode(text)
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, scores):
            totals[r] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation -------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's reply, cut at the first `until` string; greedy at temperature 0."""
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        prompts = [self.tok_encode(context) for context, _ in (req.args for req in requests)]
        out: list = [None] * len(requests)
        t0, generated = time.perf_counter(), 0
        with tqdm(total=len(requests), desc="homellm generate_until", unit="req",
                  disable=disable_tqdm, file=sys.stderr) as bar:
            for i in sorted(range(len(requests)), key=lambda i: prompts[i]):  # shared prefixes
                context, gen_kwargs = requests[i].args
                text, n = self._generate(prompts[i], dict(gen_kwargs), eos_text)
                out[i] = text
                generated += n
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        seconds = time.perf_counter() - t0
        if not disable_tqdm and requests:
            print(f"homellm: {len(requests)} generate_until requests in {seconds:.1f} s "
                  f"({len(requests) / max(seconds, 1e-9):.1f} requests/s, "
                  f"{generated / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr, flush=True)
        return out

    def _generate(self, ids: list[int], gen_kwargs: dict, eos_text: str) -> tuple[str, int]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen = int(kwargs.pop("max_gen_toks"))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if not kwargs.pop("do_sample", False):
            temperature = 0.0  # greedy
        # plain sampling at the temperature unless the task names top_p / top_k / min_p
        sampling = {"temperature": temperature, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
        sampling.update({k: kwargs.pop(k) for k in list(kwargs) if k in SAMPLING_KEYS})
        if kwargs and not self._warned_kwargs:
            print(f"homellm: generation settings {', '.join(sorted(kwargs))} are not used "
                  f"(homellm takes {', '.join(sorted(SAMPLING_KEYS))}, temperature, until, "
                  f"max_gen_toks)", file=sys.stderr, flush=True)
            self._warned_kwargs = True
        if max_gen < 1 or max_gen >= self.max_length:
            raise HomellmError(f"generate_until: max_gen_toks={max_gen}: expected 1 to "
                               f"{self.max_length - 1} (the context holds {self.max_length})")
        ids = ids[-(self.max_length - max_gen):]  # left-truncated as hf does
        tokens = [step.token for step in self.model.generate(ids, max_tokens=max_gen, stop=until,
                                                              **sampling)
                  if step.token is not None]
        text = self.tok_decode(tokens, skip_special_tokens=True)
        return postprocess_generated_text(text, until, None), len(tokens)


def _device(device) -> str | None:
    """lm-eval passes its --device, "cuda:0" unless told otherwise, even where there is no GPU
    (its hf back end then falls back to the CPU): so does this; None lets homellm choose."""
    if not device:
        return None
    device = str(device)
    if device.startswith("cuda") and not os.path.exists("/proc/driver/nvidia/version"):
        return None
    if device.startswith("cuda"):
        import torch
        return device if torch.cuda.is_available() else None
    return device


def _opt_int(name: str, value) -> int | None:
    if value in (None, ""):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise HomellmError(f"{name}={value!r}: expected a whole number") from None
    if n < 1:
        raise HomellmError(f"{name}={value}: expected at least 1")
    return n
