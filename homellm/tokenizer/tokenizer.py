"""Text <-> token ids for a model, and its conversations <-> ids plus the assistant mask.

Built on the `tokenizers` library, from either source a checkpoint carries:
a GGUF vocabulary (see gguf_vocab.py) or a HF folder's tokenizer.json + tokenizer_config.json.
Whether BOS is added comes from the model (GGUF `add_bos_token`, or the tokenizer.json
post-processor), never from a guess.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from homellm.errors import HomellmError
from homellm.tokenizer.chat_template import CHATML_FALLBACK, ChatTemplate, fallback_for
from homellm.tokenizer.gguf_vocab import (CONTROL, UNKNOWN, check_fields, fields_from_tokenizer,
                                          plain_fields, tokenizer_from_fields)

if TYPE_CHECKING:  # checkpoint.py imports torch; the tokenizer does not need it
    from homellm.model.formats.checkpoint import TokenizerSource

# Tokens that end a turn in common chat formats. One of them counts as an end-of-sequence id
# when the vocabulary has it as a special token and the chat template writes it.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                       "</s>", "<|endoftext|>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")


class StreamDecoder:
    """Turns ids arriving one by one into text pieces that concatenate to `decode(ids)`.

    A character split over several tokens (multi-byte UTF-8, byte-fallback pieces) comes out
    with the token that completes it; SentencePiece's leading space is handled like decode.
    """

    def __init__(self, tokenizer: HFTokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        """The text this token adds ("" while a character is still incomplete)."""
        return self._stream.step(self._tokenizer, int(token_id)) or ""


class Tokenizer:
    """A model's tokenizer: `encode`/`decode`, special ids, and its chat template."""

    def __init__(self, tokenizer: HFTokenizer, *, bos_id: int | None, eos_id: int | None,
                 extra_eos_ids: set[int] = frozenset(), chat_template: str | None = None,
                 gguf_fields: dict | None = None, add_bos: bool | None = None,
                 unknown_id: int | None = None, padding_id: int | None = None):
        self._tk = tokenizer
        self._gguf_fields = gguf_fields
        self.bos_id = bos_id
        self.unknown_id = unknown_id
        self.padding_id = padding_id
        self.eos_id = eos_id
        self.add_bos = self._adds(bos_id, at=0) if add_bos is None else add_bos
        self.vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True),
                              len(gguf_fields["tokens"]) if gguf_fields else 0)
        added = tokenizer.get_added_tokens_decoder()
        special = {i for i, t in added.items() if t.special}
        self.chat_template = ChatTemplate(chat_template, {
            "bos_token": self.id_to_token(bos_id) if bos_id is not None else None,
            "eos_token": self.id_to_token(eos_id) if eos_id is not None else None,
            "unk_token": self.id_to_token(unknown_id) if unknown_id is not None else None,
            "pad_token": self.id_to_token(padding_id) if padding_id is not None else None,
        }, fallback=fallback_for({added[i].content for i in special}) if chat_template is None
            else CHATML_FALLBACK)
        markers = {tid for m in END_OF_TURN_MARKERS
                   if (tid := tokenizer.token_to_id(m)) is not None and tid in special
                   and m in self.chat_template.source}
        self.eos_ids: set[int] = ({eos_id} if eos_id is not None else set()) | set(extra_eos_ids) | markers

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_source(cls, src: TokenizerSource, chat_template: str | None = None) -> Tokenizer:
        """The tokenizer a checkpoint describes (GGUF fields, or tokenizer.json + config)."""
        if src.gguf_fields is not None:
            return cls.from_gguf_fields(src.gguf_fields, chat_template)
        if src.tokenizer_json is not None:
            return cls.from_tokenizer_json(src.tokenizer_json, src.tokenizer_config or {}, chat_template)
        raise HomellmError("the model has no tokenizer: neither GGUF tokenizer.ggml.* fields "
                           "nor a tokenizer.json")

    @classmethod
    def from_gguf_fields(cls, fields: dict, chat_template: str | None = None) -> Tokenizer:
        """From GGUF `tokenizer.ggml.*` values (keys without the prefix)."""
        check_fields(fields)
        fields = plain_fields(fields)
        tk = tokenizer_from_fields(fields)
        n = len(fields["tokens"])

        def special(key):
            tid = fields.get(key)
            return int(tid) if tid is not None and 0 <= int(tid) < n else None

        extra = {tid for key in ("eot_token_id", "eom_token_id") if (tid := special(key)) is not None}
        add_bos = fields.get("add_bos_token")
        return cls(tk, bos_id=special("bos_token_id"), eos_id=special("eos_token_id"),
                   extra_eos_ids=extra, chat_template=chat_template, gguf_fields=fields,
                   add_bos=None if add_bos is None else bool(add_bos) and special("bos_token_id") is not None,
                   unknown_id=special("unknown_token_id"), padding_id=special("padding_token_id"))

    @classmethod
    def from_tokenizer_json(cls, path: Path, config: dict, chat_template: str | None = None,
                            generation_eos: set[int] = frozenset()) -> Tokenizer:
        """From a tokenizer.json and the tokenizer_config.json dict beside it."""
        try:
            tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise HomellmError(f"{path}: not a readable tokenizer.json ({e})") from None
        if tk.get_vocab_size(with_added_tokens=True) == 0:
            raise HomellmError(f"{path}: the vocabulary is empty (no token to encode text with)")
        tk = _untrimmed_offsets(tk)

        def special(key):
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            return tk.token_to_id(value) if isinstance(value, str) else None

        template = chat_template if chat_template is not None else config.get("chat_template")
        if isinstance(template, list):  # the older list-of-named-templates form
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return cls(tk, bos_id=special("bos_token"), eos_id=special("eos_token"),
                   extra_eos_ids=set(generation_eos), chat_template=template,
                   unknown_id=special("unk_token"), padding_id=special("pad_token"))

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """From a HF model folder: tokenizer.json, tokenizer_config.json, chat_template.jinja,
        and the eos ids of generation_config.json."""
        folder = Path(path)
        if not (folder / "tokenizer.json").exists():
            raise HomellmError(f"{folder}: no tokenizer.json (homellm reads fast-tokenizer files)")
        config = _read_json(folder / "tokenizer_config.json")
        template = None
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif (folder / "chat_template.json").exists():
            template = _read_json(folder / "chat_template.json").get("chat_template")
        eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return cls.from_tokenizer_json(folder / "tokenizer.json", config, template, eos)

    # -- text <-> ids ---------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; special tokens written in the text become their ids. BOS is added
        when `add_special_tokens` and the model asks for it. Text that is not valid Unicode
        (a lone surrogate, as Python decodes bad bytes in argv) is a HomellmError."""
        check_text(text)
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self._tk, skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """Bytes of UTF-8 text that one token covers at most (the longest vocabulary entry,
        x4 if a normalizer may shrink text as NFKC does): `len(text.encode()) // this` is a
        lower bound on `len(encode(text))`, for length checks that must not tokenize first."""
        longest = max((len(t.encode()) for t in self._tk.get_vocab(with_added_tokens=True)),
                      default=1)
        return max(1, longest) * (4 if self._tk.normalizer is not None else 1)

    @property
    def backend(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tk

    def _adds(self, token_id: int | None, at: int) -> bool:
        if token_id is None:
            return False
        with_special = self._tk.encode("a", add_special_tokens=True).ids
        without = self._tk.encode("a", add_special_tokens=False).ids
        return len(with_special) > len(without) and with_special[at] == token_id

    # -- chat -------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as text, written by the model's chat template."""
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The conversation as ids (the template writes BOS itself if the model uses one)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """A whole conversation as ids, and a mask that is 1 exactly on assistant tokens.

        The mask covers each assistant reply and the end-of-turn token that closes it
        (e.g. "<|im_end|>"), since the model must learn to produce both; a token that overlaps
        the reply counts as the reply's. It does not cover the
        role header before the reply ("<|im_start|>assistant\\n") nor what the template writes
        after the end-of-turn token (ChatML's "\\n"): the model stops at the end-of-turn
        token, so it never generates that text.
        """
        text, spans = self.chat_template.assistant_spans(messages)
        check_text(text)
        encoding = self._tk.encode(text, add_special_tokens=False)
        ids, offsets = encoding.ids, encoding.offsets
        mask = [0] * len(ids)
        for span in spans:
            # every token that overlaps the span: a byte-level token like " Blue" that starts
            # on the header's last space still belongs to the reply
            inside = [t for t, (start, end) in enumerate(offsets) if start < span.end and end > span.start]
            if not inside:
                continue
            closers = [t for t in inside if ids[t] in self.eos_ids]
            if closers:  # cut what the template writes after the end-of-turn token
                inside = [t for t in inside if t <= closers[-1]]
            elif inside[-1] + 1 < len(ids) and ids[inside[-1] + 1] in self.eos_ids:
                inside.append(inside[-1] + 1)  # the span stopped just before its end-of-turn token
            for t in inside:
                mask[t] = 1
        return ids, mask

    # -- export -------------------------------------------------------------------------

    def forget_source_fields(self):
        """Free the GGUF vocabulary lists kept for an exact export (a few MB for a 50k
        vocabulary); `to_gguf_fields` then rebuilds them from the tokenizer itself."""
        self._gguf_fields = None

    def to_gguf_fields(self) -> dict:
        """GGUF `tokenizer.ggml.*` values (keys without the prefix) for this tokenizer."""
        if self._gguf_fields is not None:
            return dict(self._gguf_fields)
        eot = next((i for i in sorted(self.eos_ids) if i != self.eos_id), None)
        return fields_from_tokenizer(
            self._tk, {"bos": self.bos_id, "eos": self.eos_id, "unknown": self.unknown_id,
                       "padding": self.padding_id, "eot": eot},
            add_bos=self.add_bos, add_eos=self._adds(self.eos_id, at=-1))

    def to_hf_files(self) -> tuple[str, dict]:
        """(tokenizer.json text, tokenizer_config.json dict) for writing a HF folder."""
        def name(tid):
            return self.id_to_token(tid) if tid is not None else None

        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(self.bos_id),
                  "eos_token": name(self.eos_id), "unk_token": name(self.unknown_id),
                  "pad_token": name(self.padding_id), "add_bos_token": self.add_bos,
                  "clean_up_tokenization_spaces": False}
        if not self.chat_template.is_fallback:
            config["chat_template"] = self.chat_template.source
        return self._tk.to_str(), {k: v for k, v in config.items() if v is not None}

    @property
    def special_ids(self) -> set[int]:
        """Ids of control and unknown tokens (what skip_special_tokens drops)."""
        if self._gguf_fields is not None:
            types = self._gguf_fields.get("token_type") or []
            return {i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)}
        return {i for i, t in self._tk.get_added_tokens_decoder().items() if t.special}


def check_text(text) -> None:
    """HomellmError unless `text` is a str the tokenizer can take: valid Unicode, without
    lone UTF-16 surrogates (which have no UTF-8 form)."""
    if not isinstance(text, str):
        raise HomellmError(f"expected text (a str) to tokenize, got {type(text).__name__}")
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HomellmError(f"the text is not valid Unicode: a lone surrogate {text[e.start]!r} at "
                           f"character {e.start} (invalid UTF-8 bytes decoded with "
                           f"surrogateescape, or a broken \\u escape)") from None


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HomellmError(f"{path}: not valid JSON ({e})") from None


def _untrimmed_offsets(tk: HFTokenizer) -> HFTokenizer:
    """The same tokenizer with ByteLevel's `trim_offsets` off: ids are unchanged, but each
    token's offsets then cover all its characters, spaces included (encode_chat needs that)."""
    spec = json.loads(tk.to_str())

    def untrim(node):
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel" and node.get("trim_offsets"):
                node["trim_offsets"] = False
            for value in node.values():
                untrim(value)
        elif isinstance(node, list):
            for value in node:
                untrim(value)

    untrim(spec.get("post_processor"))
    return HFTokenizer.from_str(json.dumps(spec))
