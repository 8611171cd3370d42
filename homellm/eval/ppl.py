"""Perplexity, bits per byte and KL divergence over a text, chunked as llama.cpp's
`llama-perplexity` does, on whatever network `homellm.load` opened (the C runtime for a GGUF
file, PyTorch for a Hugging Face folder, a GPU or an adapter).

    data = read_text("wiki.txt")
    chunks = make_chunks(model.tokenizer, data.text, ctx=512)
    run = evaluate(model, chunks)                      # .ppl, .ppl_err, .bpb, .tokens_per_s
    run = evaluate(model, chunks, top_k=32)            # + run.reference(meta) to save
    run = evaluate(model, chunks, reference=ref)       # + run.kld: KLD, same top-1, delta ppl

Chunking (llama-perplexity's, tools/perplexity/perplexity.cpp): the text is tokenized once
(with BOS in front when the model adds one) and cut into len // ctx chunks of ctx tokens; the
tokens after the last whole chunk are not evaluated (`left_out` says how many). Each chunk is
evaluated alone, from an empty cache, with its first token replaced by BOS when the model adds
one. Only the second half is scored, so every scored token has at least ctx/2 tokens of
context: the logits at positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1, which is
ctx - 1 - ctx/2 tokens a chunk. The last token is never fed (nothing it predicts is scored).

Perplexity = exp(mean NLL), with llama.cpp's +- estimate: ppl x the standard error of the mean
NLL. Bits per byte = total NLL (nats) / ln 2 / UTF-8 bytes of the scored tokens' text.

KL divergence against a reference (reference.py) uses the reference's top-k tokens plus one
bucket for all others: KL(P || Q) ~= sum_{i in top-k} p_i (ln p_i - ln q_i) + p_rest (ln
p_rest - ln q_rest), with q_rest = 1 - sum_{i in top-k} q_i computed exactly from Q's logits.
Merging tokens into a bucket can only lower a KL divergence (the log-sum inequality), so this
is a lower bound of the full-vocabulary KLD, exact where the top-k hold nearly all of P's mass
(llama.cpp instead keeps every token at 16-bit precision and drops those below e^-16).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from homellm.errors import HomellmError

if TYPE_CHECKING:
    import torch

    from homellm.api import Model
    from homellm.eval.reference import Reference

DEFAULT_CTX = 512  # llama-perplexity's default
DEFAULT_TOP_K = 32
Z95 = 1.959964  # two-sided 95% quantile of the normal distribution


# --- the text -------------------------------------------------------------------------------

@dataclass
class TextData:
    path: Path
    text: str
    sha256: str  # of the file's bytes

    @property
    def name(self) -> str:
        return self.path.name


def read_text(path: str | Path) -> TextData:
    """A .txt file as it is, or a .jsonl file's `text` fields joined by blank lines."""
    path = Path(path)
    if not path.exists():
        raise HomellmError(f"--data {path}: no such file")
    if not path.is_file():
        raise HomellmError(f"--data {path}: not a file (expected a .txt file or a .jsonl file "
                           f"with a \"text\" field on each line)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise HomellmError(f"--data {path}: cannot read it: {e.strerror or e}") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HomellmError(f"--data {path}: not UTF-8 text (byte {e.start} is {raw[e.start]:#04x})") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        texts = []
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise HomellmError(f"{path}, line {number}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise HomellmError(f"{path}, line {number}: expected an object with a \"text\" "
                                   f"string field")
            texts.append(row["text"])
        content = "\n\n".join(t for t in texts if t)
    if not content.strip():
        raise HomellmError(f"--data {path}: the file is empty: there is no text to measure")
    return TextData(path, content, hashlib.sha256(raw).hexdigest())


# --- chunks ---------------------------------------------------------------------------------

@dataclass
class Chunks:
    tokens: np.ndarray        # (n_chunks, ctx) int32: each chunk as the model sees it
    scored_bytes: np.ndarray  # (n_chunks,) int64: UTF-8 bytes of each chunk's scored tokens
    text_tokens: int          # tokens of the whole text (BOS included)

    @property
    def ctx(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def n_chunks(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def first(self) -> int:
        """The position whose logits predict the first scored token."""
        return self.ctx // 2

    @property
    def scored_per_chunk(self) -> int:
        return self.ctx - 1 - self.first

    @property
    def left_out(self) -> int:
        """Tokens after the last whole chunk: not evaluated."""
        return self.text_tokens - self.n_chunks * self.ctx


def check_ctx(ctx: int) -> None:
    if ctx < 4:
        raise HomellmError(f"--ctx {ctx}: expected at least 4 (half of each chunk is context, "
                           f"the rest is scored)")


def make_chunks(tokenizer, text: str, ctx: int, name: str = "the text") -> Chunks:
    """Tokenize once, cut into whole chunks of ctx tokens (BOS first where the model adds it)."""
    check_ctx(ctx)
    enc = tokenizer.backend.encode(text, add_special_tokens=True)
    ids = np.asarray(enc.ids, dtype=np.int32)
    n_chunks = len(ids) // ctx
    if n_chunks < 1:
        raise HomellmError(f"{name} is {len(ids)} tokens long, shorter than one chunk: --ctx {ctx} "
                           f"needs at least {ctx} tokens (lower --ctx or give a longer text)")
    # UTF-8 byte offset where each token starts (char offsets from the tokenizer; tokens that
    # share a character, as byte-level pieces of one emoji do, share its start)
    starts = np.maximum.accumulate(np.asarray([o[0] for o in enc.offsets], dtype=np.int64))
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    char_bytes = 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    byte_at = np.concatenate([[0], np.cumsum(char_bytes, dtype=np.int64)])
    token_start = np.append(byte_at[np.minimum(starts, len(codepoints))], byte_at[-1])
    base = np.arange(n_chunks, dtype=np.int64) * ctx
    scored_bytes = token_start[base + ctx] - token_start[base + ctx // 2 + 1]
    tokens = ids[:n_chunks * ctx].reshape(n_chunks, ctx).copy()
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        tokens[:, 0] = tokenizer.bos_id
    return Chunks(tokens, scored_bytes, len(ids))


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary and BOS handling: references compare only alike."""
    vocab = sorted(tokenizer.backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    h = hashlib.sha256(json.dumps([vocab, tokenizer.bos_id, tokenizer.add_bos]).encode())
    return h.hexdigest()[:16]


# --- logits of the scored positions ---------------------------------------------------------

ROWS_PER_CALL = 512  # scored rows whose logits the C runtime returns at once (bounds memory)


def scored_logit_blocks(model: "Model", chunks: np.ndarray, first: int) -> Iterator["torch.Tensor"]:
    """float32 logits at positions first .. ctx-2 of each chunk (B, ctx), as (rows, vocab)
    blocks that cover the B x (ctx-1-first) scored rows in order.

    The C runtime runs each chunk as prefill calls: positions 0 .. first-1 for their keys and
    values only, then first .. ctx-2 with logits for every row (ROWS_PER_CALL at a time), so
    the output head (the largest matmul of a small model) runs on the scored rows only; the
    logits are bit-identical to one call over the whole chunk. PyTorch runs the B chunks as one
    batch, with the unscored rows dropped before the final norm and head (both work row by
    row)."""
    import torch
    ctx = chunks.shape[1]
    if model.engine.native:
        net = model.network
        for row in chunks.tolist():
            net.forward(row[:first], 0, last_only=True)
            for start in range(first, ctx - 1, ROWS_PER_CALL):
                stop = min(start + ROWS_PER_CALL, ctx - 1)
                yield torch.from_numpy(net.forward(row[start:stop], start, last_only=False))
        return
    network = model.network
    ids = torch.as_tensor(chunks[:, :ctx - 1], dtype=torch.long, device=model.device)
    norm = network.model.norm
    hook = norm.register_forward_pre_hook(lambda module, args: (args[0][:, first:],) + args[1:])
    try:
        with torch.inference_mode():
            logits = network(ids)
    finally:
        hook.remove()
    yield logits[:, -(ctx - 1 - first):].float().reshape(-1, logits.shape[-1])


def scored_logits(model: "Model", chunks: np.ndarray, first: int) -> "torch.Tensor":
    """All of scored_logit_blocks as one (B, ctx-1-first, vocab) tensor."""
    import torch
    blocks = list(scored_logit_blocks(model, chunks, first))
    logits = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    return logits.reshape(chunks.shape[0], -1, logits.shape[-1])


# --- one evaluation -------------------------------------------------------------------------

@dataclass
class KldStats:
    """llama-perplexity --kl-divergence's statistics (uncertainties are 1 standard error)."""
    kld_mean: float
    kld_err: float
    kld_median: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    same_top1: float
    same_top1_err: float
    ppl_base: float
    ppl_base_err: float
    log_ppl_ratio: float
    log_ppl_ratio_err: float
    delta_ppl: float
    delta_ppl_err: float
    rms_dp: float      # root mean square change of the next token's probability
    top_k: int

    @property
    def delta_ppl_ci95(self) -> tuple[float, float]:
        return (self.delta_ppl - Z95 * self.delta_ppl_err, self.delta_ppl + Z95 * self.delta_ppl_err)


@dataclass
class Evaluation:
    ctx: int
    n_chunks: int
    scored_tokens: int
    scored_bytes: int
    left_out: int
    nll: np.ndarray = field(repr=False)  # (N,) float64 nats of each scored token
    seconds: float = 0.0
    kld: KldStats | None = None
    saved: dict | None = field(default=None, repr=False)  # top-k arrays for a reference

    @property
    def evaluated_tokens(self) -> int:
        return self.n_chunks * self.ctx

    @property
    def tokens_per_s(self) -> float:
        return self.evaluated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def ppl(self) -> float:
        return math.exp(float(self.nll.mean()))

    @property
    def ppl_err(self) -> float:
        return self.ppl * _mean_err(self.nll)[1]

    @property
    def bpb(self) -> float | None:
        return float(self.nll.sum()) / math.log(2) / self.scored_bytes if self.scored_bytes else None

    def metrics(self) -> dict:
        out = {"ppl": self.ppl, "ppl_err": self.ppl_err, "bpb": self.bpb,
               "nll": float(self.nll.mean()), "scored_tokens": self.scored_tokens,
               "scored_bytes": self.scored_bytes, "chunks": self.n_chunks,
               "left_out_tokens": self.left_out, "tokens_per_s": self.tokens_per_s,
               "seconds": self.seconds}
        if self.kld is not None:
            k = self.kld
            out.update(kld_mean=k.kld_mean, kld_err=k.kld_err, kld_median=k.kld_median,
                       kld_p99=k.kld_p99, kld_max=k.kld_max, same_top1=k.same_top1,
                       ppl_base=k.ppl_base, delta_ppl=k.delta_ppl,
                       delta_ppl_ci95=list(k.delta_ppl_ci95), log_ppl_ratio=k.log_ppl_ratio,
                       rms_dp=k.rms_dp)
        return {key: (round(v, 6) if isinstance(v, float) else v) for key, v in out.items()}

    def reference(self, chunks: Chunks, meta: dict) -> "Reference":
        from homellm.eval.reference import Reference
        if self.saved is None:
            raise ValueError("evaluate(top_k=...) keeps what a reference needs")
        return Reference(meta=dict(meta, ctx=self.ctx, top_k=int(self.saved["top_ids"].shape[1]),
                                   text_tokens=chunks.text_tokens),
                         tokens=chunks.tokens, scored_bytes=chunks.scored_bytes.astype(np.int64),
                         **self.saved)


def evaluate(model: "Model", chunks: Chunks, *, batch: int = 1, top_k: int = 0,
             reference: "Reference | None" = None,
             progress: Callable[[int, int, float], None] | None = None) -> Evaluation:
    """Score every chunk; progress(chunks done, chunks, running ppl) after each group.

    top_k > 0 keeps the top-k log-probabilities (for `Evaluation.reference`); reference
    compares against a saved one (its chunks must be these chunks)."""
    import torch
    if batch < 1:
        raise HomellmError(f"--batch {batch}: expected at least 1")
    vocab = model.args.vocab_size
    if top_k < 0 or top_k >= vocab:
        raise HomellmError(f"--top-k {top_k}: expected 1 .. {vocab - 1}")
    if model.engine.native and model.network.max_seq_len < chunks.ctx:
        raise HomellmError(f"chunks of {chunks.ctx} tokens, but the model was loaded with a "
                           f"context of {model.network.max_seq_len}: load it with ctx >= {chunks.ctx}")
    if reference is not None and not np.array_equal(reference.tokens, chunks.tokens):
        raise ValueError("the reference was made on other chunks")
    first, per = chunks.first, chunks.scored_per_chunk
    n = chunks.n_chunks * per
    nll = np.empty(n, dtype=np.float64)
    keep = None
    if top_k:
        keep = {"top_ids": np.empty((n, top_k), np.int32), "top_logp": np.empty((n, top_k), np.float32),
                "tail_logp": np.empty(n, np.float32), "target_logp": np.empty(n, np.float32)}
    cmp = None
    if reference is not None:
        cmp = {"kld": np.empty(n, np.float64), "same": np.empty(n, bool), "dp": np.empty(n, np.float64)}
    if model.engine.native:
        batch = 1  # the C runtime runs one sequence a call: chunks one by one, no stacked copy
    t0 = time.perf_counter()
    done = 0  # scored rows so far
    for c0 in range(0, chunks.n_chunks, batch):
        group = chunks.tokens[c0:c0 + batch]
        targets = group[:, first + 1:].reshape(-1)
        for logits in scored_logit_blocks(model, group, first):  # (R, V) float32
            rows = slice(done, done + logits.shape[0])
            tgt = torch.as_tensor(targets[rows.start - c0 * per:rows.stop - c0 * per],
                                  dtype=torch.long, device=logits.device)
            lse = _logsumexp_rows(logits)  # (R,)
            target_logp = logits.gather(1, tgt[:, None])[:, 0] - lse
            nll[rows] = -target_logp.double().cpu().numpy()
            if keep is not None:
                vals, ids = torch.topk(logits, top_k, dim=1)
                keep["top_ids"][rows] = ids.cpu().numpy()
                keep["top_logp"][rows] = (vals - lse[:, None]).cpu().numpy()
                keep["tail_logp"][rows] = _rest_logp(logits, ids, lse).cpu().numpy()
                keep["target_logp"][rows] = target_logp.cpu().numpy()
            if cmp is not None:
                _compare(logits, lse, target_logp, reference, rows, cmp)
            done = rows.stop
        if progress is not None:
            progress(c0 + len(group), chunks.n_chunks, math.exp(float(nll[:done].mean())))
    seconds = time.perf_counter() - t0
    run = Evaluation(ctx=chunks.ctx, n_chunks=chunks.n_chunks, scored_tokens=n,
                     scored_bytes=int(chunks.scored_bytes.sum()), left_out=chunks.left_out,
                     nll=nll, seconds=seconds, saved=keep)
    if cmp is not None:
        run.kld = _kld_stats(nll, -reference.target_logp.astype(np.float64), cmp, reference.top_k)
    return run


def _logsumexp_rows(logits: "torch.Tensor", block: int = 16) -> "torch.Tensor":
    """log-sum-exp of each row. On the CPU in blocks of rows whose exp stays in the cache (one
    pass over memory, not three), single-threaded numpy: beside the C runtime's threads on a busy
    machine it is 3-6x faster than torch.logsumexp over the whole (R, vocab) array."""
    import torch
    if logits.device.type != "cpu":
        return torch.logsumexp(logits, dim=1)
    x = logits.numpy()
    out = np.empty(x.shape[0], dtype=np.float32)
    for i in range(0, x.shape[0], block):
        rows = x[i:i + block]
        top = rows.max(axis=1, keepdims=True)
        out[i:i + block] = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
    return torch.from_numpy(out)


def _rest_logp(logits: "torch.Tensor", ids: "torch.Tensor", lse: "torch.Tensor") -> "torch.Tensor":
    """log of the probability of every token not in ids (R, k), exactly: the log-sum-exp of the
    other logits (not log(1 - sum), which cancels when the top-k hold nearly everything)."""
    import torch
    rest = logits.scatter(1, ids, float("-inf"))
    return torch.logsumexp(rest, dim=1) - lse


def _compare(logits, lse, target_logp, ref: "Reference", rows: slice, out: dict) -> None:
    """Per-token KLD (reference top-k + tail bucket), same top-1, change of p(next token)."""
    import torch
    ids = torch.as_tensor(ref.top_ids[rows], dtype=torch.long, device=logits.device)
    q_top = (logits.gather(1, ids) - lse[:, None]).double().cpu().numpy()  # (R, k)
    q_rest = _rest_logp(logits, ids, lse).double().cpu().numpy()           # (R,)
    p_top = ref.top_logp[rows].astype(np.float64)
    p_rest = ref.tail_logp[rows].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(p_top > -np.inf, np.exp(p_top) * (p_top - q_top), 0.0).sum(axis=1)
        terms += np.where(p_rest > -np.inf, np.exp(p_rest) * (p_rest - q_rest), 0.0)
    out["kld"][rows] = np.maximum(terms, 0.0)  # a KL divergence (over k+1 outcomes): >= 0 but for rounding
    out["same"][rows] = logits.argmax(dim=1).cpu().numpy() == ref.top_ids[rows, 0]
    p_next = np.exp(target_logp.double().cpu().numpy())
    out["dp"][rows] = p_next - np.exp(ref.target_logp[rows].astype(np.float64))


def _mean_err(x: np.ndarray) -> tuple[float, float]:
    """Mean and the standard error of the mean, as llama-perplexity computes them."""
    n = len(x)
    mean = float(x.mean())
    var = float((x * x).mean()) - mean * mean
    return mean, (math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0)


def _kld_stats(nll: np.ndarray, nll_base: np.ndarray, cmp: dict, top_k: int) -> KldStats:
    """llama-perplexity's kl_divergence() summary: ln(PPL(Q)/PPL(base)) and PPL(Q)-PPL(base)
    with uncertainties that account for the correlation of the two NLL series."""
    n = len(nll)
    lq, lq_err = _mean_err(nll)
    lb, lb_err = _mean_err(nll_base)
    cov = (float((nll * nll_base).mean()) - lq * lb) / (n - 1) if n > 1 else 0.0
    ppl_q, ppl_b = math.exp(lq), math.exp(lb)
    ratio_err = math.sqrt(max(lq_err ** 2 + lb_err ** 2 - 2 * cov, 0.0))
    dq, db = ppl_q * lq_err, ppl_b * lb_err
    diff_err = math.sqrt(max(dq ** 2 + db ** 2 - 2 * ppl_q * ppl_b * cov, 0.0))
    kld = cmp["kld"]
    kmean, kerr = _mean_err(kld)
    same = float(cmp["same"].mean())
    same_err = math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0
    return KldStats(kld_mean=kmean, kld_err=kerr, kld_median=float(np.median(kld)),
                    kld_p99=float(np.percentile(kld, 99)), kld_p999=float(np.percentile(kld, 99.9)),
                    kld_max=float(kld.max()), same_top1=same, same_top1_err=same_err,
                    ppl_base=ppl_b, ppl_base_err=db, log_ppl_ratio=lq - lb,
                    log_ppl_ratio_err=ratio_err, delta_ppl=ppl_q - ppl_b, delta_ppl_err=diff_err,
                    rms_dp=math.sqrt(float((cmp["dp"] ** 2).mean())), top_k=top_k)
