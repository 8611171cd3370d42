"""Constrained decoding: an OpenAI `response_format` turned into a mask over the next token.

    grammar = compile_response_format(tokenizer, {"type": "json_object"})   # None for plain text
    c = grammar.start()          # one matcher per generation
    c.mask_logits(logits)        # (vocab,) in place: -inf wherever the value could not continue
    c.advance(token)             # after sampling
    c.done                       # the value is complete: stop with finish_reason "stop"

The grammar engine is llguidance (the one llama.cpp, vLLM and SGLang use): it compiles a
JSON Schema (Draft 2020-12 subset; docs/json_schema.md in its repository lists what it
supports) to a grammar, and computes the set of allowed tokens from a trie of the token
bytes. Its tokenizer is built from our `tokenizers.Tokenizer` serialized as tokenizer.json,
which covers byte-level BPE ("gpt2" GGUF vocabularies, tokenizer.json files) and
SentencePiece BPE with byte fallback ("llama" GGUF vocabularies, `<0x41>` tokens).

The mask is exact where the next bytes are free: a token is allowed iff its bytes keep the
output a prefix of some valid value (of several tokens with the same bytes, e.g. `<0x61>` and
"a", llguidance may allow one). Where the grammar forces the next bytes (the rest of a
property name, `true` after `tr`), it allows the first token of the tokenizer's own encoding
of them, so forced text is tokenized as the model saw it in training. tests/test_constrain.py
checks both against a brute-force reference.

What a schema asks for that llguidance cannot enforce (`not`, `if`/`then`, `uniqueItems`,
an unknown `format`, ...) is a ValueError naming the field, never a silently unconstrained
generation. Property order is fixed to the order of `properties` in the schema.
"""
from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping

import llguidance
import numpy as np

# The whitespace between JSON tokens: at most one line break (CR LF or LF), then at most 32
# spaces or tabs of indentation. Unbounded whitespace (llguidance's default) lets a small model
# emit blank lines until max_tokens; llama.cpp's json.gbnf bounds it likewise. Pretty-printed
# JSON (one item a line, indented) still fits. A schema's top-level "x-guidance" object may
# override this (llguidance applies defaults, then x-guidance).
JSON_WHITESPACE = r"(\x0D?\x0A)?[\x20\x09]{0,32}"
JSON_OBJECT_SCHEMA = {"type": "object"}   # what {"type": "json_object"} means: any JSON object
LARK_PREFIX = "%lark\n"  # cache keys of Lark grammars (a schema's JSON text never starts so)
SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")   # OpenAI's rule for json_schema.name
GRAMMARS_PER_TOKENIZER = 64  # compiled grammars kept per tokenizer (least recently used go)
# How deeply a schema's JSON may nest. llguidance refuses deeper schemas anyway (its JSON
# parser stops at 128 levels); we check first, without recursion, because json.dumps of a
# schema 1,000 levels deep raises RecursionError rather than a ValueError.
SCHEMA_MAX_DEPTH = 128
# llguidance messages that name its internals, and what they mean for the schema's author
_LLGUIDANCE_LIMITS = {
    "NoExtensionBias": "no value can match the schema: a $ref chain leads back to itself "
                       "before any text (e.g. a $ref to itself)",
    "too many expressions constructed": "the schema is too large to enforce: a pattern, const "
                                        "or enum expands past the grammar engine's limit "
                                        "(lexer: too many expressions constructed)",
}


