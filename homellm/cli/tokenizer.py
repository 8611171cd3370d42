"""`homellm tokenizer train DIR --vocab-size N`: a BPE tokenizer for a prepared corpus, then
the corpus tokenized into packed shards for `homellm pretrain`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

HELP = "train a byte-level BPE tokenizer on a prepared corpus and tokenize it into shards"


def add_arguments(p: argparse.ArgumentParser):
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    q = sub.add_parser("train", help="train a tokenizer on DIR/train.jsonl, then write DIR/shards",
                       description="Byte-level BPE (Hugging Face tokenizers) with <|endoftext|>, "
                                   "<|im_start|>, <|im_end|> and a ChatML chat template, saved as "
                                   "DIR/tokenizer.json and DIR/tokenizer_config.json; then the "
                                   "corpus is tokenized in parallel into DIR/shards (uint16/uint32).")
    q.add_argument("corpus", type=Path, help="a folder made by homellm data prepare")
    q.add_argument("--vocab-size", type=int, default=None,
                   help="tokens in the vocabulary, special tokens included (default 8192)")
    q.add_argument("--tokenizer", type=Path, default=None,
                   help="use this tokenizer (a model folder or tokenizer.json) instead of training one")
    q.add_argument("--train-bytes", type=float, default=None,
                   help="train the tokenizer on the first this many MB of train.jsonl (default all)")
    q.add_argument("--shard-tokens", type=int, default=100_000_000,
                   help="tokens per shard file (default 100M)")


def _texts(corpus: Path, limit_bytes: float | None):
    from homellm.data.shards import read_texts
    seen = 0
    for batch in read_texts(corpus / "train.jsonl"):
        for text in batch:
            yield text
            seen += len(text.encode("utf-8"))
            if limit_bytes is not None and seen >= limit_bytes:
                return


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from homellm.data.shards import tokenize_corpus
    from homellm.errors import HomellmError
    from homellm.tokenizer import train as tok_train
    corpus = args.corpus
    if not (corpus / "train.jsonl").is_file():
        raise HomellmError(f"{corpus}: no train.jsonl (make the corpus with homellm data prepare first)")
    if args.tokenizer is not None and args.vocab_size is not None:
        raise HomellmError("--tokenizer uses an existing vocabulary: drop --vocab-size")
    if args.shard_tokens < 1:
        raise HomellmError(f"--shard-tokens {args.shard_tokens}: expected at least 1")
    t0 = time.perf_counter()
    if args.tokenizer is None:
        vocab = args.vocab_size or 8192
        limit = args.train_bytes * 1e6 if args.train_bytes else None
        print(f"training a {vocab}-token byte-level BPE on {corpus / 'train.jsonl'}...", file=sys.stderr)
        tk = tok_train.train_tokenizer(_texts(corpus, limit), vocab, progress=sys.stderr.isatty())
        tok_train.save(tk, corpus)
        print(f"tokenizer: {corpus / 'tokenizer.json'} ({vocab} tokens, "
              f"{time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    else:
        src = args.tokenizer
        folder = src if src.is_dir() else src.parent
        tok_train.load(src)  # readable, before anything is copied
        for name in ("tokenizer.json", "tokenizer_config.json"):
            f = folder / name if src.is_dir() or name != "tokenizer.json" else src
            if f.is_file() and f.resolve() != (corpus / name).resolve():
                shutil.copyfile(f, corpus / name)
    tokenizer = tok_train.load(corpus)
    bar = tqdm(desc="tokenize", unit="B", unit_scale=True, file=sys.stderr, leave=False, disable=None)
    t1 = time.perf_counter()

    def progress(event):
        bar.update(event["bytes"])

    try:
        index = tokenize_corpus(corpus, tokenizer, args.shard_tokens, progress)
    finally:
        bar.close()
    seconds = time.perf_counter() - t1
    total_bytes = sum(s["bytes"] for s in index["splits"].values())
    for split, s in index["splits"].items():
        print(f"{split}: {s['documents']} documents, {s['tokens']:,} tokens in {len(s['files'])} "
              f"shard(s) ({s['bytes'] / max(s['tokens'], 1):.2f} bytes/token)", file=sys.stderr)
    print(f"tokenized {total_bytes / 1e6:.1f} MB in {seconds:.1f} s ({total_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s, "
          f"{index['dtype']}) -> {corpus / 'shards'} (next: homellm pretrain --data {corpus} --depth 4)",
          file=sys.stderr)
    return 0
