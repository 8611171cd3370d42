"""Rollouts for PPO and GRPO: many completions sampled at once from the policy as it is now.

    roll = make_rollout(policy, checkpoint_path, device)   # native, engine or policy (below)
    done = roll.generate(prompt_ids, n=4, max_new_tokens=64, stop_ids=tokenizer.eos_ids,
                         pad_id=pad, temperature=1.0, seed=7)   # [Completion], prompt by prompt

Generation dominates the cost of RL, so it runs on the fastest network that computes the policy
*as it is now*, without copying or reloading anything between steps:

- "native": the C runtime (engine/kernels/native.py, network.h hl_batch) on the GGUF file's own
  blocks, every row with an adapter whose A and B are pointers to the training LoRA tensors'
  memory (float32, updated in place by AdamW): the one engine that serves, here with adapters
  that change every step. Sequences are slots of a SlotCache at their own positions (no
  padding); a group's completions copy their prompt's keys and values (one prefill a prompt).
- "engine": the engine's PyTorch network of the GGUF file (engine/loader.py: the C kernels per
  projection, as `homellm run --adapter` ran before the C runtime took adapters) with LoRALinear
  layers that hold the training Parameters themselves.
- "policy": the training network itself, adapters on: a Hugging Face folder, a GPU.

"auto" takes the first that applies. Old log-probabilities are always computed again by the
training network (as TRL and OpenRLHF do after vLLM), so a rollout network that rounds
differently (the C runtime's int8 activations) only changes which samples are drawn, never the
gradient's formula. The PyTorch paths left-pad the prompts to one length (one attention call per
layer for the batch, padding masked; RoPE depends on relative positions only, so a row's logits
equal the row alone up to float rounding). Rows that finish leave the batch. Sampling draws from
a torch.Generator seeded per call: a resumed run draws the same completions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

@dataclass
class Completion:
    prompt: int  # index into the prompts given to generate()
    ids: list[int]  # generated ids; the stop token (an action too) last when finished
    finished: bool  # stopped by a stop token (else: max_new_tokens reached)
    text: str = ""  # decoded without the stop token (filled by the caller that has a tokenizer)


@dataclass
class RolloutStats:
    tokens: int = 0
    seconds: float = 0.0
    rows: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def rollout_network(policy: nn.Module, source, device: torch.device, mode: str = "auto") -> nn.Module:
    """The network rollouts run on: `mode` "engine" (the engine's network of the checkpoint at
    `source` with LoRA layers sharing the policy's adapter tensors), "policy" (the training
    network itself), or "auto" (engine where it is a GGUF on a CPU with the kernels built)."""
    if mode == "policy":
        return policy
    from homellm.engine import kernels
    from homellm.model.formats import open_checkpoint
    ckpt = open_checkpoint(source)
    usable = ckpt.format == "gguf" and device.type == "cpu" and kernels.available()
    if mode == "auto" and not usable:
        return policy
    if mode == "engine" and device.type != "cpu":
        return policy  # on a GPU the training network is the fast one
    from homellm.engine.loader import build_model
    from homellm.train.lora import LoRALinear, lora_layers
    net = build_model(ckpt, device=device)
    for name, layer in lora_layers(policy):
        base = net.get_submodule(name)
        shared = LoRALinear(base, layer.rank, layer.alpha)
        shared.lora_A, shared.lora_B = layer.lora_A, layer.lora_B  # the same Parameters
        parent, _, leaf = name.rpartition(".")
        setattr(net.get_submodule(parent), leaf, shared)
        owner = net.get_submodule(parent)
        if leaf in ("q_proj", "k_proj", "v_proj"):
            owner.qkv_proj = None  # the fused kernel would bypass the adapter
        if leaf in ("gate_proj", "up_proj"):
            owner.gate_up_proj = None
    net.requires_grad_(False)
    return net.eval()


def _sample(logits: Tensor, temperature: float, top_k: int, top_p: float,
            generator: torch.Generator) -> Tensor:
    """One token a row from logits (B, V): greedy at temperature 0, else softmax(logits / t)
    cut to the top_k tokens and the top_p mass (0 and 1: no cut)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _sample_np(logits, temperature: float, top_k: int, top_p: float, rng):
    """_sample on numpy logits (R, V) with a numpy Generator: the C runtime's rollouts stay out
    of PyTorch between its calls (torch's thread team would wait on the cores the C pool needs)."""
    import numpy as np
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits / np.float32(temperature)
    if top_k and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k:].min(-1, keepdims=True)
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z, dtype=np.float64)
    p /= p.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, -1)
        drop = np.cumsum(sorted_p, -1) - sorted_p > top_p
        sorted_p[drop] = 0
        p = np.zeros_like(p)
        np.put_along_axis(p, order, sorted_p, -1)
        p /= p.sum(-1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)