def parse_response_format(response_format) -> dict | None:
    """The JSON Schema an OpenAI `response_format` asks for; None for plain text.

    Raises ValueError naming the offending field, e.g. "response_format.json_schema.schema".
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ValueError(f"response_format: expected an object such as {{\"type\": \"json_object\"}}, "
                         f"got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind != "json_schema":
        raise ValueError(f"response_format.type: expected 'text', 'json_object' or 'json_schema', "
                         f"got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise ValueError("response_format.json_schema: expected an object with 'name' and 'schema' "
                         f"(type json_schema), got {type(spec).__name__}")
    name = spec.get("name")
    if name is not None and not (isinstance(name, str) and SCHEMA_NAME.match(name)):
        raise ValueError(f"response_format.json_schema.name: expected 1 to 64 characters of "
                         f"a-z, A-Z, 0-9, '_' or '-', got {name!r}")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ValueError(f"response_format.json_schema.strict: expected true, false or null, got {strict!r}")
    if "schema" not in spec:
        raise ValueError("response_format.json_schema.schema: missing (the JSON Schema the reply must follow)")
    schema = spec["schema"]
    if not isinstance(schema, (Mapping, bool)):
        raise ValueError(f"response_format.json_schema.schema: expected a JSON Schema object, "
                         f"got {type(schema).__name__}")
    if schema is False:
        raise ValueError("response_format.json_schema.schema: false is unsatisfiable (it accepts no value)")
    return dict(schema) if isinstance(schema, Mapping) else {}  # true: any JSON value


def compile_response_format(tokenizer, response_format) -> Grammar | None:
    """A compiled grammar for `response_format` (an OpenAI request field) and `tokenizer`
    (homellm.tokenizer.Tokenizer); None when the reply is plain text.

    Grammars are cached per (tokenizer, schema text): a repeated schema costs a dict lookup.
    """
    schema = parse_response_format(response_format)
    if schema is None:
        return None
    field = "response_format.json_schema.schema" if schema is not JSON_OBJECT_SCHEMA \
        else "response_format"
    depth = _nesting_depth(schema, SCHEMA_MAX_DEPTH)
    if depth > SCHEMA_MAX_DEPTH:
        raise ValueError(f"{field}: nested more than {SCHEMA_MAX_DEPTH} levels deep "
                         f"(at most {SCHEMA_MAX_DEPTH} are supported)")
    schema = closed_objects(schema)
    try:
        key = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{field}: not representable as JSON ({e})") from None
    return _grammars_for(tokenizer).get(key, field)


def lark_json(schema) -> str:
    """`%json {...}`: a JSON Schema inside a Lark grammar (llguidance), with our bounded
    whitespace (the schema's own "x-guidance" wins). ValueError if it cannot be JSON."""
    depth = _nesting_depth(schema, SCHEMA_MAX_DEPTH)
    if depth > SCHEMA_MAX_DEPTH:
        raise ValueError(f"nested more than {SCHEMA_MAX_DEPTH} levels deep")
    schema = closed_objects(schema)
    if isinstance(schema, Mapping):
        guidance = {"whitespace_pattern": JSON_WHITESPACE, **dict(schema.get("x-guidance") or {})}
        schema = {**schema, "x-guidance": guidance}
    try:
        return "%json " + json.dumps(schema, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"not representable as JSON ({e})") from None


def compile_lark(tokenizer, lark: str, field: str) -> Grammar:
    """A compiled Lark grammar (llguidance's dialect: `%json {schema}`, `<[token id]>`) for
    `tokenizer`, cached like schemas; ValueError naming `field` if it cannot be followed."""
    return _grammars_for(tokenizer).get(LARK_PREFIX + lark, field)


# Keywords whose values are schemas (or maps / lists of schemas), where closed_objects walks.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_ONES = ("items", "additionalProperties", "not", "if", "then", "else", "contains",
                "propertyNames", "unevaluatedProperties", "additionalItems")


