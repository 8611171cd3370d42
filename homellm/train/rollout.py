"""Rollouts for PPO and GRPO: many completions sampled at once from the policy as it is now.

    net = rollout_network(policy, checkpoint_path, device)   # the engine's network, sharing LoRA
    done = generate(net, prompt_ids, n=4, max_new_tokens=64, temperature=1.0, seed=7,
                    stop_ids=tokenizer.eos_ids, pad_id=pad)   # [Completion], prompt by prompt

Generation dominates the cost of RL. The network that generates is the engine's own for the
policy's base: on a CPU, a GGUF file's quantized blocks computed by our C kernels
(engine/loader.py: GGMLLinear, the same layers `homellm run --adapter` uses), each adapted
projection wrapped in a LoRALinear whose A and B are *the training parameters themselves*
(the same tensors, not copies): every optimizer step changes what the next rollout samples,
with nothing to reload or copy. Elsewhere (a Hugging Face folder, a GPU) the training network
itself generates, its adapters on. Old log-probabilities are always computed again by the
training network (as TRL and OpenRLHF do after vLLM), so a rollout network that rounds
differently only changes which samples are drawn, never the gradient's formula.

(The C runtime's batch call takes per-row LoRA adapters as pointers to float A/B matrices, the
one-engine direction of engine/kernels/network.h: once NativeModel exposes it, the same
shared-tensor trick runs rollouts without PyTorch layers at all; see NOTES below.)

Batching: the prompts are left-padded to one length, so all rows decode at the same position
(one attention call per layer for the whole batch, with a mask that hides the padding); RoPE
depends on relative positions only, so a row's logits equal those of the row alone up to float
rounding. Rows that finish leave the batch (the cache keeps only live rows). Sampling draws
from a torch.Generator seeded per call: a resumed run draws the same completions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

# NOTES: what the one-engine rollout adds, once engine/kernels/native.py's batch() with
# per-row LoraAdapter is committed: whole decode steps in one C call (no Python per layer),
# int8 activations on the packed Q4/Q8 kernels, C attention per row without padding; the
# adapters' A/B pointers are the training tensors' memory (float32, contiguous, updated in
# place by AdamW), so the same zero-copy sharing holds.


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


@torch.inference_mode()
def generate(net: nn.Module, prompt_ids: list[list[int]], n: int, max_new_tokens: int, *,
             stop_ids: set[int], pad_id: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stats: RolloutStats | None = None) -> list[Completion]:
    """`n` completions of each prompt, in order (prompt 0's n, then prompt 1's, ...)."""
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