@torch.inference_mode()
def generate(net: nn.Module, prompt_ids: list[list[int]], n: int, max_new_tokens: int, *,
             stop_ids: set[int], pad_id: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stats: RolloutStats | None = None,
             record: dict | None = None) -> list[Completion]:
    """`n` completions of each prompt, in order (prompt 0's n, then prompt 1's, ...).
    `record`: a dict that gets, per row, the logits (vocab,) each token was sampled from."""
    from homellm.engine.kv_cache import KVCache
    t0 = time.perf_counter()
    device = net.inv_freq.device
    rows = [p for p in prompt_ids for _ in range(n)]
    owner = [i for i in range(len(prompt_ids)) for _ in range(n)]
    B, P = len(rows), max(len(p) for p in rows)
    tokens = torch.full((B, P), pad_id, dtype=torch.long)
    valid = torch.zeros(B, P + max_new_tokens, dtype=torch.bool)  # (B, S): real positions
    for b, p in enumerate(rows):
        tokens[b, P - len(p):] = torch.tensor(p)
        valid[b, P - len(p):P] = True
    tokens, valid = tokens.to(device), valid.to(device)
    cache = KVCache(net.args, P + max_new_tokens, batch_size=B, device=device)
    # prefill: causal, padding hidden; a padding query sees itself (a row of nothing is NaN)
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    mask = causal[None] & valid[:, None, :P] | torch.eye(P, dtype=torch.bool, device=device)[None]
    logits = net(tokens, start_pos=0, cache=cache, mask=mask[:, None], last_only=True)[:, -1]
    g = torch.Generator(device=device).manual_seed(seed)
    out: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    live = list(range(B))  # the original row of each row still in the batch
    stop = torch.tensor(sorted(stop_ids) or [-1], device=device)
    for t in range(max_new_tokens):
        if record is not None:
            for j, b in enumerate(live):
                record.setdefault(b, []).append(logits[j].float().cpu())
        token = _sample(logits, temperature, top_k, top_p, g)  # (live,)
        ended = torch.isin(token, stop).tolist()
        for j, (b, tok) in enumerate(zip(live, token.tolist())):
            out[b].append(tok)
            finished[b] = ended[j]
        keep = [j for j, e in enumerate(ended) if not e]
        if not keep or t == max_new_tokens - 1:
            break
        if len(keep) < len(live):  # finished rows leave the batch and the cache
            idx = torch.tensor(keep, device=device)
            for layer in range(len(cache.k)):
                cache.k[layer], cache.v[layer] = cache.k[layer][idx], cache.v[layer][idx]
            valid, token = valid[idx], token[idx]
            live = [live[j] for j in keep]
        pos = P + t
        valid[:, pos] = True
        step_mask = valid[:, None, None, :pos + 1]  # (live, 1, 1, S)
        logits = net(token[:, None], start_pos=pos, cache=cache, mask=step_mask)[:, -1]
    if stats is not None:
        stats.tokens += sum(len(o) for o in out)
        stats.rows += B
        stats.seconds += time.perf_counter() - t0
    return [Completion(owner[b], out[b], finished[b]) for b in range(B)]


# -- the rollout engines ---------------------------------------------------------------------------

