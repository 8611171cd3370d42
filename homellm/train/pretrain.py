"""Pretraining a LLaMA-family model from scratch on a tokenized corpus (data/shards.py).

The network is model/llama.py's `Llama`, shaped by a size dial: depth D (nanochat's dial)
sets width 64 D, D heads of 64, a SwiGLU hidden size of ~8/3 the width, tied embeddings, and
a compute-optimal budget of 20 tokens per parameter (Hoffmann et al. 2022) unless --steps or
--tokens say otherwise. Initialization is GPT-2's: N(0, 0.02) everywhere, the projections
that write into the residual stream (o_proj, down_proj) scaled by 1/sqrt(2 x layers).

The data plan is fixed by the seed: the train tokens are cut into windows of seq_len + 1,
each epoch visits them in a permutation drawn from seed + epoch, and step k takes the next
batch_tokens / seq_len windows, split into micro-batches of `device_batch` windows; process r
of W computes micro-batches r, r + W, ... So a step's data depends on the step number alone
(a checkpoint stores the step), and W processes compute the update one process computes with
W times the gradient accumulation: the loss of each micro-batch is its summed cross-entropy
over the global step's token count, times W (DDP averages).

The loop reuses train/: the LR warmup and cosine (schedule.py), the final hidden states
(loss.py), exact-resume checkpoints (checkpoint.py) and the process group (session.py).

Speed: torch.compile where it measured faster (compile_default; a failed compile falls back
to eager), block causal attention where it beats SDPA (choose_attention), MFU against the
datapath's peak (describe_peak_flops); benchmarks/pretrain_bench.py has the numbers.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from homellm.errors import HomellmError
from homellm.model.config import ModelArgs
from homellm.train.pretrain_config import (HISTORY_FILE, TOKENS_PER_PARAM, PretrainConfig,
                                          flops_per_token, model_args)


def build_model(args: ModelArgs, seed: int, device="cpu") -> nn.Module:
    """A freshly initialized Llama (float32), its head tied to the embedding table if asked."""
    from homellm.model.llama import Llama
    torch.manual_seed(seed)
    model = Llama(args, device=device)
    std = 0.02
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                scaled = name.endswith(("o_proj.weight", "down_proj.weight"))
                p.normal_(0.0, std / math.sqrt(2 * args.num_hidden_layers) if scaled else std)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


class FusedQKV:
    """x -> (q, k, v) in one matmul over the three weights concatenated (the gradient flows
    back through the concatenation to each): one large GEMM instead of three small ones."""

    def __init__(self, attn: nn.Module):
        self.attn = attn

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        a = self.attn
        w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        b = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        return F.linear(x, w, b).split(
            [a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features], dim=-1)


class FusedGateUp:
    """x -> silu(gate_proj(x)) * up_proj(x), the two projections in one matmul."""

    def __init__(self, mlp: nn.Module):
        self.mlp = mlp

    def __call__(self, x: Tensor) -> Tensor:
        m = self.mlp
        gate, up = F.linear(x, torch.cat([m.gate_proj.weight, m.up_proj.weight])).chunk(2, dim=-1)
        return F.silu(gate) * up


def fuse_projections(model: nn.Module) -> None:
    """Train through the fused paths model/llama.py offers (qkv_proj, gate_up_proj)."""
    for layer in model.model.layers:
        layer.self_attn.qkv_proj = FusedQKV(layer.self_attn)
        layer.mlp.gate_up_proj = FusedGateUp(layer.mlp)


ATTENTION_BLOCK = 128  # queries per block of block_causal_attention
BLOCKS_MEMORY = 1 << 30  # at most this many bytes of probabilities kept for the backward


def block_causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention as explicit matmuls over blocks of ATTENTION_BLOCK queries: block
    [s, e) scores its queries against keys 0 .. e - 1 only, so of the T x T scores the upper
    triangle is skipped but for the diagonal blocks. Per block: (q / sqrt(d)) k^T in the
    input's dtype (bf16 under autocast), the causal mask, softmax in float32, probabilities
    back in v's dtype times v. SDPA's math (tests/test_pretrain_speed.py checks loss and
    gradients against it); on a CPU at short contexts faster forward + backward than SDPA's
    flash kernel (2.2x at T = 512 compiled, bf16: benchmarks/pretrain_bench.py), at the cost
    of keeping each block's probabilities (B x heads x T^2 / 2 elements a layer) for the
    backward. q (B, H, T, d), k and v (B, H_kv, T, d) -> (B, T, H * d)."""
    B, H, T, d = q.shape
    if k.shape[1] != H:  # grouped-query attention: each key/value head serves H / H_kv queries
        k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    from homellm.model.llama import causal_mask
    mask = causal_mask(T, T, q.device)
    q = q * d ** -0.5
    out = []
    for s in range(0, T, ATTENTION_BLOCK):
        e = min(T, s + ATTENTION_BLOCK)
        scores = q[:, :, s:e] @ k[:, :, :e].transpose(-1, -2)  # (B, H, e - s, e)
        scores = scores.masked_fill(~mask[s:e, :e], float("-inf"))
        p = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v.dtype)
        out.append(p @ v[:, :, :e])  # (B, H, e - s, d)
    return torch.cat(out, dim=2).transpose(1, 2).reshape(B, T, H * d)


