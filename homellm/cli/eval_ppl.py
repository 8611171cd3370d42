"""`homellm eval ppl`: perplexity, bits per byte and KL divergence over a text (llama-perplexity's
chunking), on the C runtime for a GGUF file, PyTorch for a Hugging Face folder or an adapter.

    homellm eval ppl -m smollm2 --data wiki.txt [--ctx 512]
    homellm eval ppl -m f16.gguf --data wiki.txt --save-logits ref.npz
    homellm eval ppl -m q4_1.gguf,q8_0.gguf --kl-divergence ref.npz
    homellm eval ppl -m base,base+./adapter --data chats.jsonl

Every run is kept under $HOMELLM_HOME/evals (see `homellm eval report`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from homellm.errors import HomellmError

HELP = "perplexity and bits per byte over a text; --save-logits / --kl-divergence compare models"


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("-m", "--model", default=None, metavar="MODEL[,MODEL+ADAPTER_DIR...]",
                   help="catalog name, .gguf file or Hugging Face folder (default: the default "
                        "model); a comma-separated list measures each; NAME+DIR adds a LoRA adapter")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="the text: a .txt file, or .jsonl with a \"text\" field on each line")
    p.add_argument("--ctx", type=int, default=None,
                   help="tokens per chunk; the second half of each is scored (default 512, or the "
                        "reference's with --kl-divergence)")
    p.add_argument("--batch", type=int, default=1,
                   help="chunks per forward pass on the PyTorch path (GPU, HF folder, adapter); the "
                        "C runtime computes one chunk a call (default 1)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter folder (PEFT layout) on -m, applied without merging")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--quant", choices=["none", "int8", "int4"], default=None,
                   help="weights at run time: default keeps what the file records")
    p.add_argument("--save-logits", default=None, metavar="FILE",
                   help="keep this model's top-k log-probabilities as a reference (.npz)")
    p.add_argument("--top-k", type=int, default=None,
                   help="log-probabilities a scored token keeps with --save-logits (default 32; "
                        "the rest of the distribution is kept as one bucket)")
    p.add_argument("--kl-divergence", default=None, metavar="FILE",
                   help="compare with a reference from --save-logits on the same tokens: KLD, "
                        "same top-1 token, delta perplexity (--data optional: checked if given)")
    p.add_argument("--json", action="store_true", help="print one JSON object per model")


def main(args: argparse.Namespace) -> int:
    from homellm.eval import ppl
    from homellm.eval import reference as reffile
    from homellm.eval.models import ModelRef, check_adapter, model_hash, parse_model_list
    from homellm.eval.results import record

    refs = parse_model_list(args.model)
    if args.adapter is not None:
        if len(refs) != 1 or refs[0].adapter is not None:
            raise HomellmError("--adapter applies to one model; for a list write NAME+ADAPTER_DIR in -m")
        refs = [ModelRef(refs[0].name, args.adapter)]
    for r in refs:
        check_adapter(r)
    if args.save_logits and args.kl_divergence:
        raise HomellmError("--save-logits and --kl-divergence: one at a time (save a reference "
                           "with the base model, then compare other models with it)")
    if args.save_logits and len(refs) > 1:
        raise HomellmError("--save-logits keeps one model's reference: give one model with -m")
    if args.top_k is not None and not args.save_logits:
        raise HomellmError("--top-k goes with --save-logits (a reference keeps its own k)")
    if args.batch < 1:
        raise HomellmError(f"--batch {args.batch}: expected at least 1")
    if args.ctx is not None:
        ppl.check_ctx(args.ctx)
    if args.data is None and args.kl_divergence is None:
        raise HomellmError("--data FILE is required: the text to measure (.txt, or .jsonl with a "
                           "\"text\" field)")
    top_k = 0
    if args.save_logits:
        top_k = ppl.DEFAULT_TOP_K if args.top_k is None else args.top_k
        if top_k < 1:
            raise HomellmError(f"--top-k {top_k}: expected at least 1")
        reffile.check_writable(Path(args.save_logits))

    data = ppl.read_text(args.data) if args.data else None
    base = reffile.load(args.kl_divergence) if args.kl_divergence else None
    if base is not None and args.ctx is not None and args.ctx != base.ctx:
        raise HomellmError(f"--ctx {args.ctx}, but {args.kl_divergence} was made with chunks of "
                           f"{base.ctx} tokens: KL divergence compares the same chunks (drop --ctx)")
    ctx = base.ctx if base is not None else (args.ctx or ppl.DEFAULT_CTX)

    outputs = []
    for ref in refs:
        identity = model_hash(ref)
        model = _load(ref, ctx, args)
        chunks = _chunks(model, data, base, ctx, args)
        trained = model.args.max_position_embeddings
        if ctx > trained and not args.json:
            print(f"note: --ctx {ctx} is beyond {ref.label}'s trained context of {trained} tokens",
                  file=sys.stderr)
        if not args.json:
            _print_header(ref, identity, model, data, base, chunks, args)
        run = _evaluate(model, chunks, args, top_k, base)
        meta = {"model": ref.label, "model_hash": identity,
                "data": data.name if data else base.meta.get("data"),
                "data_sha256": data.sha256 if data else base.meta.get("data_sha256"),
                "vocab_size": model.args.vocab_size,
                "tokenizer": ppl.tokenizer_fingerprint(model.tokenizer)}
        if args.save_logits:
            reffile.save(args.save_logits, run.reference(chunks, meta))
        settings = {"ctx": ctx, "batch": args.batch, "data_sha256": meta["data_sha256"],
                    "runtime": model.runtime, "device": str(model.device), "threads": model.threads}
        if args.quant is not None:
            settings["quant"] = args.quant
        if base is not None:
            settings.update(reference=str(args.kl_divergence), reference_model=base.meta.get("model"),
                            reference_hash=base.meta.get("model_hash"), top_k=base.top_k)
        if args.save_logits:
            settings.update(saved_logits=str(args.save_logits), top_k=top_k)
        kept = record("kld" if base is not None else "ppl", model=ref.label, model_hash=identity,
                      task=meta["data"] or "?", settings=settings, metrics=run.metrics())
        outputs.append({"model": ref.label, "model_hash": identity, "data": meta["data"],
                        "run": kept.id, **settings, **run.metrics()})
        if args.json:
            print(json.dumps(outputs[-1]))
        else:
            _print_result(run, model, args, kept.id)
        del model
    if len(outputs) > 1 and not args.json:
        _print_table(outputs, base is not None)
    sys.stdout.flush()
    return 0


def _load(ref, ctx: int, args):
    from homellm.cli.options import load_model
    ns = argparse.Namespace(model=ref.name, ctx=ctx, device=args.device, quant=args.quant,
                            adapter=ref.adapter)
    return load_model(ns, quiet=args.json)


def _chunks(model, data, base, ctx: int, args):
    from homellm.eval import ppl
    vocab = model.args.vocab_size
    if base is None:
        return ppl.make_chunks(model.tokenizer, data.text, ctx, name=f"--data {data.path}")
    ref_path = args.kl_divergence
    if int(base.meta.get("vocab_size", -1)) != vocab:
        raise HomellmError(f"{ref_path} was made with a vocabulary of {base.meta.get('vocab_size')} "
                           f"tokens, this model has {vocab}: KL divergence needs the same tokenizer")
    if base.meta.get("tokenizer") != ppl.tokenizer_fingerprint(model.tokenizer):
        raise HomellmError(f"{ref_path} was made with another tokenizer (model "
                           f"{base.meta.get('model')}): KL divergence needs the same tokens")
    if data is None:
        if int(base.tokens.max()) >= vocab or int(base.tokens.min()) < 0:
            raise HomellmError(f"{ref_path}: token ids outside this model's vocabulary")
        return ppl.Chunks(base.tokens, base.scored_bytes, int(base.meta.get("text_tokens", base.tokens.size)))
    chunks = ppl.make_chunks(model.tokenizer, data.text, ctx, name=f"--data {data.path}")
    if chunks.tokens.shape != base.tokens.shape or not (chunks.tokens == base.tokens).all():
        where = ""
        if chunks.tokens.shape == base.tokens.shape:
            c, pos = (int(i[0]) for i in (chunks.tokens != base.tokens).nonzero())
            where = f"; first difference in chunk {c + 1} at token {pos}"
        raise HomellmError(
            f"--data {data.path} gives {chunks.n_chunks} chunks of {ctx} tokens, other tokens "
            f"than {ref_path} was made on ({base.meta.get('data')}, {base.tokens.shape[0]} chunks"
            f"{where}): KL divergence needs the same text, tokenized the same way")
    return chunks


def _evaluate(model, chunks, args, top_k: int, base):
    from tqdm import tqdm

    from homellm.eval import ppl
    bar = tqdm(total=chunks.n_chunks, desc="perplexity", unit="chunk", file=sys.stderr,
               leave=False, disable=True if args.json else None)

    def progress(done, total, running):
        bar.n = done
        bar.set_postfix_str(f"ppl {running:.4f}", refresh=False)
        bar.refresh()
    try:
        return ppl.evaluate(model, chunks, batch=args.batch, top_k=top_k, reference=base,
                            progress=progress)
    finally:
        bar.close()


def _print_header(ref, identity, model, data, base, chunks, args):
    where = f"{model.runtime} runtime on {model.device}, {model.threads} threads"
    print(f"model   {ref.label} ({identity}; {where})")
    source = data.path if data is not None else f"the tokens of {args.kl_divergence}"
    left = (f"; the last {chunks.left_out} tokens, less than a chunk, are left out"
            if chunks.left_out else "")
    print(f"data    {source}: {chunks.text_tokens} tokens, {chunks.n_chunks} chunks of {chunks.ctx}"
          f" ({chunks.n_chunks * chunks.scored_per_chunk} scored{left})")
    sys.stdout.flush()


def _print_result(run, model, args, run_id: str):
    print(f"Final estimate: PPL = {run.ppl:.4f} +/- {run.ppl_err:.5f}")
    if run.bpb is not None:
        print(f"bits per byte: {run.bpb:.4f} ({run.scored_bytes} bytes scored)")
    k = run.kld
    if k is not None:
        lo, hi = k.delta_ppl_ci95
        print("\n====== Perplexity statistics ======")
        print(f"Mean PPL(Q)                   : {run.ppl:10.6f} ± {run.ppl_err:10.6f}")
        print(f"Mean PPL(base)                : {k.ppl_base:10.6f} ± {k.ppl_base_err:10.6f}")
        print(f"Mean ln(PPL(Q)/PPL(base))     : {k.log_ppl_ratio:10.6f} ± {k.log_ppl_ratio_err:10.6f}")
        print(f"Mean PPL(Q)-PPL(base)         : {k.delta_ppl:10.6f} ± {k.delta_ppl_err:10.6f}"
              f"  (95%: {lo:.6f} .. {hi:.6f})")
        print(f"\n====== KL divergence statistics (reference top-{k.top_k} + the rest as one bucket) ======")
        print(f"Mean    KLD: {k.kld_mean:10.6f} ± {k.kld_err:10.6f}")
        print(f"Maximum KLD: {k.kld_max:10.6f}")
        print(f"99.9%   KLD: {k.kld_p999:10.6f}")
        print(f"99.0%   KLD: {k.kld_p99:10.6f}")
        print(f"Median  KLD: {k.kld_median:10.6f}")
        print(f"RMS Δp     : {100 * k.rms_dp:6.3f} %")
        print(f"Same top p : {100 * k.same_top1:6.3f} ± {100 * k.same_top1_err:5.3f} %")
    if args.save_logits:
        print(f"saved   the top-{run.saved['top_ids'].shape[1]} log-probabilities of "
              f"{run.scored_tokens} tokens to {args.save_logits}")
    print(f"speed   {run.tokens_per_s:.1f} tokens/s ({run.evaluated_tokens} tokens in {run.seconds:.2f} s)")
    print(f"kept    run {run_id} (homellm eval report)")
    sys.stdout.flush()


def _print_table(outputs: list[dict], kld: bool):
    cols = ["ppl", "ppl_err", "bpb"] + (["kld_mean", "kld_p99", "same_top1", "delta_ppl"] if kld else [])
    print()
    width = max(len(o["model"]) for o in outputs)
    print("model".ljust(width) + "".join(f"  {c:>10}" for c in cols))
    for o in outputs:
        print(o["model"].ljust(width) + "".join(
            f"  {o[c]:>10.4f}" if isinstance(o.get(c), float) else f"  {'-':>10}" for c in cols))