class TorchRollout:
    """Rollouts on a PyTorch network ("engine" or "policy")."""

    def __init__(self, net: nn.Module, kind: str):
        self.net, self.kind = net, kind

    def generate(self, prompt_ids, n, max_new_tokens, *, adapters: bool = True, **kw) -> list[Completion]:
        from contextlib import nullcontext

        from homellm.train.lora import adapters_disabled
        with (nullcontext() if adapters else adapters_disabled(self.net)):
            return generate(self.net, prompt_ids, n, max_new_tokens, **kw)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class SharedAdapter:
    """network.h's LoRA adapter (hl_lora_new / hl_lora_set) over the training LoRA tensors'
    memory: no copy, so an optimizer step changes what the next rollout computes. `refresh()`
    points it at the tensors again (they stay put under AdamW; a checkpoint restore copies
    into them)."""

    def __init__(self, policy: nn.Module, num_layers: int):
        from homellm.engine.kernels import build
        from homellm.train.lora import lora_layers
        self.lib = build.load()
        self.layers = []
        for name, layer in lora_layers(policy):
            parts = name.split(".")  # model.layers.N.self_attn.q_proj
            which = PROJECTIONS.index(parts[-1])
            self.layers.append((int(parts[2]), which, layer))
        self.handle = self.lib.hl_lora_new(num_layers)
        if not self.handle:
            raise MemoryError("hl_lora_new: out of memory")
        self.refresh()

    def refresh(self):
        for layer_index, which, layer in self.layers:
            a, b = layer.lora_A, layer.lora_B
            if a.dtype != torch.float32 or b.dtype != torch.float32 or a.device.type != "cpu" \
                    or not (a.is_contiguous() and b.is_contiguous()):
                raise ValueError("the C runtime's adapters read contiguous float32 CPU tensors")
            scale = layer.scaling if layer.enabled else 0.0
            if self.lib.hl_lora_set(self.handle, layer_index, which, layer.rank, scale,
                                    a.data_ptr(), b.data_ptr()):
                raise ValueError(f"layer {layer_index} {PROJECTIONS[which]}: refused by the runtime")

    def __del__(self):
        handle, self.handle = getattr(self, "handle", None), None
        if handle:
            self.lib.hl_lora_free(handle)