def choose_attention(config: PretrainConfig, args: ModelArgs, device: torch.device,
                     compiled: bool) -> str:
    """'blocks' (block_causal_attention) or 'sdpa' (PyTorch's fused kernel: flash attention)
    for --attention auto: blocks on a CPU up to the contexts where they measured faster
    (512 eager, 1024 compiled) and while the probabilities they keep fit BLOCKS_MEMORY;
    SDPA on a GPU and for long contexts."""
    if config.attention != "auto":
        return config.attention
    if device.type != "cpu" or config.seq_len > (1024 if compiled else 512):
        return "sdpa"
    T = config.seq_len
    kept = config.device_batch * args.num_attention_heads * T * (T + ATTENTION_BLOCK) // 2 \
        * 6 * args.num_hidden_layers  # float32 softmax output + its bf16 copy, every layer
    return "blocks" if kept <= BLOCKS_MEMORY else "sdpa"


def use_blocks(model: nn.Module) -> None:
    """Make every layer's causal attention block_causal_attention (model/llama.py's
    attention_fn: taken where the layer has no window, mask or other scale)."""
    for layer in model.model.layers:
        layer.self_attn.attention_fn = block_causal_attention


def compile_default(config: PretrainConfig, device: torch.device) -> bool:
    """--compile unless given: on a GPU, and on a CPU in bfloat16, where torch.compile's fused
    kernels measured faster than eager (1.4x a step at depth 4 on a Zen 4 core, after 24-36 s
    of compiling once); not in float32 on a CPU (1.1x here, but float32 is the default only on
    CPUs without bf16 units, where it is unmeasured), nor under FSDP (untested)."""
    if config.compile is not None:
        return config.compile
    return (device.type == "cuda" or config.dtype == "bfloat16") and not config.fsdp


def estimate_peak_flops(device: torch.device, dtype: str, threads: int) -> float:
    """A peak FLOP/s for MFU; how it is derived: describe_peak_flops."""
    return describe_peak_flops(device, dtype, threads)[0]