def closed_objects(schema):
    """`schema` with `"additionalProperties": false` on every object schema that lists
    `properties` and says nothing about other keys, as llama.cpp's json-schema-to-grammar does
    by default: a small model otherwise invents keys after the listed ones until max_tokens,
    instead of closing the object. What it generates still validates against the original
    schema. Under `allOf` nothing is closed (each branch lists only some of the keys).
    A copy; the input is not changed. Iterative (schemas may nest deeply)."""
    if not isinstance(schema, Mapping):
        return schema
    root = dict(schema)
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node.get("properties"), Mapping) and "additionalProperties" not in node \
                and "unevaluatedProperties" not in node and node.get("type", "object") == "object":
            node["additionalProperties"] = False
        for key in _SCHEMA_MAPS:
            if isinstance(node.get(key), Mapping):
                node[key] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in node[key].items()}
                stack.extend(v for v in node[key].values() if isinstance(v, dict))
        for key in _SCHEMA_LISTS:
            if isinstance(node.get(key), list):
                node[key] = [dict(v) if isinstance(v, Mapping) else v for v in node[key]]
                stack.extend(v for v in node[key] if isinstance(v, dict))
        for key in _SCHEMA_ONES:
            if isinstance(node.get(key), Mapping):
                node[key] = dict(node[key])
                stack.append(node[key])
    return root


class Grammar:
    """One schema compiled for one tokenizer. `start()` gives a fresh Constraint."""

    def __init__(self, template: llguidance.LLMatcher, vocab_size: int, schema_text: str):
        self._template = template  # never advanced: each start() copies it
        self.vocab_size = vocab_size
        self.schema_text = schema_text

    def start(self) -> Constraint:
        return Constraint(self._template.deep_copy(), self.vocab_size)


class Constraint:
    """The state of one constrained generation: which tokens may come next."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)  # 1 bit per token id

    def _fill_bits(self):
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._matcher.is_error():
            raise ValueError(f"constrained decoding failed: {_one_line(self._matcher.get_error())}")
        if not self._bits.any():
            raise ValueError("constrained decoding: no token of the vocabulary can continue the output")

    def allowed(self) -> np.ndarray:
        """(vocab_size,) bool: the tokens that keep the output a valid prefix (EOS once complete)."""
        self._fill_bits()
        return self._unpacked()

    def _unpacked(self) -> np.ndarray:
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little",
                             count=self.vocab_size).view(bool)

    def mask_logits(self, logits):
        """Set logits (vocab,) of disallowed tokens to -inf, in place; rows past the tokenizer's
        vocabulary (padded embeddings) too. `logits`: a float32 numpy array or torch tensor
        (any device). Returns `logits`."""
        self._fill_bits()
        n = min(self.vocab_size, logits.shape[-1])
        values = logits if isinstance(logits, np.ndarray) else _numpy_view(logits)
        if values is not None:
            # numpy, single-threaded: ~0.04 ms for 49k tokens, where a torch op of that size
            # waits ~0.3-5 ms for its thread pool on a busy machine
            blocked = np.unpackbits(np.invert(self._bits).view(np.uint8), bitorder="little",
                                    count=n).view(bool)
            np.copyto(values[..., :n], -np.inf, where=blocked)
            values[..., n:] = -np.inf
            return logits
        import torch
        allowed = torch.from_numpy(self._unpacked()[:n].copy()).to(logits.device)
        with torch.inference_mode():  # the engine's torch logits are inference tensors
            logits[..., :n].masked_fill_(~allowed, float("-inf"))
            logits[..., n:] = float("-inf")
        return logits

    def advance(self, token: int):
        """Take the sampled token; ValueError if the grammar did not allow it (the Constraint
        is then spent: start another)."""
        if not self._matcher.consume_token(int(token)):
            raw = self._matcher.get_error()
            if any(internal in raw for internal in _LLGUIDANCE_LIMITS):  # not this token's fault
                raise ValueError(f"constrained decoding failed: {_one_line(raw)}")
            raise ValueError(f"token {int(token)} is not allowed by the response format: "
                             f"{_one_line(raw)}")

    @property
    def done(self) -> bool:
        """The value is complete and nothing but EOS can follow it."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def accepting(self) -> bool:
        """The output so far is a complete value (more may still follow, e.g. digits)."""
        return self._matcher.is_accepting()


