"""Pretraining speed, memory and loss: `homellm pretrain` against Hugging Face transformers'
LlamaForCausalLM in a plain training loop; and data preparation MB/s against datatrove.

Pretraining. Same network (the depth dial's Llama: --depth, vocab of the corpus, tied
embeddings), same initial weights (ours, seeded, loaded into LlamaForCausalLM by name), same
data (the corpus's windows in the same order: homellm.train.pretrain.Windows), same batch and
micro-batches, same optimizer (AdamW betas 0.9/0.95, weight decay 0.1 on matrices), same
warmup + cosine, same clipping, same threads. Each run is its own process (this script with
--side). Rows, side by side:

- float32: ours as `--dtype float32` gives it (eager, attention auto) vs transformers float32
  eager (attn_implementation="sdpa", its default);
- bfloat16: ours as `--dtype bfloat16` gives it (torch.compile + attention auto), ours eager
  (`--no-compile`), vs transformers under bf16 autocast, eager (as a user runs it; the
  Trainer's bf16=True is the same autocast);
- defaults: what each gives a user who sets nothing: ours (`--dtype auto`: bfloat16 where the
  CPU multiplies it natively) vs transformers' float32 (the Trainer's default), reusing the
  rows above.

tokens/s is measured over steps 2..N-1 (the first compiles or warms up, the last validates),
also as CPU seconds a step (the process's CPU time: what a busy machine inflates least at one
thread); peak memory is the process's peak RSS; both report the validation loss at the end on
the same windows. MFU uses the same FLOPs per token for every side, against the peak that
homellm.train.pretrain.describe_peak_flops derives (printed), and also as a fraction of the
matmul rate this machine measures in that dtype (a 2048^3 torch.matmul, same threads).
`--ablations` adds ours with SDPA attention and with the fused projections.

Data preparation. The same input (synthetic documents with planted exact and near copies, or
--prep-source) through `homellm data prepare` (read, normalize, filter, exact + MinHash dedup,
write) and through datatrove's pipeline doing the same steps alone (JsonlReader, Gopher
repetition filter, the four MinHash dedup stages, JsonlWriter), each in its own process:
input MB / wall second. datatrove lives in a virtualenv outside the repository:

    python3 -m venv /root/peers/datatrove
    /root/peers/datatrove/bin/pip install datatrove orjson regex tokenizers spacy "xxhash<4"
    (datatrove 0.10.1 imports these without declaring them; it hashes str, which xxhash 4 refuses)

    python benchmarks/pretrain_bench.py                      # the full comparison (minutes)
    python benchmarks/pretrain_bench.py --smoke              # a tiny one, to check it runs
    python benchmarks/pretrain_bench.py --data DIR --depth 4 --threads 2 --dtype bfloat16
    python benchmarks/pretrain_bench.py --datatrove-python /root/peers/datatrove/bin/python

Prints one JSON object: each side's numbers and the ratios ours / theirs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_ENV = dict(os.environ)
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- inputs

def synthetic_corpus(folder: Path, n_docs: int, vocab: int, seed: int = 0) -> Path:
    """A prepared + tokenized corpus of grammar text (tests/pretrain_fixtures.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pretrain_fixtures import make_corpus
    return make_corpus(folder, n_docs=n_docs, vocab=vocab, seed=seed)


def synthetic_documents(path: Path, megabytes: float, seed: int = 0) -> Path:
    """JSONL documents of random words (~2 KB each), 5% exact and 5% near copies planted."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(20000)]
    docs, size = [], 0
    while size < megabytes * 1e6:
        r = rng.random()
        if docs and r < 0.05:
            text = rng.choice(docs)
        elif docs and r < 0.10:
            w = rng.choice(docs).split(" ")
            for _ in range(3):
                w[rng.randrange(len(w))] = "changed"
            text = " ".join(w)
        else:
            text = " ".join(rng.choice(words) for _ in range(350))
        docs.append(text)
        size += len(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for t in docs:
            f.write(json.dumps({"text": t}) + "\n")
    return path


# ---------------------------------------------------------------- one side, in its own process

def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM, the high-water mark of its own address
    space (ru_maxrss would carry over the parent's peak across fork + exec on Linux: every
    side would report at least this script's memory)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side_ours(spec: dict) -> dict:
    import torch
    from homellm.train.pretrain import PretrainConfig, pretrain
    torch.set_num_threads(spec["threads"])
    stamps, cpu, events = [], [], {}

    def progress(event):
        if "loss" in event:
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
        else:
            events.update(event)

    config = PretrainConfig(data=spec["data"], out=spec["out"], depth=spec["depth"],
                            seq_len=spec["seq_len"], steps=spec["steps"],
                            batch_tokens=spec["batch_tokens"], device_batch=spec["device_batch"],
                            lr=spec["lr"], dtype=spec["dtype"], threads=spec["threads"],
                            val_tokens=spec["val_tokens"], seed=spec["seed"],
                            compile=spec.get("compile"), attention=spec.get("attention", "auto"),
                            fuse=spec.get("fuse", False))
    t0 = time.perf_counter()
    result = pretrain(config, progress=progress)
    timed = stamps[-2] - stamps[0]  # steps 2 .. N-1
    return {"tokens_per_s": (len(stamps) - 2) * spec["batch_tokens"] / timed,
            "cpu_s_per_step": (cpu[-2] - cpu[0]) / (len(stamps) - 2),
            "first_step_s": stamps[0] - t0, "compiled": events.get("compile") and "compile_failed" not in events,
            "attention": events.get("attention"), "peak_how": events.get("peak_how"),
            "val_loss": result.val[-1]["loss"], "train_loss": result.losses[-1],
            "peak_rss_mb": peak_rss_mb(), "n_params": result.n_params}


def side_hf(spec: dict) -> dict:
    import math

    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from homellm.data.shards import open_tokens
    from homellm.train.pretrain import Windows, build_model, lr_factor, model_args, val_windows
    from homellm.train.pretrain_config import PretrainConfig
    torch.set_num_threads(spec["threads"])
    data = open_tokens(Path(spec["data"]))
    args = model_args(spec["depth"], data.vocab_size, spec["seq_len"])
    hf_config = {k: v for k, v in args.to_hf_config().items() if k != "architectures"}
    model = LlamaForCausalLM(LlamaConfig(**hf_config, attn_implementation="sdpa"))
    ours = build_model(args, spec["seed"])  # the same initial weights
    missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in m or m == "lm_head.weight" for m in missing), (missing, unexpected)
    model.tie_weights()
    del ours
    model.train()
    embed = model.model.embed_tokens.weight
    matrices = [p for p in model.parameters() if p.dim() == 2 and p is not embed]
    other = [p for p in model.parameters() if not (p.dim() == 2 and p is not embed)]
    optimizer = torch.optim.AdamW([dict(params=matrices, weight_decay=0.1),
                                   dict(params=other, weight_decay=0.0)],
                                  lr=spec["lr"], betas=(0.9, 0.95), eps=1e-8)
    total = spec["steps"]
    config = PretrainConfig(schedule="cosine")
    warmup = math.ceil(0.05 * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, config))
    windows = Windows(data.train, spec["seq_len"], spec["seed"])
    amp = spec["dtype"] == "bfloat16"
    seqs = spec["batch_tokens"] // spec["seq_len"]
    params = list(model.parameters())

    def loss_of(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=batch[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")

    stamps, cpu, losses = [], [], []
    t0 = time.perf_counter()
    for step in range(total):
        first, loss_sum = step * seqs, 0.0
        for m in range(seqs // spec["device_batch"]):
            ks = list(range(first + m * spec["device_batch"], first + (m + 1) * spec["device_batch"]))
            loss = loss_of(windows.batch(ks))
            (loss / spec["batch_tokens"]).backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum / spec["batch_tokens"])
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
    model.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in val_windows(data.val, spec["seq_len"], spec["val_tokens"]):
            x = torch.from_numpy(w)[None]
            nll += loss_of(x).item()
            n += x.shape[1] - 1
    timed = stamps[-2] - stamps[0]
    return {"tokens_per_s": (len(stamps) - 2) * spec["batch_tokens"] / timed,
            "cpu_s_per_step": (cpu[-2] - cpu[0]) / (len(stamps) - 2), "first_step_s": stamps[0] - t0,
            "val_loss": nll / n, "train_loss": losses[-1], "peak_rss_mb": peak_rss_mb(),
            "attention": model.config._attn_implementation}


def side_gemm(spec: dict) -> dict:
    """The machine's matmul rate in a dtype: the best of 5 (2048 x 2048) @ (2048 x 2048)."""
    import torch
    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return {"flops": 2 * 2048 ** 3 / best}


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def side_prepare_ours(spec: dict) -> dict:
    from homellm.data.prepare import PrepareConfig, Source, prepare
    t0 = time.perf_counter()
    report = prepare(PrepareConfig([Source("bench", [spec["source"]])], spec["out"], val_fraction=0.0))
    seconds = time.perf_counter() - t0
    r = report.sources[0]
    return {"mb_per_s": report.read_bytes / 1e6 / seconds, "seconds": seconds,
            "documents": r.documents, "kept": r.kept, "removed": r.removed,
            "peak_rss_mb": peak_rss_mb()}


def side_prepare_datatrove(spec: dict) -> dict:
    """datatrove doing the same steps alone: read, Gopher repetition filter, MinHash dedup
    (signatures, buckets, clusters, filter; 5-grams, 14 bands of 8 = 112 hashes), write."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster,
                                          MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    work = Path(spec["out"])
    src = Path(spec["source"])
    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)

    def reader():
        return JsonlReader(str(src.parent), glob_pattern=src.name)

    def filters():  # Gopher's repetition filter needs spacy's word tokenizer: used when present
        try:
            import spacy  # noqa: F401
        except ImportError:
            return []
        from datatrove.pipeline.filters import GopherRepetitionFilter
        return [GopherRepetitionFilter()]

    t0 = time.perf_counter()
    stages = [
        [reader(), *filters(), MinhashDedupSignature(output_folder=str(work / "sigs"), config=config)],
        [MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=config)],
        [MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"), config=config)],
        [reader(), *filters(), MinhashDedupFilter(input_folder=str(work / "remove")),
         JsonlWriter(str(work / "out"))],
    ]
    for i, pipeline in enumerate(stages):
        tasks = config.num_buckets if i == 1 else 1
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1,
                              logging_dir=str(work / f"logs{i}")).run()
    seconds = time.perf_counter() - t0
    kept = 0
    import gzip
    for f in (work / "out").glob("*"):
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt") as fh:
            kept += sum(1 for _ in fh)
    return {"mb_per_s": src.stat().st_size / 1e6 / seconds, "seconds": seconds, "kept": kept,
            "peak_rss_mb": peak_rss_mb(), "note": "reads the file twice (stages 1 and 4), as datatrove's MinHash recipe does",
            "gopher_filter": bool(filters())}


SIDES = {"ours": side_ours, "hf": side_hf, "gemm": side_gemm, "prepare-ours": side_prepare_ours,
         "prepare-datatrove": side_prepare_datatrove}


def run_side(python: str, side: str, spec: dict, threads: int) -> dict:
    env = dict(START_ENV, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    proc = subprocess.run([python, __file__, "--side", side, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=6 * 3600)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs")
    p.add_argument("--data", default=None, help="a tokenized corpus (default: a synthetic one)")
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-tokens", type=int, default=None)
    p.add_argument("--device-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    p.add_argument("--ablations", action="store_true",
                   help="also ours with SDPA attention, and with the fused projections")
    p.add_argument("--peer-python", default=sys.executable, help="python with transformers")
    p.add_argument("--datatrove-python", default=None, help="python with datatrove (skipped if none)")
    p.add_argument("--prep-source", default=None, help="JSONL documents for the preparation benchmark")
    p.add_argument("--prep-mb", type=float, default=None, help="size of the synthetic documents")
    p.add_argument("--skip-prepare", action="store_true", help="pretraining only")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        print(json.dumps(SIDES[a.side](json.loads(a.spec))))
        return
    smoke = a.smoke
    depth = a.depth or (1 if smoke else 4)
    seq_len = a.seq_len or (64 if smoke else 512)
    batch_tokens = a.batch_tokens or (seq_len * a.device_batch * (1 if smoke else 2))
    steps = a.steps or (4 if smoke else 40)
    tmp = Path(tempfile.mkdtemp(prefix="pretrain-bench-"))
    data = a.data or str(synthetic_corpus(tmp / "synthetic", n_docs=150 if smoke else 6000,
                                          vocab=384 if smoke else 4096))
    out = {"machine": {"threads": a.threads, "cpu_count": os.cpu_count()}, "pretrain": {}}
    dtypes = ["float32", "bfloat16"] if a.dtype == "both" else [a.dtype]
    from homellm.data.shards import open_tokens
    from homellm.train.pretrain import describe_peak_flops, flops_per_token, model_args
    import torch
    flops = flops_per_token(model_args(depth, open_tokens(Path(data)).vocab_size, seq_len), seq_len)
    for dtype in dtypes:
        spec = dict(data=data, depth=depth, seq_len=seq_len, batch_tokens=batch_tokens,
                    device_batch=a.device_batch, steps=steps, lr=a.lr, dtype=dtype,
                    threads=a.threads, val_tokens=seq_len * 16, seed=0)
        peak, how = describe_peak_flops(torch.device("cpu"), dtype, a.threads)
        gemm = run_side(sys.executable, "gemm", spec, a.threads).get("flops")
        runs = {"ours": {}}  # ours as this dtype gives it by default
        if dtype == "bfloat16":
            runs["ours_eager"] = {"compile": False}
        if a.ablations:
            runs["ours_sdpa"] = {"attention": "sdpa"}
            runs["ours_fused"] = {"fuse": True}
        row = {"config": spec, "peak_flops": peak, "peak_how": how, "gemm_flops_measured": gemm}
        for name, extra in runs.items():
            row[name] = run_side(sys.executable, "ours", {**spec, **extra, "out": str(tmp / f"{name}-{dtype}")},
                                 a.threads)
        row["hf"] = run_side(a.peer_python, "hf", spec, a.threads)
        for name in [*runs, "hf"]:
            side = row[name]
            if "error" in side:
                continue
            side["mfu"] = side["tokens_per_s"] * flops / peak
            if gemm:
                side["of_measured_gemm"] = side["tokens_per_s"] * flops / gemm
            if name != "hf" and "error" not in row["hf"]:
                hf = row["hf"]
                side["ratio_tokens_per_s"] = side["tokens_per_s"] / hf["tokens_per_s"]
                side["ratio_cpu_s_per_step"] = hf["cpu_s_per_step"] / side["cpu_s_per_step"]
                side["ratio_peak_rss"] = side["peak_rss_mb"] / hf["peak_rss_mb"]
                side["val_loss_minus_hf"] = side["val_loss"] - hf["val_loss"]
        out["pretrain"][dtype] = row
    if a.dtype == "both":
        from homellm.cli.tune import auto_dtype
        ours_dtype = auto_dtype("cpu", "none")
        ours, hf = out["pretrain"][ours_dtype]["ours"], out["pretrain"]["float32"]["hf"]
        if "error" not in ours and "error" not in hf:
            out["pretrain"]["defaults"] = {
                "ours": f"{ours_dtype}, {'compiled' if ours['compiled'] else 'eager'}, {ours['attention']} attention",
                "hf": "float32 eager, sdpa",
                "ratio_tokens_per_s": ours["tokens_per_s"] / hf["tokens_per_s"],
                "ratio_cpu_s_per_step": hf["cpu_s_per_step"] / ours["cpu_s_per_step"],
                "ratio_peak_rss": ours["peak_rss_mb"] / hf["peak_rss_mb"],
                "val_loss_ours_minus_hf": ours["val_loss"] - hf["val_loss"]}
    if not a.skip_prepare:
        source = a.prep_source or str(synthetic_documents(tmp / "prep" / "docs.jsonl",
                                                          a.prep_mb or (0.5 if smoke else 20)))
        prep = {"source": source, "ours": run_side(sys.executable, "prepare-ours",
                                                   {"source": source, "out": str(tmp / "prep-ours")}, a.threads)}
        if a.datatrove_python:
            prep["datatrove"] = run_side(a.datatrove_python, "prepare-datatrove",
                                         {"source": source, "out": str(tmp / "prep-dt")}, a.threads)
            if "error" not in prep["datatrove"] and "error" not in prep["ours"]:
                prep["ratio_mb_per_s"] = prep["ours"]["mb_per_s"] / prep["datatrove"]["mb_per_s"]
        out["prepare"] = prep
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