def describe_peak_flops(device: torch.device, dtype: str, threads: int,
                        cpuinfo: str | None = None) -> tuple[float, str]:
    """(peak FLOP/s, how it was derived) for MFU: a GPU's dense bf16 rate from its name (fp32:
    half); a CPU's threads x clock x FLOPs per cycle, where FLOPs per cycle = 2 FMA pipes x
    the float32 lanes of the datapath x 2 (multiply + add), x2 for AVX512-BF16 dot products
    (two bf16 products per float32 lane), or 1024 with AMX-BF16 tiles. The datapath is the
    hardware's, not the instruction set's: Zen 4 (AMD family 0x19) runs AVX512 on 256-bit
    units, 8 float32 lanes (32 FLOPs/cycle), not 16. The clock is the highest the kernel
    reports (cpufreq's maximum, else /proc/cpuinfo's MHz, which a VM often gives as the base
    clock: a CPU that boosts above it then shows an MFU above the truth). `cpuinfo`: the text
    of a /proc/cpuinfo to read instead of this machine's (its MHz then taken as the clock)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "4090": 165e12,
                 "A10": 125e12, "3090": 71e12, "T4": 65e12}
        peak = next((v for k, v in table.items() if k in name), 100e12)
        peak = peak if dtype == "bfloat16" else peak / 2
        return peak, f"{name}: {peak / 1e12:.0f} TFLOP/s dense {dtype} (from its name)"
    info: dict[str, str] = {}
    mhz = 2500.0
    try:
        for line in (cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()).splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
        mhz = float(info.get("cpu MHz", mhz))
        if cpuinfo is None:
            mhz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000
    except (OSError, ValueError):
        pass
    flags = set(info.get("flags", "").split())
    amd_256 = info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25"
    if "avx512f" in flags:
        lanes, unit = (8, "AVX512 on 256-bit units (AMD family 0x19)") if amd_256 else (16, "AVX512")
    elif "fma" in flags:
        lanes, unit = 8, "AVX2 FMA"
    else:
        lanes, unit = 2, "SSE, no FMA"  # 2 pipes x 4 lanes, multiply and add apart
    per_cycle = 2 * lanes * 2
    if dtype == "bfloat16" and "amx_bf16" in flags:
        per_cycle, unit = 1024, "AMX-BF16"
    elif dtype == "bfloat16" and "avx512_bf16" in flags:
        per_cycle, unit = per_cycle * 2, unit + " + AVX512-BF16"
    peak = threads * mhz * 1e6 * per_cycle
    return peak, (f"{threads} thread(s) x {mhz / 1000:.2f} GHz x {per_cycle} {dtype} FLOPs/cycle "
                  f"({unit})")


def lr_factor(step: int, total: int, warmup: int, config: PretrainConfig) -> float:
    """Warmup then cosine (schedule.py) or warmup-stable-decay: constant until the last
    `decay` fraction of the steps, then linear to min_lr_ratio (Hu et al. 2024, MiniCPM)."""
    from homellm.train.schedule import lr_factor as warmup_cosine
    if config.schedule != "wsd" or step < warmup:
        return warmup_cosine(step, total, warmup, config.schedule, config.min_lr_ratio)
    decay_steps = max(1, round(config.decay * total))
    start = total - decay_steps
    if step < start:
        return 1.0
    progress = (step - start + 1) / decay_steps
    return 1.0 - (1.0 - config.min_lr_ratio) * min(1.0, progress)


# ---------------------------------------------------------------- data

class Windows:
    """The train tokens as windows of seq_len + 1 (stride seq_len) across the shards."""

    def __init__(self, shards: list, seq_len: int, seed: int):
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        counts = [max(0, (len(s) - 1) // seq_len) for s in shards]
        self.starts = np.cumsum([0] + counts)
        self.n = int(self.starts[-1])
        self._perm: tuple[int, Tensor] | None = None

    def window(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.starts, i, side="right") - 1)
        off = (i - int(self.starts[s])) * self.seq_len
        return np.asarray(self.shards[s][off:off + self.seq_len + 1], dtype=np.int64)

    def global_index(self, k: int) -> int:
        """The k-th window of the run: epoch k // n, in that epoch's permutation."""
        epoch, j = divmod(k, self.n)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][j])

    def batch(self, ks: list[int]) -> Tensor:
        return torch.from_numpy(np.stack([self.window(self.global_index(k)) for k in ks]))


def val_windows(shards: list, seq_len: int, max_tokens: int) -> list[np.ndarray]:
    """The first max_tokens of the validation split as windows of seq_len + 1 (the last one
    shorter when the split ends)."""
    out, budget = [], max_tokens
    for s in shards:
        off = 0
        while budget > 0 and off + 2 <= len(s):
            n = min(seq_len, budget, len(s) - off - 1)
            out.append(np.asarray(s[off:off + n + 1], dtype=np.int64))
            off += n
            budget -= n
        if budget <= 0:
            break
    return out


# ---------------------------------------------------------------- loss

LOGITS_BYTES = 256 << 20  # above this many bytes of float32 logits, the head runs in chunks