class _TokenizerGrammars:
    """llguidance's view of one tokenizer, and the grammars compiled for it (an LRU)."""

    def __init__(self, tokenizer):
        try:
            # tokenizer.json text: llguidance reads the byte-level / byte-fallback decoding from it
            self.lltokenizer = llguidance.LLTokenizer(
                tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size,
                eos_token=sorted(tokenizer.eos_ids) or None,
                slices=llguidance.LLTokenizer.json_slices())
        except Exception as e:  # the Rust side raises plain exceptions for unsupported tokenizers
            raise ValueError(f"response_format: this model's tokenizer cannot be used for "
                             f"constrained decoding ({e})") from None
        self.vocab_size = tokenizer.vocab_size
        self.grammars: OrderedDict[str, Grammar] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, schema_text: str, field: str) -> Grammar:
        with self.lock:
            grammar = self.grammars.get(schema_text)
            if grammar is not None:
                self.grammars.move_to_end(schema_text)
                return grammar
        grammar = self._compile(schema_text, field)
        with self.lock:
            self.grammars[schema_text] = grammar
            while len(self.grammars) > GRAMMARS_PER_TOKENIZER:
                self.grammars.popitem(last=False)
        return grammar

    def _compile(self, schema_text: str, field: str) -> Grammar:
        try:
            if schema_text.startswith(LARK_PREFIX):
                text = llguidance.LLMatcher.grammar_from_lark(schema_text[len(LARK_PREFIX):])
            else:
                text = llguidance.LLMatcher.grammar_from_json_schema(
                    schema_text, defaults={"whitespace_pattern": JSON_WHITESPACE})
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, self.lltokenizer)
        if failed:
            raise ValueError(f"{field}: {_one_line(messages[0])}")
        matcher = llguidance.LLMatcher(self.lltokenizer, text, log_level=0)
        if matcher.is_error():
            raise ValueError(f"{field}: {_one_line(matcher.get_error())}")
        grammar = Grammar(matcher, self.vocab_size, schema_text)
        # Some schemas compile but fail at the first mask (a $ref to itself) or at the first
        # token (a lexer that outgrows its limits): find out now, on a copy, so that they are
        # a bad request rather than a failure in the middle of a generation.
        probe = grammar.start()
        try:
            first = np.flatnonzero(probe.allowed())
            if not probe._matcher.consume_token(int(first[0])):
                raise ValueError(_one_line(probe._matcher.get_error()))
            if not probe._matcher.is_stopped():
                probe.allowed()
        except ValueError as e:
            detail = str(e).removeprefix("constrained decoding failed: ")
            raise ValueError(f"{field}: the schema compiles but cannot be followed from its "
                             f"first token ({detail})") from None
        return grammar


def _numpy_view(tensor):
    """A numpy view of a CPU float32 contiguous torch tensor (writes go through); else None."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or str(tensor.dtype) != "torch.float32":
        return None
    try:
        return tensor.numpy()
    except RuntimeError:  # e.g. a tensor that requires grad
        return None


_BY_TOKENIZER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BY_TOKENIZER_LOCK = threading.Lock()


def _grammars_for(tokenizer) -> _TokenizerGrammars:
    with _BY_TOKENIZER_LOCK:  # building llguidance's tokenizer takes ~0.3 s for 50k tokens: once
        entry = _BY_TOKENIZER.get(tokenizer)
        if entry is None:
            entry = _BY_TOKENIZER[tokenizer] = _TokenizerGrammars(tokenizer)
        return entry


def _nesting_depth(value, limit: int) -> int:
    """How many levels of objects and arrays `value` nests (a scalar: 0), counted without
    recursion; stops counting once past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _one_line(message: str) -> str:
    """An llguidance message on one line, without the parser state dump some carry; one that
    names an internal limit says what it means for the schema."""
    text = " ".join(message.split("<state>")[0].split())
    for internal, meaning in _LLGUIDANCE_LIMITS.items():
        if internal in text:
            return meaning
    return text[:500] or "invalid schema"