class NativeRollout:
    """Rollouts on the C runtime with the policy's adapters shared (module docstring)."""

    kind = "native"

    def __init__(self, model, adapter: SharedAdapter):
        self.model, self.adapter = model, adapter
        self.cache = None

    def _cache(self, slots: int, length: int):
        from homellm.engine.kernels.native import SlotCache
        c = self.cache
        if c is None or c.slots < slots or c.max_seq_len < length:
            self.cache = c = SlotCache(self.model.args, max(slots, c.slots if c else 0),
                                       max(length, c.max_seq_len if c else 0))
        return c

    def logits(self, ids: list[int], adapters: bool = True) -> Tensor:
        """Teacher-forced logits (T, vocab) of one sequence (a check against the policy)."""
        self.adapter.refresh()
        cache = self._cache(1, len(ids))
        with self.model.lock:
            out = self.model.batch(cache, ids, range(len(ids)), [0] * len(ids), [True] * len(ids),
                                   [self.adapter if adapters else None] * len(ids))
        cache.tokens[0] = list(ids)
        return torch.from_numpy(out)

    def logprobs(self, rows: list[tuple[list[int], list[int]]], adapters: bool = False,
                 chunk: int = 512) -> Tensor:
        """log p(token | before) of every completion token of (prompt ids, completion ids) rows,
        flattened row by row (n,) as rl.completion_logprobs gives them: with adapters=False the
        reference (the base's own blocks, no adapter) computed by the C runtime. Sequences go
        through in calls of about `chunk` positions, each in its own slot."""
        import numpy as np
        self.adapter.refresh()
        ad = self.adapter if adapters else None
        cache = self._cache(len(rows), max(len(p) + len(c) for p, c in rows))
        out = []
        toks, pos, slots, want, targets = [], [], [], [], []

        def flush():
            if toks:
                with self.model.lock:
                    logits = self.model.batch(cache, toks, pos, slots, want, [ad] * len(toks))
                if targets:  # (a call of prompt positions only returns no logits)
                    m = logits.max(-1, keepdims=True)
                    lse = m[:, 0] + np.log(np.exp(logits - m).sum(-1, dtype=np.float64)).astype(np.float32)
                    out.append(logits[np.arange(len(targets)), targets] - lse)
                toks.clear(), pos.clear(), slots.clear(), want.clear(), targets.clear()

        for r, (p, c) in enumerate(rows):
            seq = p + c
            for start in range(0, len(seq) - 1, chunk):
                piece = range(start, min(start + chunk, len(seq) - 1))  # the last token predicts nothing
                if len(toks) + len(piece) > chunk:
                    flush()
                toks.extend(seq[i] for i in piece)
                pos.extend(piece)
                slots.extend([r] * len(piece))
                for i in piece:  # position i predicts token i + 1: a completion token from len(p) - 1 on
                    want.append(i >= len(p) - 1)
                    if i >= len(p) - 1:
                        targets.append(seq[i + 1])
                if start + chunk < len(seq) - 1:
                    flush()  # the rest of this sequence continues in the next call, in order
        flush()
        return torch.from_numpy(np.concatenate(out))

    def generate(self, prompt_ids, n, max_new_tokens, *, stop_ids, pad_id=0, temperature=1.0,
                 top_k=0, top_p=1.0, seed=0, stats=None, adapters: bool = True) -> list[Completion]:
        t0 = time.perf_counter()
        self.adapter.refresh()
        ad = self.adapter if adapters else None
        rows = len(prompt_ids) * n
        cache = self._cache(rows, max(len(p) for p in prompt_ids) + max_new_tokens)
        # one prefill a prompt, in slot i * n; the group's other slots copy it
        toks, pos, slots, want = [], [], [], []
        for i, p in enumerate(prompt_ids):
            toks += p
            pos += range(len(p))
            slots += [i * n] * len(p)
            want += [False] * (len(p) - 1) + [True]
        import numpy as np
        with self.model.lock:
            logits = self.model.batch(cache, toks, pos, slots, want, [ad] * len(toks))
            for i, p in enumerate(prompt_ids):
                cache.tokens[i * n] = list(p)
                for j in range(1, n):
                    cache.copy(i * n, i * n + j)
            rng = np.random.Generator(np.random.PCG64(seed))
            logits = np.repeat(logits, n, axis=0)  # (rows, vocab)
            out: list[list[int]] = [[] for _ in range(rows)]
            finished = [False] * rows
            live = list(range(rows))
            for t in range(max_new_tokens):
                token = _sample_np(logits, temperature, top_k, top_p, rng).tolist()
                keep = []
                for j, (b, tok) in enumerate(zip(live, token)):
                    out[b].append(tok)
                    finished[b] = tok in stop_ids
                    if not finished[b]:
                        keep.append(j)
                if not keep or t == max_new_tokens - 1:
                    break
                live = [live[j] for j in keep]
                feed = [token[j] for j in keep]
                positions = [len(prompt_ids[b // n]) + len(out[b]) - 1 for b in live]
                logits = self.model.batch(cache, feed, positions, live, [True] * len(live), [ad] * len(live))
        if stats is not None:
            stats.tokens += sum(len(o) for o in out)
            stats.rows += rows
            stats.seconds += time.perf_counter() - t0
        return [Completion(b // n, out[b], finished[b]) for b in range(rows)]


def native_usable(source, policy: nn.Module, device: torch.device) -> str | None:
    """Why the C runtime cannot run this policy's rollouts (None: it can)."""
    from homellm.engine.kernels import available, native
    from homellm.model.formats import detect_format
    from homellm.train.lora import lora_layers
    if device.type != "cpu":
        return "the policy trains on a GPU"
    if not available():
        return "the C kernels are not built"
    if detect_format(source) != "gguf":
        return "the policy is not a GGUF file"
    if native.unsupported_network(policy.args):
        return native.unsupported_network(policy.args)
    for name, _ in lora_layers(policy):
        if name.split(".")[-1] not in PROJECTIONS:
            return f"the adapter on {name}"
    return None


def make_rollout(policy: nn.Module, source, device: torch.device, mode: str = "auto",
                 threads: int | None = None):
    """The rollout engine for `mode` (module docstring); "native" where it cannot run is an
    error naming why, "auto" falls back to "engine", then "policy"."""
    from homellm.errors import HomellmError
    if mode in ("auto", "native"):
        why = native_usable(source, policy, device)
        if why is None:
            from homellm.engine.kernels.native import NativeModel, unsupported
            from homellm.model.formats import open_checkpoint
            ckpt = open_checkpoint(source, as_numpy=True)
            bad = unsupported(ckpt.tensors)
            if not bad:
                model = NativeModel(ckpt.args, ckpt.tensors, 8, threads=threads)
                return NativeRollout(model, SharedAdapter(policy, ckpt.args.num_hidden_layers))
            why = f"the C runtime does not take {bad[0]}"
        if mode == "native":
            raise HomellmError(f"--rollout native: {why}")
    net = rollout_network(policy, source, device, "auto" if mode == "native" else mode)
    return TorchRollout(net, "engine" if net is not policy else "policy")
