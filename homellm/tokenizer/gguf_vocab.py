"""GGUF vocabularies <-> `tokenizers.Tokenizer`.

A GGUF file stores its tokenizer as `tokenizer.ggml.*` fields (the keys below are given
without that prefix). Two vocabulary kinds are read here, as llama.cpp reads them
(src/llama-vocab.cpp):

- `model == "gpt2"`: byte-level BPE. `tokens` are in the GPT-2 byte-to-unicode alphabet
  (a space is "Ġ"), `merges` are "left right" strings ranked by position. The text is first
  cut by a list of regexes chosen by `pre` (llama.cpp applies them in turn, keeping both the
  matches and the text between them), then each piece is byte-level encoded and merged.
- `model == "llama"`: SentencePiece BPE. `tokens` use "▁" for a space, `scores` rank the
  pieces (sentencepiece merges the adjacent pair whose joined piece scores highest, the
  leftmost on ties), `token_type` marks control, user-defined and byte (`<0x0A>`) pieces;
  text that no piece covers falls back to byte pieces. `add_space_prefix` puts a "▁" in
  front of the text (and, as in llama.cpp, in front of the text after each special token).

`token_type` follows gguf.TokenType: 1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte. Control and unknown tokens become special added tokens, user-defined
ones plain added tokens, so that `<|im_start|>` written in a text encodes to its one id.

`fields_from_tokenizer` goes the other way, for exporting a model read from a HF folder.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from homellm.errors import HomellmError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁", SentencePiece's space marker

# The pre-tokenizer regexes, as llama.cpp's llm_tokenizer_bpe defines them per `pre` type.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SINGLE_DIGIT_REGEX = r"\p{N}"


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How one family of `pre` values cuts text before BPE (llama.cpp's pre types)."""

    name: str  # the `pre` value written back on export
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is a whole token is not merged (llama 3)
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token


