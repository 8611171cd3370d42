"""Constrained decoding (engine/constrain.py): response_format json_object / json_schema.

- The mask against a brute-force reference: on a tiny SentencePiece vocabulary with byte
  fallback, and on the default model's byte-level vocabulary, every token is allowed exactly
  when prefix + its bytes is still a prefix of some text the schema accepts (a regex written
  here for that schema, matched partially by the `regex` package), and EOS exactly when the
  prefix is a complete value.
- The default model (SmolLM2-135M-Instruct Q4_1), greedy and at temperature 1.5 with several
  seeds: replies parse (json_object) and validate with `jsonschema` (json_schema), and end
  with finish_reason "stop" when the value is complete; a greedy constrained reply is the
  argmax of the model's own (teacher-forced) logits over the allowed tokens at every step.
- Bad response_format values and schemas: ValueError naming the field.
- `homellm run --format json|SCHEMA.json` prints valid JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
import regex

from gguf_fixtures import byte_tokens
from homellm.engine.constrain import compile_response_format, parse_response_format
from homellm.tokenizer import Tokenizer

SPACE = "\u2581"

# -- a schema and its language as a regex over bytes (the brute-force reference) -------------

SCHEMA = {"type": "object",
          "properties": {"a": {"type": "integer"}, "b": {"enum": ["é", "x"]}, "c": {"type": "boolean"}},
          "required": ["a", "b", "c"], "additionalProperties": False}
WS = rb"(?:\r?\n)?[ \t]{0,32}"   # constrain.JSON_WHITESPACE: one line break at most, then indentation
LANGUAGE = regex.compile(
    rb"\{" + WS + rb'"a"' + WS + rb":" + WS + rb"-?(?:0|[1-9][0-9]*)" + WS + rb"," + WS
    + rb'"b"' + WS + rb":" + WS + rb'(?:"\xc3\xa9"|"x")' + WS + rb"," + WS
    + rb'"c"' + WS + rb":" + WS + rb"(?:true|false)" + WS + rb"\}")
VALID = ['{"a": 12, "b": "é", "c": true}', '{\n  "a": -7,\n  "b": "x",\n  "c": false\n}',
         '{"a":0,"b":"é","c":false}']


def reference_allowed(prefix: bytes, token_bytes: list[bytes | None], eos_ids: set[int]) -> np.ndarray:
    """Tokens whose bytes keep `prefix` a prefix of the language; EOS iff prefix is complete.
    token_bytes[i] is None for special tokens (never allowed, EOS aside)."""
    done = (m := LANGUAGE.fullmatch(prefix, partial=True)) is not None and not m.partial
    out = np.zeros(len(token_bytes), dtype=bool)
    for i, b in enumerate(token_bytes):
        if b is None:
            out[i] = i in eos_ids and done
        elif b:
            out[i] = LANGUAGE.fullmatch(prefix + b, partial=True) is not None
    return out


def forced_byte(prefix: bytes) -> bool:
    """Whether exactly one byte can follow `prefix` (and the prefix is not complete)."""
    m = LANGUAGE.fullmatch(prefix, partial=True)
    if m is None or not m.partial:
        return False
    return sum(LANGUAGE.fullmatch(prefix + bytes([b]), partial=True) is not None for b in range(256)) == 1


def check_against_reference(tokenizer: Tokenizer, token_bytes: list[bytes | None], paths: list[list[int]]):
    """Walk each token path, comparing the mask with the reference before every token.

    Every allowed token is viable (always). Where the next bytes are free, every viable byte
    string has an allowed token: exact, except that of several tokens writing the same bytes
    (a byte-fallback <0x61> and the piece "a") llguidance may allow one. Where the next bytes
    are forced (after '{"' only 'a":' can come), llguidance allows only the first token of
    the tokenizer's own encoding of them (so forced text is tokenized as in training); the
    texts reachable are the same. A path token outside the mask is replaced by an allowed one
    with the same bytes, else by the forced one."""
    grammar = compile_response_format(
        tokenizer, {"type": "json_schema", "json_schema": {"name": "abc", "schema": SCHEMA}})
    byte_token = {}  # a one-byte token for each byte, to re-spell the rest of a path
    for i, b in enumerate(token_bytes):
        if b is not None and len(b) == 1:
            byte_token.setdefault(b, i)
    free = forced = 0
    for path in paths:
        c = grammar.start()
        prefix, queue = b"", list(path)
        while True:
            got = c.allowed()
            want = reference_allowed(prefix, token_bytes, tokenizer.eos_ids)
            unsound = np.flatnonzero(got & ~want)
            assert unsound.size == 0, (prefix, [token_bytes[i] for i in unsound[:10]])
            if forced_byte(prefix):
                assert got.any(), prefix
                forced += 1
            else:
                missing = {token_bytes[i] for i in np.flatnonzero(want & ~got)} \
                    - {token_bytes[i] for i in np.flatnonzero(got)}
                assert not missing, (prefix, sorted(missing, key=str)[:10])
                free += 1
            if not queue:
                break
            token = queue.pop(0)
            if not got[token]:
                rest = token_bytes[token] + b"".join(token_bytes[t] for t in queue)
                same = [int(i) for i in np.flatnonzero(got) if token_bytes[i] == token_bytes[token]]
                if same:
                    token = same[0]
                else:  # forced text spelled differently: take the forced token, spell the rest by bytes
                    [token] = [int(i) for i in np.flatnonzero(got) if rest.startswith(token_bytes[i])]
                    queue = [byte_token[bytes([b])] for b in rest[len(token_bytes[token]):]]
            c.advance(token)
            prefix += token_bytes[token]
        assert c.done and LANGUAGE.fullmatch(prefix)
    return free, forced


# -- a tiny SentencePiece vocabulary with byte fallback ---------------------------------------

PIECES = ["{", "}", '"', ":", ",", "a", "b", "c", "x", "1", "2", "12", '{"', '":', SPACE, SPACE + '"',
          SPACE + "{", '"a', '"b"', "tr", "ue", "true", "fal", "se", SPACE + "1", "é", '"é"', "\n",
          SPACE * 2, "-", "7", "0", SPACE + "-"]


@pytest.fixture(scope="module")
def spm_tokenizer() -> tuple[Tokenizer, list[bytes | None]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(PIECES)
    scores = [0.0] * 259 + [-float(i) for i in range(len(PIECES))]
    tk = Tokenizer.from_gguf_fields({"model": "llama", "tokens": tokens, "token_type": types,
                                     "scores": scores, "bos_token_id": 1, "eos_token_id": 2,
                                     "unknown_token_id": 0, "add_space_prefix": False})
    # what each token writes, from the vocabulary itself: <0xHH> is one byte, "▁" a space
    token_bytes = [None] * 3 + [bytes([b]) for b in range(256)] + \
                  [p.replace(SPACE, " ").encode() for p in PIECES]
    return tk, token_bytes


def test_mask_matches_brute_force_on_a_sentencepiece_vocabulary(spm_tokenizer):
    tk, token_bytes = spm_tokenizer
    assert tk.eos_ids == {2}
    paths = [tk.encode(text, add_special_tokens=False) for text in VALID]
    # the same texts one byte-fallback token per byte: "é" arrives as <0xC3> <0xA9>
    paths += [[3 + b for b in text.encode()] for text in VALID[:2]]
    # and pieces spelled out: '{"a": 12, "b": "é", "c": true}' another way
    pieces = ['{"', "a", '":', SPACE, "12", ",", SPACE + '"', "b", '"', ":", SPACE, '"é"', ",",
              SPACE + '"', "c", '":', SPACE, "tr", "ue", "}"]
    paths.append([259 + PIECES.index(p) for p in pieces])
    assert any(3 + 0xC3 in p for p in paths)
    free, forced = check_against_reference(tk, token_bytes, paths)
    assert free > 40 and forced > 20


def test_mask_matches_brute_force_on_the_default_vocabulary(default_gguf):
    from homellm.model.formats import open_checkpoint
    ckpt = open_checkpoint(default_gguf)
    tk = Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)
    # GPT-2's byte alphabet, inverted: what each byte-level token writes
    byte_of = {ch: b for b, ch in enumerate(byte_tokens())}
    special = tk.special_ids
    token_bytes = [None if i in special else bytes(byte_of[ch] for ch in tk.id_to_token(i))
                   for i in range(tk.vocab_size)]
    paths = [tk.encode(text, add_special_tokens=False) for text in VALID[:2]]
    free, forced = check_against_reference(tk, token_bytes, paths)
    assert free > 10 and forced > 5


# -- the interface ------------------------------------------------------------------------

def test_padded_logits_cache_and_independent_matchers(spm_tokenizer):
    tk, token_bytes = spm_tokenizer
    fmt = {"type": "json_schema", "json_schema": {"name": "abc", "schema": SCHEMA, "strict": True}}
    grammar = compile_response_format(tk, fmt)
    assert compile_response_format(tk, json.loads(json.dumps(fmt))) is grammar  # cached
    assert compile_response_format(tk, {"type": "json_object"}) is not grammar
    assert compile_response_format(tk, None) is None
    assert compile_response_format(tk, {"type": "text"}) is None

    first, second = grammar.start(), grammar.start()
    logits = np.random.default_rng(0).standard_normal(tk.vocab_size + 7).astype(np.float32)
    before = logits.copy()
    first.mask_logits(logits)
    allowed = np.isfinite(logits)
    assert allowed[:tk.vocab_size].tolist() == first.allowed().tolist()
    assert not allowed[tk.vocab_size:].any()  # padded rows past the vocabulary
    np.testing.assert_array_equal(logits[allowed], before[allowed])
    assert {token_bytes[i] for i in np.flatnonzero(allowed)} == {b"{", b'{"'}

    first.advance(tk.token_to_id('{"'))
    with pytest.raises(ValueError, match="not allowed"):
        first.advance(tk.token_to_id("}"))
    # a second matcher from the same grammar starts afresh
    assert second.allowed().tolist() == grammar.start().allowed().tolist()
    assert not second.done

    torch = pytest.importorskip("torch")
    t = torch.from_numpy(before.copy())
    second.mask_logits(t)
    np.testing.assert_array_equal(t.numpy(), np.where(allowed, before, -np.inf))


BAD_FORMATS = [
    ("json", "response_format: expected an object"),
    ({"type": "xml"}, "response_format.type"),
    ({}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema: expected an object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema: missing"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
     "response_format.json_schema.strict"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format.json_schema.schema"),
]
BAD_SCHEMAS = [  # each a clear error, never a silently unconstrained reply
    ({"type": "nonsense"}, "Invalid type"),
    ({"type": "string", "pattern": "[a-"}, "regex parse error"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "if"),
    ({"type": "string", "format": "no-such-format"}, "format"),
    ({"type": "integer", "minimum": 5, "maximum": 3}, "minimum"),
    ({"$ref": "#/$defs/missing"}, "missing"),
    ({"enum": []}, "nsatisfiable"),
    (False, "nsatisfiable"),
    ({"type": "number", "minimum": float("nan")}, "not representable as JSON"),
]


@pytest.mark.parametrize("fmt, message", BAD_FORMATS)
def test_bad_response_format_names_the_field(spm_tokenizer, fmt, message):
    with pytest.raises(ValueError, match=regex.escape(message)):
        compile_response_format(spm_tokenizer[0], fmt)


@pytest.mark.parametrize("schema, message", BAD_SCHEMAS)
def test_unsupported_or_invalid_schema_is_a_value_error(spm_tokenizer, schema, message):
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    with pytest.raises(ValueError, match=r"^response_format\.json_schema\.schema: .*" + regex.escape(message)):
        compile_response_format(spm_tokenizer[0], fmt)


def nested(depth: int, leaf: dict, wrap) -> dict:
    for _ in range(depth):  # built in a loop: the test itself must not recurse
        leaf = wrap(leaf)
    return leaf


HOSTILE_SCHEMAS = [  # from the reliability review (L2, L3): each a 400-style ValueError naming the field
    ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "a $ref chain leads back to itself"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
     "a $ref chain leads back to itself"),
    ({"type": "string", "pattern": "^(a{1000}){1000}$"}, "too large to enforce"),
    ({"const": "x" * 1_000_000}, "too large to enforce"),
    (nested(5000, {"type": "string"}, lambda s: {"type": "object", "properties": {"a": s}}),
     "nested more than 128 levels deep"),
    (nested(20000, {"type": "integer"}, lambda s: {"type": "array", "items": s}),
     "nested more than 128 levels deep"),
]


@pytest.mark.parametrize("schema, message", HOSTILE_SCHEMAS, ids=["ref_self", "ref_mutual", "regex_repeat",
                                                                 "const_1mb", "props_5000", "arrays_20000"])
def test_hostile_schema_is_a_clear_value_error(spm_tokenizer, schema, message):
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    with pytest.raises(ValueError, match=r"^response_format\.json_schema\.schema: .*" + regex.escape(message)) as e:
        compile_response_format(spm_tokenizer[0], fmt)
    assert "NoExtensionBias" not in str(e.value) and len(str(e.value)) < 600


def test_a_recursive_schema_that_produces_text_still_compiles(spm_tokenizer):
    tree = {"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"}
    deep = nested(100, {"type": "integer"}, lambda s: {"type": "array", "items": s})
    for schema in (tree, deep):  # 101 levels: under our bound, accepted by llguidance
        grammar = compile_response_format(spm_tokenizer[0], {"type": "json_schema",
                                                             "json_schema": {"name": "s", "schema": schema}})
        assert grammar.start().allowed().any()


def test_parse_response_format():
    assert parse_response_format({"type": "json_object"}) == {"type": "object"}
    assert parse_response_format({"type": "json_schema", "json_schema": {"schema": True}}) == {}
    assert parse_response_format(None) is None


# -- the default model ----------------------------------------------------------------------

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "person": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["name", "age"], "additionalProperties": False}},
        "required": ["person"], "additionalProperties": False},
    "array_enum": {"type": "object", "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                   "minItems": 2, "maxItems": 3}},
        "required": ["colors"], "additionalProperties": False},
    "pattern_bool": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "valid": {"type": "boolean"},
        "note": {"type": ["string", "null"], "maxLength": 12}},
        "required": ["code", "valid", "note"], "additionalProperties": False},
    "top_level_array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                        "minItems": 1, "maxItems": 4},
}
PROMPTS = {"nested": "Describe a person named Ada as JSON.",
           "array_enum": "List some colors as JSON.",
           "pattern_bool": "Give a product code as JSON.",
           "top_level_array": "Give a few small numbers as a JSON array."}
SAMPLING = [{"temperature": 0}, {"temperature": 1.5, "seed": 1}, {"temperature": 1.5, "seed": 2}]


@pytest.fixture(scope="module")
def model(default_gguf):
    import homellm
    return homellm.load(default_gguf, ctx=1024)


def reply(model, prompt: str, fmt: dict, max_tokens: int = 200, **sampling):
    steps = list(model.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                            response_format=fmt, **sampling))
    return "".join(s.text for s in steps), steps


@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "t1.5-seed1", "t1.5-seed2"])
def test_json_object_replies_parse(model, sampling):
    text, steps = reply(model, "Give me a JSON object describing a cat with a name and an age.",
                        {"type": "json_object"}, **sampling)
    assert isinstance(json.loads(text), dict), text
    assert steps[-1].finish_reason == "stop"
    assert steps[-2].token not in model.tokenizer.eos_ids  # it stopped at "}", not at EOS


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_replies_validate(model, name):
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
    texts = set()
    for sampling in SAMPLING:
        text, steps = reply(model, PROMPTS[name], fmt, **sampling)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
        assert steps[-1].finish_reason == "stop", (sampling, text)
        texts.add(text)
    assert len(texts) >= 2  # the seeds really sampled


def test_greedy_constrained_reply_is_the_masked_argmax(model):
    """Each generated token is the best allowed token under the model's teacher-forced logits."""
    fmt = {"type": "json_schema", "json_schema": {"name": "nested", "schema": SCHEMAS["nested"]}}
    messages = [{"role": "user", "content": PROMPTS["nested"]}]
    steps = list(model.chat(messages, max_tokens=100, temperature=0, response_format=fmt))
    out = [s.token for s in steps if s.token is not None]
    prompt = model.tokenizer.apply_chat_template(messages)
    logits = model.logits(prompt + out).float().numpy()[len(prompt) - 1:]  # (len(out) + 1, vocab)
    c = compile_response_format(model.tokenizer, fmt).start()
    for t, token in enumerate(out):
        row = c.mask_logits(logits[t].copy())
        assert np.isfinite(row[token])
        assert row[token] >= row.max() - 0.05, (t, token, int(row.argmax()))  # ties: kernel noise
        c.advance(token)
    assert c.done and steps[-1].finish_reason == "stop"