class LMLoss(nn.Module):
    """model -> summed next-token cross-entropy of (B, T) inputs against (B, T) targets;
    a module so that DDP / FSDP can wrap it."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.autocast = dtype

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        from homellm.train.loss import final_hidden
        with torch.autocast(inputs.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            h = final_hidden(self.model, inputs).flatten(0, 1)  # (B*T, hidden)
            t = targets.flatten()
            head = self.model.lm_head
            n, vocab = h.shape[0], head.weight.shape[0]
            if n * vocab * 4 <= LOGITS_BYTES:
                return F.cross_entropy(head(h).float(), t, reduction="sum")
            # chunks whose logits are made again in the backward: peak memory one chunk
            chunk = max(1, LOGITS_BYTES // (vocab * 4))
            total = h.new_zeros((), dtype=torch.float32)
            for s in range(0, n, chunk):
                total = total + torch.utils.checkpoint.checkpoint(
                    _chunk_loss, head, h[s:s + chunk], t[s:s + chunk], use_reentrant=False)
            return total


def _chunk_loss(head: nn.Module, h: Tensor, t: Tensor) -> Tensor:
    return F.cross_entropy(head(h).float(), t, reduction="sum")


# ---------------------------------------------------------------- the run

@dataclass
class PretrainResult:
    out: Path
    steps: int
    losses: list[float]
    val: list[dict]
    tokens: int
    seconds: float
    n_params: int
    stopped: bool = False
    config: PretrainConfig | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _param_groups(model: nn.Module, config: PretrainConfig) -> list[dict]:
    matrices, other = [], []
    embed = model.model.embed_tokens.weight
    for p in {id(p): p for p in model.parameters()}.values():
        (matrices if p.dim() == 2 and p is not embed else other).append(p)
    if config.optimizer == "muon":
        return [dict(params=matrices, lr=config.muon_lr, muon=True, weight_decay=config.weight_decay),
                dict(params=other, lr=config.lr, muon=False, weight_decay=0.0)]
    return [dict(params=matrices, weight_decay=config.weight_decay),
            dict(params=other, weight_decay=0.0)]


def _setup_out(config: PretrainConfig, resume: bool) -> Path:
    from homellm.train import checkpoint
    from homellm.train.session import writable_out
    out = writable_out(config.out)
    if resume and config.fsdp:
        raise HomellmError("--fsdp runs cannot be resumed yet (they keep no checkpoint)")
    if resume:
        if not checkpoint.path_in(out).is_file():
            raise HomellmError(f"{out}: no checkpoint to resume from ({checkpoint.path_in(out)} is missing)")
        changed = PretrainConfig.load(out).same_run(config)
        if changed:
            raise HomellmError(f"{out}: cannot resume: the run was started with different "
                               f"{', '.join(changed)}")
    elif checkpoint.path_in(out).is_file() or (out / "model.safetensors").is_file():
        raise HomellmError(f"{out}: holds an earlier run; resume it (--resume) or choose another folder")
    return out


def pretrain(config: PretrainConfig, progress=None, resume: bool = False,
             stop_after: int | None = None) -> PretrainResult:
    """Run (or resume) pretraining; `progress(dict)` after each step. `stop_after=k` stops
    after step k with a checkpoint, as an interrupted run would."""
    from homellm.data.shards import open_tokens
    from homellm.train import checkpoint
    from homellm.train.session import Processes, create_out

    out = _setup_out(config, resume)
    data = open_tokens(Path(config.data))
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    procs = Processes.from_env(config.device)
    args = model_args(config.the_depth, data.vocab_size, config.seq_len)
    windows = Windows(data.train, config.seq_len, config.seed)
    if windows.n == 0:
        raise HomellmError(f"{config.data}: the train split has {sum(len(s) for s in data.train)} "
                           f"tokens; --seq-len {config.seq_len} needs at least {config.seq_len + 1}")
    per_micro = config.seq_len * config.device_batch
    if config.batch_tokens % (per_micro * procs.world):
        raise HomellmError(f"--batch-tokens {config.batch_tokens} is not a multiple of seq_len x "
                           f"device_batch x processes = {config.seq_len} x {config.device_batch} x "
                           f"{procs.world} = {per_micro * procs.world}")
    accum = config.batch_tokens // (per_micro * procs.world)
    n_params = args.n_params
    if config.steps:
        total = config.steps
    else:
        budget = config.tokens or TOKENS_PER_PARAM * n_params
        total = max(1, math.ceil(budget / config.batch_tokens))
    warmup = math.ceil(config.warmup * total) if config.warmup < 1 else int(config.warmup)

    model = build_model(args, config.seed, procs.device)
    if config.fuse:
        fuse_projections(model)
    compiling = compile_default(config, procs.device)
    attention = choose_attention(config, args, procs.device, compiling)
    if attention == "blocks":
        use_blocks(model)
    model.train()
    amp = torch.bfloat16 if config.dtype == "bfloat16" else None
    module: nn.Module = LMLoss(model, amp)
    if procs.world > 1 and config.fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(module)
    elif procs.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        module = DistributedDataParallel(
            module, device_ids=[procs.device] if procs.device.type == "cuda" else None)
    forward = torch.compile(module) if compiling else module
    groups = _param_groups(model, config)
    if config.optimizer == "muon":
        from homellm.train.muon import Muon
        optimizer = Muon(groups)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, config))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    history = {"losses": [], "val": [], "tokens": 0, "seconds": 0.0}
    start = 0
    if resume:
        start, history = checkpoint.restore(out, params=params, optimizer=optimizer,
                                            scheduler=scheduler)
    elif procs.main:
        create_out(out)
        config.save(out)
    procs.barrier()
    flops = flops_per_token(args, config.seq_len)
    peak, peak_how = describe_peak_flops(procs.device, config.dtype, torch.get_num_threads() * procs.world)
    if config.peak_flops:
        peak, peak_how = config.peak_flops, "given (--peak-flops)"
    val = val_windows(data.val, config.seq_len, config.val_tokens)
    bytes_per_token = data.bytes_per_token("val")
    seqs_per_step = config.batch_tokens // config.seq_len
    step_tokens = seqs_per_step * config.seq_len
    if progress is not None and procs.main:
        progress({"start": True, "step": start, "total": total, "n_params": n_params, "args": args,
                  "accum": accum, "world": procs.world, "tokens_total": total * step_tokens,
                  "peak_flops": peak, "peak_how": peak_how, "warmup": warmup,
                  "compile": compiling, "attention": attention})

    sharded = procs.world > 1 and config.fsdp

    def validate() -> dict:
        # each process a share; under FSDP every process runs every window (each forward
        # gathers the layers from all of them, so they must make the same calls)
        model.eval()
        nll, n = 0.0, 0
        scorer = module if sharded else LMLoss(model, amp)
        with torch.no_grad():
            for w in (val if sharded else val[procs.rank::procs.world]):
                x = torch.from_numpy(w).to(procs.device)[None]
                nll += scorer(x[:, :-1], x[:, 1:]).item()
                n += x.shape[1] - 1
        model.train()
        if not sharded:
            nll, n = procs.all_sum([nll, n])
        loss = nll / max(n, 1)
        return {"loss": loss, "bpb": loss / math.log(2) / bytes_per_token, "tokens": int(n)}

    step = start
    compiled_once = False
    t0 = run_t0 = time.perf_counter()
    try:
        while step < total and (stop_after is None or step < stop_after):
            first = step * seqs_per_step
            micro = [list(range(first + m * config.device_batch, first + (m + 1) * config.device_batch))
                     for m in range(accum * procs.world)]
            mine = micro[procs.rank::procs.world]
            loss_sum = 0.0
            for j, ks in enumerate(mine):
                batch = windows.batch(ks).to(procs.device)
                last = j == len(mine) - 1
                sync = module.no_sync() if procs.world > 1 and not last and not config.fsdp \
                    else contextlib.nullcontext()
                if config.fsdp and procs.world > 1:
                    module.set_requires_gradient_sync(last)
                with sync:
                    if forward is not module and not compiled_once:
                        loss, forward = _first_compiled(forward, module, batch, procs, step_tokens,
                                                        optimizer, progress if procs.main else None)
                        compiled_once = True
                    else:
                        loss = forward(batch[:, :-1], batch[:, 1:])
                        (loss * (procs.world / step_tokens)).backward()
                loss_sum += loss.item()
            loss_mean = procs.all_sum([loss_sum])[0] / step_tokens
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history["losses"].append(loss_mean)
            history["tokens"] += step_tokens
            result_val = None
            if val and ((config.val_every and step % config.val_every == 0) or step == total):
                result_val = {"step": step, **validate()}
                history["val"].append(result_val)
            if config.save_every and step % config.save_every == 0 and step < total:
                history["seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                _save(out, procs, step, params, optimizer, scheduler, history)
            if progress is not None and procs.main:
                tps = (step - start) * step_tokens / max(time.perf_counter() - run_t0, 1e-9)
                progress({"step": step, "total": total, "loss": loss_mean,
                          "lr": scheduler.get_last_lr()[0], "tokens": history["tokens"],
                          "tokens_per_s": tps, "mfu": tps * flops / peak, "val": result_val})
    except KeyboardInterrupt:  # Ctrl-C: keep what was done, to resume from
        if not config.fsdp:
            history["seconds"] += time.perf_counter() - t0
            _save(out, procs, step, params, optimizer, scheduler, history, barrier=False)
        raise
    history["seconds"] += time.perf_counter() - t0
    stopped = step < total
    if stopped and not config.fsdp:
        _save(out, procs, step, params, optimizer, scheduler, history)
    state = _full_state(model, config, procs)
    if procs.main:
        save_model(out, args, state, Path(config.data))
        (out / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n")
    procs.barrier()
    if config.threads:
        torch.set_num_threads(threads_before)
    return PretrainResult(out, step, list(history["losses"]), list(history["val"]),
                          history["tokens"], history["seconds"], n_params, stopped, config)


def _first_compiled(compiled, eager: nn.Module, batch: Tensor, procs, step_tokens: int,
                    optimizer, progress) -> tuple[Tensor, nn.Module]:
    """The first micro-batch through the torch.compile'd module, which compiles it (forward
    and backward: tens of seconds on a CPU; progress hears {"compiling": True}, then
    {"compiled": seconds}). If compiling fails (no C++ compiler for inductor, an operation it
    cannot take, ...), the run goes on eager from the same micro-batch, progress hearing
    {"compile_failed": why}; under torchrun the processes must agree, so it is an error there.
    Returns (the micro-batch's loss, the forward to use from now on)."""
    if progress is not None:
        progress({"compiling": True})
    t0 = time.perf_counter()
    try:
        loss = compiled(batch[:, :-1], batch[:, 1:])
        (loss * (procs.world / step_tokens)).backward()
    except (MemoryError, HomellmError):
        raise
    except Exception as e:  # torch.compile fails in many types (dynamo, inductor, the C++ build)
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        if procs.world > 1:
            raise HomellmError(f"torch.compile failed ({why}); run again with --no-compile") from None
        optimizer.zero_grad(set_to_none=True)  # whatever the failed backward accumulated
        if progress is not None:
            progress({"compile_failed": why})
        loss = eager(batch[:, :-1], batch[:, 1:])
        (loss * (procs.world / step_tokens)).backward()
        return loss, eager
    if progress is not None:
        progress({"compiled": time.perf_counter() - t0})
    return loss, compiled


def _save(out, procs, step, params, optimizer, scheduler, history, barrier=True):
    """A resumable checkpoint (checkpoint.py's format), written by the first process."""
    from homellm.train import checkpoint
    if procs.main:
        checkpoint.save(out, step=step, params=params, optimizer=optimizer, scheduler=scheduler,
                        history=history)
    if barrier:
        procs.barrier()


def _full_state(model: nn.Module, config: PretrainConfig, procs) -> dict[str, Tensor]:
    """The whole model's tensors on the CPU (gathered from every process under FSDP)."""
    if procs.world > 1 and config.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_model(out: Path, args: ModelArgs, state: dict[str, Tensor], corpus: Path) -> Path:
    """config.json, model.safetensors (float32), tokenizer.json and tokenizer_config.json
    (the corpus's, chat template included) into `out`, each moved in once complete."""
    from homellm.model.formats.hf import write_hf
    from homellm.tokenizer import Tokenizer
    tok = Tokenizer.from_hf_folder(corpus)
    tokenizer_json, tokenizer_config = tok.to_hf_files()
    staging = Path(tempfile.mkdtemp(prefix=".model.", dir=out))
    try:
        folder = write_hf(staging / "model", args, state, dtype=torch.float32,
                          tokenizer_json=tokenizer_json, tokenizer_config=tokenizer_config,
                          chat_template=None if tok.chat_template.is_fallback else tok.chat_template.source)
        for f in folder.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def unigram_entropy(shards: list, vocab_size: int) -> float:
    """Entropy (nats) of the tokens' unigram distribution: the loss of the best model that
    ignores context."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for s in shards:
        counts += np.bincount(np.asarray(s), minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
