"""A byte-level BPE tokenizer trained on a prepared corpus, with chat tokens and a template.

Trained with Hugging Face `tokenizers` (BpeTrainer) in the shape SmolLM2 uses, so that every
reader of ours and llama.cpp's GGUF loader take it as it is:
- pre-tokenizer: single digits, then GPT-2's regex and byte-level mapping (GGUF `pre` =
  "smollm"; tokenizer/gguf_vocab.py recognizes it and llama.cpp applies the same regexes);
- the 256 byte symbols are always in the vocabulary, so any Unicode text round-trips;
- special tokens: `<|endoftext|>` (id 0) starts every document (BOS, added by the
  post-processor) and so also marks where the one before ended; `<|im_start|>` and
  `<|im_end|>` for chat turns;
- the chat template is ChatML (what tokenizer/chat_template.py renders), written into
  tokenizer_config.json with the special tokens.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from homellm.errors import HomellmError

BOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # the bytes, the specials and one merge


def empty_tokenizer():
    """An untrained byte-level BPE with our pre-tokenizer and decoder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    return tk


def train_tokenizer(texts: Iterable[str], vocab_size: int, n_texts: int | None = None,
                    min_frequency: int = 2, progress: bool = False):
    """A trained `tokenizers.Tokenizer` of exactly `vocab_size` tokens (HomellmError when
    the texts hold too few distinct pairs to make that many, or none at all)."""
    from tokenizers import pre_tokenizers, processors, trainers
    if vocab_size < MIN_VOCAB:
        raise HomellmError(f"--vocab-size {vocab_size}: expected at least {MIN_VOCAB} "
                           f"(256 bytes, {len(SPECIAL_TOKENS)} special tokens and one merge)")
    seen = 0

    def counted():
        nonlocal seen
        for t in texts:
            seen += 1
            yield t

    tk = empty_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(counted(), trainer, length=n_texts)
    if seen == 0:
        raise HomellmError("the corpus is empty: no text to train a tokenizer on")
    got = tk.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        raise HomellmError(f"the corpus supports only {got} tokens (every pair of tokens seen at "
                           f"least {min_frequency} times is merged); give --vocab-size {got} or "
                           f"less, or more text")
    bos = tk.token_to_id(BOS)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)])
    return tk


def tokenizer_config() -> dict:
    """tokenizer_config.json for a tokenizer made by train_tokenizer."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": BOS,
            "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE, "model_max_length": 1 << 20}


def save(tk, folder: Path) -> tuple[Path, Path]:
    """tokenizer.json and tokenizer_config.json into `folder`, each written then renamed."""
    folder = Path(folder)
    out = []
    for name, text in (("tokenizer.json", tk.to_str(pretty=True)),
                       ("tokenizer_config.json", json.dumps(tokenizer_config(), indent=2) + "\n")):
        path, tmp = folder / name, folder / f".{name}.tmp"
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise HomellmError(f"cannot write {path}: {e.strerror or e}") from None
        out.append(path)
    return out[0], out[1]


def load(path: Path):
    """A homellm Tokenizer from a folder with tokenizer.json (+ tokenizer_config.json) or a
    tokenizer.json file."""
    from homellm.tokenizer import Tokenizer
    path = Path(path)
    if path.is_dir():
        return Tokenizer.from_hf_folder(path)
    if not path.is_file():
        raise HomellmError(f"{path}: no such tokenizer (a tokenizer.json or a folder holding one)")
    config_path = path.with_name("tokenizer_config.json")
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    return Tokenizer.from_tokenizer_json(path, config)