def test_raw_generate_with_a_top_level_scalar(model):
    """No chat template; a top-level integer can always take another digit, so the reply ends
    when the model picks EOS (allowed once the number is complete) or at max_tokens."""
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "integer", "minimum": 10, "maximum": 99}}}
    steps = list(model.generate("The number of legs of a spider, as JSON:", max_tokens=10,
                                temperature=0, response_format=fmt))
    text = "".join(s.text for s in steps)
    assert 10 <= json.loads(text) <= 99 and steps[-1].finish_reason == "stop", text
    assert len(steps) - 1 <= 2  # two digits, then only EOS is allowed


def test_max_tokens_cuts_a_constrained_reply_with_length(model):
    text, steps = reply(model, PROMPTS["nested"], {"type": "json_object"}, max_tokens=5, temperature=0)
    assert steps[-1].finish_reason == "length" and len(steps) == 6
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_bad_format_raises_before_generating(model):
    with pytest.raises(ValueError, match="response_format.type"):
        model.chat([{"role": "user", "content": "hi"}], response_format={"type": "yaml"})
    with pytest.raises(ValueError, match="response_format.json_schema.schema"):
        model.generate("hi", response_format={"type": "json_schema", "json_schema": {"schema": {"not": {}}}})


# -- the CLI -----------------------------------------------------------------------------------

