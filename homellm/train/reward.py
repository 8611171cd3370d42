"""A reward model: the base transformer with a scalar head, trained on preference pairs.

    result = train(TuneConfig(method="rm", model="smollm2", data="pairs.jsonl", out="my-rm"))
    rm = load_reward_model("my-rm")                 # RewardModel, its tokenizer, reward_config
    scores = rm.rewards([(prompt_messages, "a reply"), ...])

The model (Ouyang et al. 2022, "Training language models to follow instructions", sec. 3.5;
Stiennon et al. 2020): r(x, y) = w . h_last(x, y), the final-norm hidden state of the last
token of the prompt followed by the reply, times a trained vector (`score`, as transformers'
LlamaForSequenceClassification names and pools it). The base is frozen with LoRA adapters
(train/lora.py); the head trains fully. The loss is Bradley-Terry's on each pair:

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))

averaged over the pairs of a step (all micro-batches, all processes), so DDP under torchrun
computes what one process computes with more gradient accumulation, as in train/session.py.
The validation accuracy is the fraction of held-out pairs with r(chosen) > r(rejected).

A step computes each shared beginning once (train/prefix_tree.py): the prompt the two replies
of a pair follow, and the start every conversation of the micro-batch shares (a chat
template's default system prompt), with the rewards and gradients of separate rows and no
padding.

On disk (a PEFT-style folder, so PEFT + AutoModelForSequenceClassification(num_labels=1) can
open it too, and our runtime reads the adapter part with read_adapter's rules):

    adapter_model.safetensors   base_model.model.<module>.lora_A/B.weight, and
                                base_model.model.score.weight (1, hidden): the head
    adapter_config.json         peft_type LORA, task_type SEQ_CLS, modules_to_save ["score"]
    reward_config.json          homellm's: the base model, its tokenizer's fingerprint (a
                                policy with another tokenizer is refused), hidden size,
                                max_length, pooling "last"
    training_config.json        the resolved TuneConfig (method "rm"), as sft/dpo write it
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from homellm.errors import HomellmError
from homellm.train import checkpoint
from homellm.train import session as sessions
from homellm.train.batches import Item, collate, dpo_item, micro_batches, my_share
from homellm.train.config import TuneConfig
from homellm.train.prefix_tree import pack, takes_tree_attention

HEAD_KEY = "base_model.model.score.weight"
REWARD_CONFIG = "reward_config.json"
KIND = "homellm-reward-model"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (16 hex digits) of the vocabulary (token -> id) and the special ids: two models
    score the same text the same way only where this agrees."""
    vocab = sorted(tokenizer.backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    blob = json.dumps([vocab, tokenizer.bos_id, tokenizer.eos_id, sorted(tokenizer.eos_ids)],
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class RewardModel(nn.Module):
    """model (a Llama with LoRA layers) -> one scalar per row, read at each row's last token."""

    def __init__(self, model: nn.Module, checkpointing: bool = False, seed: int = 0):
        super().__init__()
        self.model = model
        self.checkpointing = checkpointing
        hidden = model.args.hidden_size
        device = model.model.norm.weight.device
        g = torch.Generator().manual_seed(seed)
        # transformers' initializer_range (0.02), as its score head starts
        self.score = nn.Linear(hidden, 1, bias=False, device=device)
        with torch.no_grad():
            self.score.weight.copy_(torch.randn(1, hidden, generator=g) * 0.02)
        self.tokenizer = None  # set by load_reward_model
        self.max_length = 1024

    def forward(self, tokens: Tensor, at: Tensor, positions: Tensor | None = None,
                mask=None) -> Tensor:
        """rewards (n,) read at the n tokens at[i] = (row, column) of tokens (B, T): each
        row one right-padded sequence, or (with positions and a mask or TreeAttention, see
        prefix_tree.py) a tree of sequences that share beginnings."""
        from homellm.train.loss import final_hidden
        hidden = final_hidden(self.model, tokens, self.checkpointing, positions, mask)  # (B, T, hidden)
        h = hidden.flatten(0, 1).index_select(0, at[:, 0] * tokens.shape[1] + at[:, 1])  # (n, hidden)
        return self.score(h.float())[:, 0]

    @torch.no_grad()
    def score_ids(self, rows: list[list[int]], pad_id: int, batch_tokens: int = 8192) -> list[float]:
        """Rewards of token id rows, in order (rows batched by length, right-padded)."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out = [0.0] * len(rows)
        device = self.score.weight.device
        i = 0
        while i < len(order):
            T = len(rows[order[i]])
            j = i + 1
            while j < len(order) and (j - i + 1) * max(T, len(rows[order[j]])) <= batch_tokens:
                T = max(T, len(rows[order[j]]))
                j += 1
            chunk = order[i:j]
            tokens = torch.full((len(chunk), T), pad_id, dtype=torch.long)
            for b, k in enumerate(chunk):
                tokens[b, :len(rows[k])] = torch.tensor(rows[k])
            at = torch.tensor([(b, len(rows[k]) - 1) for b, k in enumerate(chunk)])
            values = self(tokens.to(device), at.to(device)).float().cpu().tolist()
            for k, v in zip(chunk, values):
                out[k] = v
            i = j
        return out

    def encode(self, prompt: list[dict], reply: str) -> list[int]:
        """The ids the model scores: the chat template over prompt + the reply, cut to max_length."""
        from homellm.train.batches import within_reach
        messages = prompt + [{"role": "assistant", "content": reply}]
        ids, _ = self.tokenizer.encode_chat(within_reach(self.tokenizer, messages, self.max_length))
        return ids[:self.max_length]

    def rewards(self, pairs: list[tuple[list[dict], str]], batch_tokens: int = 8192) -> list[float]:
        """r(prompt, reply) for each (prompt messages, reply text)."""
        tok = self.tokenizer
        pad = tok.padding_id if tok.padding_id is not None else (tok.eos_id or 0)
        was = self.training
        self.eval()
        try:
            return self.score_ids([self.encode(p, r) for p, r in pairs], pad, batch_tokens)
        finally:
            self.train(was)


# -- training ---------------------------------------------------------------------------------

def _pair_rewards(module, s, mb, items) -> Tensor:
    """Rewards (2P,) of a micro-batch's pairs: chosen, rejected, chosen, ..."""
    rows = [ids for i in mb for ids, _ in items[i].rows]
    if s.tree:  # shared beginnings once (prefix_tree.py)
        t = pack(rows, [[2 * j, 2 * j + 1] for j in range(len(mb))]).to(s.procs.device)
        return module(t.tokens, t.at, t.positions, t.attention)
    tokens, _ = collate(items, mb, s.pad_id, s.procs.device)
    at = torch.tensor([(b, len(ids) - 1) for b, ids in enumerate(rows)], device=s.procs.device)
    return module(tokens, at)


@torch.inference_mode()
def validation(s: sessions.Session) -> dict:
    """Mean loss, pair accuracy (r(chosen) > r(rejected)) and mean margin on held-out pairs."""
    s.reward_model.eval()
    batches = micro_batches(s.val_items, list(range(len(s.val_items))), s.config.batch_tokens,
                            s.config.batch_size)
    loss, correct, margin, n = 0.0, 0.0, 0.0, 0
    for mb in batches[s.procs.rank::s.procs.world]:
        r = _pair_rewards(s.reward_model, s, mb, s.val_items)
        d = r[0::2] - r[1::2]
        loss += -F.logsigmoid(d).sum().item()
        correct += (d > 0).sum().item()
        margin += d.sum().item()
        n += len(mb)
    s.reward_model.train()
    loss, correct, margin, n = s.procs.all_sum([loss, correct, margin, n])
    n = max(n, 1)
    return {"loss": loss / n, "accuracy": correct / n, "margin": margin / n}


def _items(tokenizer, records: list[dict], max_length: int, source: str) -> tuple[list[Item], list[str]]:
    items, skipped = [], []
    for k, pair in enumerate(records):
        item = dpo_item(tokenizer, pair, max_length)
        if item is None:
            skipped.append(f"{source}: pair {k + 1}: no reply token within --max-length {max_length}")
        elif item.rows[0][0] == item.rows[1][0]:
            skipped.append(f"{source}: pair {k + 1}: chosen and rejected are the same within "
                           f"--max-length {max_length} tokens")
        else:
            items.append(item)
    return items, skipped


def setup(config: TuneConfig, resume: bool = False, progress=None) -> sessions.Session:
    """Everything before the first step (as session.setup for sft/dpo); errors raised here."""
    from homellm.data.pairs import read_pairs
    from homellm.train.base import load_base
    from homellm.train.batches import plan_steps
    from homellm.train.fused import fuse_lora
    from homellm.train.lora import apply_lora, lora_parameters
    from homellm.train.schedule import lr_factor

    if config.method != "rm":
        raise HomellmError(f"method {config.method!r}: a reward model trains with method 'rm'")
    out = sessions.run_out(config.out, resume)
    if resume:
        before = TuneConfig.load(out)
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    procs = sessions.Processes.from_env(config.device)
    torch.manual_seed(config.seed)

    data = read_pairs(config.data)
    val = read_pairs(config.val) if config.val else None
    _, tokenizer, model = load_base(config.model, config.quant, procs.device, dtype=config.dtype)
    items, skipped = _items(tokenizer, data.records, config.max_length, str(config.data))
    val_items, val_skipped = _items(tokenizer, val.records, config.max_length, str(config.val)) \
        if val else ([], [])
    if not items:
        raise HomellmError(f"{config.data}: no pair has two different replies within "
                           f"--max-length {config.max_length} tokens")
    config = config.resolved(len(items))
    if resume:
        changed = before.same_run(config)
        if changed:
            raise HomellmError(f"{out}: cannot resume: the run was started with different "
                               f"{', '.join(changed)}")
    apply_lora(model, config.lora, seed=config.seed)
    fuse_lora(model)
    model.train()
    reward_model = RewardModel(model, config.grad_checkpointing, seed=config.seed)
    reward_model.tokenizer, reward_model.max_length = tokenizer, config.max_length
    params = lora_parameters(model) + [reward_model.score.weight]
    module: nn.Module = reward_model
    if procs.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        module = DistributedDataParallel(reward_model, broadcast_buffers=False,
                                         device_ids=[procs.device] if procs.device.type == "cuda" else None)
    steps = plan_steps(items, config.batch_tokens, config.grad_accum * procs.world, config.seed,
                       config.epochs, config.max_steps, config.batch_size)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total, warmup = len(steps), config.warmup_steps_of(len(steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_factor(k, total, warmup, config.schedule, config.min_lr_ratio))
    warnings = []
    if warmup > total:
        warnings.append(f"the run has {total} optimizer steps but a warmup of {warmup}: the "
                        f"learning rate never reaches {config.lr:g}")
    pad_id = tokenizer.padding_id if tokenizer.padding_id is not None else (tokenizer.eos_id or 0)
    problems = data.problems + (val.problems if val else []) + skipped + val_skipped
    s = sessions.Session(config, procs, out, tokenizer, model, module, items, val_items, steps,
                         params, optimizer, scheduler, pad_id, skipped=problems, progress=progress,
                         threads_before=threads_before, warnings=warnings)
    s.reward_model = reward_model
    s.tree = takes_tree_attention(model)  # else a right-padded row a reply
    if progress is not None and procs.main:
        for text in warnings:
            progress({"warning": text})
    if resume:
        s.start_step, s.history = checkpoint.restore(out, params=params, optimizer=optimizer,
                                                     scheduler=scheduler)
    elif procs.main:
        sessions.create_out(out)
        config.save(out)
    s.t0 = time.perf_counter()
    return s


def train(config: TuneConfig, progress=None, resume: bool = False,
          stop_after: int | None = None) -> sessions.TuneResult:
    """Train (or resume) a reward model on preference pairs; arguments as sft.train's.
    The result's `val` holds {"step", "loss", "accuracy", "margin"} of the held-out pairs."""
    s = setup(config, resume, progress)
    step = s.start_step
    try:
        while step < len(s.steps) and (stop_after is None or step < stop_after):
            torch.manual_seed(sessions.step_seed(s.config.seed, step, s.procs.rank))
            batch = s.steps[step]
            n_pairs = sum(len(mb) for mb in batch)
            share = my_share(batch, s.procs.rank, s.procs.world)
            loss_sum = 0.0
            for j, (mb, weight) in enumerate(share):
                with s.sync(last=j == len(share) - 1):
                    r = _pair_rewards(s.module, s, mb, s.items)
                    loss = -F.logsigmoid(r[0::2] - r[1::2]).sum() * weight
                    (loss * s.procs.world / n_pairs).backward()
                loss_sum += loss.item()
            loss_mean = s.procs.all_sum([loss_sum])[0] / n_pairs
            s.update()
            step += 1
            s.after_step(step - 1, loss_mean, lambda: validation(s))
    except KeyboardInterrupt:
        s.save_checkpoint(step, barrier=False)
        raise
    return finish(s, step, stopped=step < len(s.steps))


def finish(s: sessions.Session, step: int, stopped: bool) -> sessions.TuneResult:
    if stopped:
        s.save_checkpoint(step)
    else:
        s.history["seconds"] += time.perf_counter() - s.t0
        s.t0 = time.perf_counter()
    if s.procs.main:
        save_reward_model(s.reward_model, s.config, s.out, s.tokenizer)
    s.procs.barrier()
    if s.threads_before:
        torch.set_num_threads(s.threads_before)
    h = s.history
    return sessions.TuneResult(s.out, step, list(h["losses"]), list(h["val"]), h["tokens"],
                               h["seconds"], s.skipped, stopped, s.warnings, s.config)


# -- on disk ----------------------------------------------------------------------------------

def save_reward_model(rm: RewardModel, config: TuneConfig, folder: Path, tokenizer) -> Path:
    """adapter_model.safetensors (LoRA + head), adapter_config.json, reward_config.json and
    training_config.json in `folder` (each file replaced whole)."""
    from safetensors.torch import save_file

    from homellm.train.adapter import CONFIG, WEIGHTS, adapter_tensors, peft_config
    folder = Path(folder)
    tensors = adapter_tensors(rm.model)
    tensors[HEAD_KEY] = rm.score.weight.detach().float().cpu().contiguous()
    peft = {**peft_config(config.lora, config.model), "task_type": "SEQ_CLS",
            "modules_to_save": ["score"]}
    info = {"kind": KIND, "version": 1, "base_model": _base_ref(config.model),
            "tokenizer": tokenizer_fingerprint(tokenizer), "vocab_size": tokenizer.vocab_size,
            "hidden_size": rm.model.args.hidden_size, "max_length": config.max_length,
            "pooling": "last", "head": "score"}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".adapter.", suffix=".part")
        os.close(fd)
        save_file({k: v.cpu() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, folder / WEIGHTS)
        (folder / CONFIG).write_text(json.dumps(peft, indent=2) + "\n")
        (folder / REWARD_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
        config.save(folder)
    except OSError as e:
        raise HomellmError(f"cannot write the reward model to {folder}: {e.strerror or e}") from None
    return folder


def _base_ref(model: str | None) -> str | None:
    """How reward_config.json names the base: a catalog name as given, a path made absolute."""
    if model is None:
        return None
    path = Path(model).expanduser()
    from homellm.catalog.library import find
    if find(model) is None and path.exists():
        return str(path.resolve())
    return model


def rewards_dir() -> Path:
    from homellm.catalog.library import home
    return home() / "rewards"


def find_reward_model(name_or_path: str | Path) -> Path:
    """A reward model folder: a path, or a name under $HOMELLM_HOME/rewards/."""
    path = Path(name_or_path).expanduser()
    if not path.exists() and "/" not in str(name_or_path) and (rewards_dir() / str(name_or_path)).exists():
        path = rewards_dir() / str(name_or_path)
    if not (path / REWARD_CONFIG).is_file():
        if path.is_dir() and (path / "adapter_config.json").is_file():
            raise HomellmError(f"{path}: a LoRA adapter, not a reward model (no {REWARD_CONFIG}; "
                               f"train one with `homellm tune rm`)")
        raise HomellmError(f"{name_or_path}: not a reward model folder (expected {REWARD_CONFIG} "
                           f"from `homellm tune rm`, as a path or a name under {rewards_dir()})")
    return path


@dataclass
class RewardInfo:
    folder: Path
    base_model: str | None
    tokenizer: str
    hidden_size: int
    max_length: int


def read_reward_info(folder: Path) -> RewardInfo:
    path = Path(folder) / REWARD_CONFIG
    try:
        d = json.loads(path.read_text())
        if d.get("kind") != KIND:
            raise KeyError("kind")
        return RewardInfo(Path(folder), d.get("base_model"), str(d["tokenizer"]), int(d["hidden_size"]),
                          int(d.get("max_length") or 1024))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HomellmError(f"{path}: not a homellm reward model config ({e})") from None


def check_tokenizer(info: RewardInfo, tokenizer, who: str) -> None:
    """HomellmError when `tokenizer` (of `who`) is not the one the reward model was trained with."""
    mine = tokenizer_fingerprint(tokenizer)
    if mine != info.tokenizer:
        raise HomellmError(
            f"the reward model {info.folder} was trained on a base with another tokenizer "
            f"(fingerprint {info.tokenizer}) than {who} ({mine}, vocabulary of {tokenizer.vocab_size}): "
            f"a reward model must share the tokenizer of the model it scores; train one on it "
            f"with `homellm tune rm -m <that model> --data PAIRS`")


def load_reward_model(name_or_path: str | Path, base: str | None = None, device: str = "cpu",
                      dtype: str = "float32", quant: str = "none") -> RewardModel:
    """The reward model in a folder, on its recorded base (or `base`, which must have the same
    tokenizer), in eval mode; `.tokenizer`, `.info` and `.rewards(pairs)` ready to use."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from homellm.train.adapter import KEY, WEIGHTS
    from homellm.train.base import load_base
    from homellm.train.lora import apply_lora, lora_layers
    folder = find_reward_model(name_or_path)
    info = read_reward_info(folder)
    base = base if base is not None else info.base_model
    try:
        tensors = load_file(folder / WEIGHTS)
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError, SafetensorError) as e:
        raise HomellmError(f"{folder}: cannot read the reward model: {e}") from None
    head = tensors.pop(HEAD_KEY, None)
    if head is None or tuple(head.shape) != (1, info.hidden_size):
        raise HomellmError(f"{folder / WEIGHTS}: no score head {HEAD_KEY} of shape (1, {info.hidden_size})")
    _, tokenizer, model = load_base(base, quant, device, dtype=dtype)
    check_tokenizer(info, tokenizer, f"the base {base or 'default model'}")
    if model.args.hidden_size != info.hidden_size:
        raise HomellmError(f"{folder}: the head takes hidden size {info.hidden_size}, the base "
                           f"{base} has {model.args.hidden_size}")
    from homellm.train.config import LoraConfig
    targets = config.get("target_modules") or []
    lora = LoraConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                      targets=[t.removesuffix("_proj") for t in targets])
    apply_lora(model, lora)
    layers = dict(lora_layers(model))
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = KEY.match(key)
        if not m or m.group(1) not in layers:
            raise HomellmError(f"{folder / WEIGHTS}: unexpected tensor {key} for this base")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    with torch.no_grad():
        for name, layer in layers.items():
            if name not in pairs:
                layer.enabled = False
                continue
            a, b = pairs[name].get("A"), pairs[name].get("B")
            if a is None or b is None or a.shape != layer.lora_A.shape or b.shape != layer.lora_B.shape:
                raise HomellmError(f"{folder}: {name}: the adapter does not fit this base")
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
    model.requires_grad_(False)
    rm = RewardModel(model)
    with torch.no_grad():
        rm.score.weight.copy_(head.to(rm.score.weight.device))
    rm.requires_grad_(False)
    rm.tokenizer, rm.max_length, rm.info = tokenizer, info.max_length, info
    return rm.eval()