GPT2 = PreTokenizerSpec("gpt-2", (GPT2_REGEX,))
SMOLLM = PreTokenizerSpec("smollm", (SINGLE_DIGIT_REGEX, GPT2_REGEX))
LLAMA3 = PreTokenizerSpec("llama-bpe", (LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
QWEN2 = PreTokenizerSpec("qwen2", (QWEN2_REGEX,))
LLAMA_DEFAULT = PreTokenizerSpec(
    "default", (r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", "[0-9][0-9][0-9]"))
FALCON = PreTokenizerSpec("falcon", (r"[\p{P}\$\+<=>\^~\|`]+", GPT2_REGEX, "[0-9][0-9][0-9]"))

PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    **dict.fromkeys(["gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "exaone4", "roberta-bpe"], GPT2),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"], SMOLLM),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"], LLAMA3),
    **dict.fromkeys(["dbrx", "smaug-bpe", "chatglm-bpe", "glm4"],
                    PreTokenizerSpec("dbrx", (LLAMA3_REGEX,))),
    **dict.fromkeys(["qwen2", "qwen2.5", "deepseek-r1-qwen", "stablelm2", "megrez"], QWEN2),
    "default": LLAMA_DEFAULT,
    "falcon": FALCON,
}


def pre_tokenizer_spec(pre: str | None) -> PreTokenizerSpec:
    """The spec for a `pre` value; an unknown or missing one gets GPT-2's regex and a warning."""
    if pre in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[pre]
    warnings.warn(f"GGUF tokenizer.ggml.pre is {pre!r}, which homellm does not know; splitting "
                  f"text with GPT-2's regex instead, so some texts may tokenize differently "
                  f"from llama.cpp", stacklevel=3)
    return GPT2


def _field(fields: dict, key: str):
    if fields.get(key) is None:
        raise HomellmError(f"GGUF field tokenizer.ggml.{key} is missing; a "
                           f"{fields.get('model')!r} vocabulary needs it")
    return fields[key]


def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    """token -> id; a duplicated token keeps its first id (llama.cpp keeps the last, rarely matters)."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    return vocab


def _added_tokens(tokens: list[str], types: list[int]) -> list[AddedToken]:
    """Control/unknown tokens as special added tokens, user-defined ones as plain added tokens."""
    added = []
    for tok, kind in zip(tokens, types):
        if kind in (CONTROL, UNKNOWN, USER_DEFINED) and tok:
            added.append(AddedToken(tok, special=kind != USER_DEFINED, normalized=False))
    return added


def _special_processor(fields: dict, tokens: list[str], add_bos: bool, add_eos: bool):
    """A post-processor that adds BOS/EOS exactly when the file says so."""
    single, special = "$A", []
    for flag, key, where in ((add_bos, "bos_token_id", "front"), (add_eos, "eos_token_id", "back")):
        tid = fields.get(key)
        if flag and tid is not None and 0 <= tid < len(tokens):
            single = f"{tokens[tid]} {single}" if where == "front" else f"{single} {tokens[tid]}"
            special.append((tokens[tid], tid))
    if not special:
        return None
    pair = single + " " + single.replace("$A", "$B")
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _byte_level_bpe(fields: dict) -> tuple[HFTokenizer, bool]:
    tokens = _field(fields, "tokens")
    merges_text = _field(fields, "merges")
    vocab = _vocab_dict(tokens)
    merges = []
    for line in merges_text:
        left, sep, right = line.partition(" ")
        if sep and left in vocab and right in vocab and left + right in vocab:
            merges.append((left, right))
    if len(merges) != len(merges_text):
        warnings.warn(f"GGUF tokenizer.ggml.merges: {len(merges_text) - len(merges)} merges name "
                      f"tokens that are not in the vocabulary; skipped", stacklevel=3)
    spec = pre_tokenizer_spec(fields.get("pre"))
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=spec.ignore_merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in spec.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    add_bos = fields.get("add_bos_token")
    return tk, spec.add_bos if add_bos is None else bool(add_bos)


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece BPE vocabulary implies, best first.

    Sentencepiece joins the adjacent pair whose joined piece has the highest score. As a
    merge list: every split (left, right) of a normal piece with both halves in the
    vocabulary, ranked by the joined piece's score (then id, then the split point).
    Only split points where both halves have the length of some token are tried, so a piece
    costs one look-up per distinct token length, not one per character (a 200,000-character
    token in a file is as cheap as a short one).
    """
    vocab = _vocab_dict(tokens)
    lengths = sorted({len(t) for t in vocab})
    present = set(lengths)
    ranked = []
    for i, (piece, kind) in enumerate(zip(tokens, types)):
        n = len(piece)
        if kind != NORMAL or n < 2:
            continue
        for k in lengths:
            if k >= n:
                break
            if n - k not in present:
                continue
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, k, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _sentencepiece_bpe(fields: dict) -> tuple[HFTokenizer, bool]:
    tokens = _field(fields, "tokens")
    scores = [float(s) for s in _field(fields, "scores")]
    types = list(fields.get("token_type") or [NORMAL] * len(tokens))
    if not (len(tokens) == len(scores) == len(types)):
        raise HomellmError(f"GGUF tokenizer fields disagree: {len(tokens)} tokens, "
                           f"{len(scores)} scores, {len(types)} token types")
    unk_id = fields.get("unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    has_bytes = BYTE in types
    tk = HFTokenizer(models.BPE(vocab=_vocab_dict(tokens), merges=sentencepiece_merges(tokens, scores, types),
                                unk_token=unk, fuse_unk=True, byte_fallback=has_bytes))
    add_prefix = fields.get("add_space_prefix")
    add_prefix = True if add_prefix is None else bool(add_prefix)  # llama.cpp's SPM default
    steps = [normalizers.Prepend(SPACE)] if add_prefix else []
    tk.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
    add_bos = fields.get("add_bos_token")
    return tk, True if add_bos is None else bool(add_bos)


def plain_fields(fields: dict) -> dict:
    """The fields as plain Python values (lists of str/int/float), whatever the reader gave."""
    def text(x):
        return x.decode("utf-8", errors="replace") if isinstance(x, (bytes, bytearray)) else str(x)

    out = dict(fields)
    for key, convert in (("tokens", text), ("merges", text), ("token_type", int), ("scores", float)):
        if out.get(key) is not None:
            out[key] = [convert(x) for x in out[key]]
    return out


def check_fields(fields: dict) -> None:
    """HomellmError unless the vocabulary fields have the types a vocabulary needs: `tokens`
    a non-empty array of strings, `scores` numbers, `token_type` integers (the file may say
    anything: an int32 array of tokens would otherwise become the strings '0', '1', ...)."""
    for key, kinds, what in (("tokens", (str, bytes, bytearray), "strings"),
                             ("scores", (int, float), "numbers"),
                             ("token_type", (int,), "integers")):
        values = fields.get(key)
        if values is None:
            continue
        if hasattr(values, "dtype") and hasattr(values, "tolist"):  # a numpy array
            values = values.tolist()
        if not isinstance(values, (list, tuple)):
            raise HomellmError(f"GGUF field tokenizer.ggml.{key} is a {type(values).__name__}: "
                               f"expected an array of {what}")
        bad = next((v for v in values if not isinstance(v, kinds) or isinstance(v, bool)), None)
        if bad is not None:
            raise HomellmError(f"GGUF field tokenizer.ggml.{key} holds {bad!r} "
                               f"({type(bad).__name__}): expected an array of {what}")
    if fields.get("tokens") is not None and not fields["tokens"]:
        raise HomellmError("GGUF field tokenizer.ggml.tokens is empty: the model has no vocabulary")


def tokenizer_from_fields(fields: dict) -> HFTokenizer:
    """A `tokenizers.Tokenizer` for GGUF tokenizer fields (see the module docstring)."""
    check_fields(fields)
    fields = plain_fields(fields)
    kind = fields.get("model")
    if kind == "gpt2":
        tk, add_bos = _byte_level_bpe(fields)
    elif kind == "llama":
        tk, add_bos = _sentencepiece_bpe(fields)
    else:
        raise HomellmError(f"GGUF field tokenizer.ggml.model is {kind!r}; homellm reads 'gpt2' "
                           f"(byte-level BPE) and 'llama' (SentencePiece BPE) vocabularies")
    tokens = fields["tokens"]
    types = list(fields.get("token_type") or [NORMAL] * len(tokens))
    tk.add_tokens(_added_tokens(tokens, types))
    processor = _special_processor(fields, tokens, add_bos, bool(fields.get("add_eos_token")))
    if processor is not None:
        tk.post_processor = processor
    return tk


# ---------------------------------------------------------------------------------------
# The inverse: a tokenizer.json tokenizer as GGUF fields.

def _flatten(node: dict | None) -> list[dict]:
    if node is None:
        return []
    if node.get("type") == "Sequence":
        key = "pretokenizers" if "pretokenizers" in node else "normalizers" if "normalizers" in node \
            else "decoders"
        return [leaf for child in node.get(key, []) for leaf in _flatten(child)]
    return [node]


def _pre_signature(pre_tokenizer: dict | None) -> tuple[str, ...]:
    """The regexes a tokenizer.json pre-tokenizer applies, in the terms of PreTokenizerSpec."""
    regexes = []
    for node in _flatten(pre_tokenizer):
        if node["type"] == "Split":
            pattern = node.get("pattern", {})
            regexes.append(pattern.get("Regex") or pattern.get("String") or "")
        elif node["type"] == "Digits" and node.get("individual_digits"):
            regexes.append(SINGLE_DIGIT_REGEX)
        elif node["type"] == "ByteLevel" and node.get("use_regex", True):
            regexes.append(GPT2_REGEX)
    return tuple(regexes)


def _pre_name(pre_tokenizer: dict | None) -> str:
    signature = _pre_signature(pre_tokenizer)
    for spec in (SMOLLM, GPT2, LLAMA3, QWEN2, LLAMA_DEFAULT, FALCON):
        if spec.regexes == signature:
            return spec.name
    warnings.warn(f"the tokenizer's pre-tokenizer {signature} matches no llama.cpp pre type; "
                  f"writing tokenizer.ggml.pre = 'default'", stacklevel=3)
    return "default"


def fields_from_tokenizer(tk: HFTokenizer, special_ids: dict[str, int | None],
                          add_bos: bool, add_eos: bool = False) -> dict:
    """GGUF tokenizer fields (without the `tokenizer.ggml.` prefix) for a BPE tokenizer.json.

    `special_ids` maps bos/eos/unknown/padding/eot to ids (None where the model has none).
    Byte-level BPE becomes `model = "gpt2"` with its merges; BPE with SentencePiece's "▁"
    and byte fallback becomes `model = "llama"` with scores that rank pieces like the merges.
    """
    spec = json.loads(tk.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise HomellmError(f"tokenizer.json model is {model.get('type')!r}; only BPE "
                           f"vocabularies can be written to GGUF")
    vocab = tk.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    tokens, types = [f"[PAD{i}]" for i in range(size)], [UNUSED] * size  # ids nothing maps to
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, NORMAL
    for i, added in tk.get_added_tokens_decoder().items():
        types[i] = CONTROL if added.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields: dict = {"tokens": tokens, "token_type": types,
                    "add_bos_token": add_bos, "add_eos_token": add_eos}
    byte_level = any(n["type"] == "ByteLevel" for n in _flatten(spec.get("pre_tokenizer")))
    sentencepiece_like = model.get("byte_fallback") or _adds_space_prefix(spec) or any(
        n["type"] == "Replace" and n.get("content") == SPACE for n in _flatten(spec.get("normalizer")))
    if not (byte_level or sentencepiece_like):
        raise HomellmError("tokenizer.json is a BPE vocabulary but neither byte-level (GPT-2 style) "
                           "nor SentencePiece style; GGUF has no tokenizer.ggml.model for it")
    if byte_level:
        fields.update(model="gpt2", pre=_pre_name(spec.get("pre_tokenizer")), merges=merges)
    else:
        fields.update(model="llama", scores=_scores_from_merges(tokens, types, merges))
        fields["add_space_prefix"] = _adds_space_prefix(spec)
        for i, tok in enumerate(tokens):
            if model.get("byte_fallback") and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                types[i] = BYTE
        if model.get("unk_token") in vocab:
            types[vocab[model["unk_token"]]] = UNKNOWN
    for key in ("bos", "eos", "unknown", "padding", "eot"):
        if special_ids.get(key) is not None:
            fields[f"{key}_token_id"] = int(special_ids[key])
    return fields


def _scores_from_merges(tokens: list[str], types: list[int], merges: list[str]) -> list[float]:
    """SentencePiece-style scores: a piece made by merge r scores -r; other pieces score below all."""
    first_rank: dict[str, int] = {}
    for rank, line in enumerate(merges):
        left, _, right = line.partition(" ")
        first_rank.setdefault(left + right, rank)
    floor = -float(len(merges))
    return [-float(first_rank[t]) if t in first_rank else (floor - i if types[i] == NORMAL else 0.0)
            for i, t in enumerate(tokens)]


def _adds_space_prefix(spec: dict) -> bool:
    for node in _flatten(spec.get("normalizer")) + _flatten(spec.get("pre_tokenizer")):
        if node["type"] == "Prepend" and node.get("prepend") == SPACE:
            return True
        if node["type"] == "Metaspace" and node.get("prepend_scheme", "always") != "never":
            return True
    return False