def run_cli(*args, home) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOMELLM_HOME": str(home)}
    env.pop("HOMELLM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "homellm", "run", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_run_format(homellm_home, default_gguf, tmp_path):
    schema_file = tmp_path / "city.json"
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
              "required": ["city"], "additionalProperties": False}
    schema_file.write_text(json.dumps(schema))
    proc = run_cli("-m", str(default_gguf), "--temperature", "0", "--max-tokens", "100", "--format", "json",
                   "Give me a JSON object describing a cat with a name and an age.", home=homellm_home)
    assert proc.returncode == 0, proc.stderr
    assert isinstance(json.loads(proc.stdout), dict)
    proc = run_cli("-m", str(default_gguf), "--temperature", "0", "--max-tokens", "100", "--json",
                   "--format", str(schema_file), "What is the capital of France?", home=homellm_home)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    jsonschema.validate(json.loads(out["text"]), schema)
    assert out["finish_reason"] == "stop"

    bad = tmp_path / "bad.json"
    bad.write_text('{"not": {}}')
    for fmt, message in [(str(bad), "response_format.json_schema.schema: Unimplemented keys"),
                         (str(tmp_path / "missing.json"), "expected 'json' or a JSON Schema file"),
                         (str(tmp_path), "expected 'json' or a JSON Schema file")]:
        proc = run_cli("-m", str(default_gguf), "--format", fmt, "hi", home=homellm_home)
        last = proc.stderr.strip().splitlines()[-1]  # (a kernel build may announce itself first)
        assert proc.returncode == 1 and last.startswith("error: --format"), proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
    bad.write_text("{not json")
    proc = run_cli("--format", str(bad), "hi", home=homellm_home)
    assert proc.returncode == 1 and "not valid JSON" in proc.stderr and "Traceback" not in proc.stderr


# -- tokenizer.json tokenizers ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sentencepiece", "byte_level"])
def test_tokenizer_json_gives_the_same_masks(kind, spm_tokenizer, default_gguf, tmp_path):
    """A tokenizer read from tokenizer.json (what a HF folder has) masks like the GGUF one."""
    if kind == "sentencepiece":
        gguf_tk = spm_tokenizer[0]
    else:
        from homellm.model.formats import open_checkpoint
        ckpt = open_checkpoint(default_gguf)
        gguf_tk = Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)
    text, config = gguf_tk.to_hf_files()
    (tmp_path / "tokenizer.json").write_text(text)
    json_tk = Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json", config)
    assert json_tk.eos_ids == gguf_tk.eos_ids
    fmt = {"type": "json_schema", "json_schema": {"name": "abc", "schema": SCHEMA}}
    a, b = (compile_response_format(tk, fmt).start() for tk in (gguf_tk, json_tk))
    path = gguf_tk.encode(VALID[1], add_special_tokens=False)
    for token in path:
        np.testing.assert_array_equal(a.allowed(), b.allowed())
        a.advance(token)
        b.advance(token)
    assert a.done and b.done
