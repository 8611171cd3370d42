"""Tokenizer parity: our tokenizer vs transformers (GGUF, tokenizer.json) and vs sentencepiece."""
import io
import json

import pytest

from homellm.errors import HomellmError
from homellm.tokenizer.chat_template import ChatTemplate
from homellm.tokenizer.gguf_vocab import sentencepiece_merges
from homellm.tokenizer.tokenizer import Tokenizer

TEXTS = [
    "Hello world! 123",
    "The capital of France is Paris. It's lovely; they'll've said so.",
    "Café déjà vu, naïve façade, Größe, ñandú.",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 😀👍🏽 🇫🇷 ❤️‍🔥 and a lone 𝔘𝔫𝔦𝔠𝔬𝔡𝔢.",
    "def add(a, b):\n    \"\"\"Sum.\"\"\"\n    return a + b\n\n\nclass X:\n\tpass\n",
    "  leading and trailing spaces   ",
    "runs\n\n\n\nof newlines\r\n and\t\ttabs \t \n mixed",
    "digits 0 7 42 1234567890 3.14159 1,000,000 2024-06-01",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "special tokens inside text: a<|im_end|>b <|endoftext|> c",
    "",
    " ",
    "\n",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "Écris un haïku 🌸"},
     {"role": "assistant", "content": "Pétales au vent\n  le printemps s'en va\n\tsilence"}],
]

THREE_TURNS = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one, in French?"},
    {"role": "assistant", "content": "Rouge — « red » 🙂"},
    {"role": "user", "content": "Count to three."},
    {"role": "assistant", "content": "1\n2\n3"},
]


# -- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def gguf_tokenizer_fields(default_gguf):
    """(tokenizer.ggml.* fields without the prefix, chat template) of the default model."""
    import gguf
    reader = gguf.GGUFReader(default_gguf)
    prefix = "tokenizer.ggml."
    fields = {k[len(prefix):]: f.contents() for k, f in reader.fields.items() if k.startswith(prefix)}
    return fields, reader.fields["tokenizer.chat_template"].contents()


@pytest.fixture(scope="session")
def ours(gguf_tokenizer_fields):
    fields, template = gguf_tokenizer_fields
    return Tokenizer.from_gguf_fields(fields, template)


@pytest.fixture(scope="session")
def reference(default_gguf):
    """transformers' tokenizer, converted by transformers from the same GGUF."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)


def reference_chat_ids(reference, messages, add_generation_prompt):
    out = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if not isinstance(out, list) else out)


def masked_runs(ids, mask):
    """The maximal runs of consecutive masked tokens."""
    runs, current = [], []
    for token, bit in zip(ids, mask):
        if bit:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + [current] if current else runs


# -- the default model's GGUF vocabulary ---------------------------------------------------------

def test_gguf_bpe_matches_transformers(ours, reference):
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference(text)["input_ids"], text
        assert ours.decode(ids) == text
        assert ours.decode(ids) == reference.decode(ids), text


def test_gguf_bpe_matches_llama_cpp_golden_ids(ours):
    # ids llama.cpp produces for SmolLM2 ("smollm" pre-tokenizer: digits split one by one)
    assert ours.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    assert ours.encode("  multiple   spaces") == [216, 2701, 256, 5600]
    assert ours.encode("\n") == [198]


def test_special_ids_and_flags(ours):
    assert ours.vocab_size == 49152
    assert ours.bos_id == 1 and ours.id_to_token(1) == "<|im_start|>"
    assert ours.eos_ids == {2} and ours.token_to_id("<|im_end|>") == 2
    assert not ours.add_bos  # SmolLM2's GGUF says add_bos_token = false
    assert ours.encode("<|im_start|>") == [1]
    assert ours.decode(ours.encode("a<|im_end|>b"), skip_special_tokens=True) == "ab"


def test_stream_decoding_concatenates_to_decode(ours):
    for text in TEXTS:
        ids = ours.encode(text)
        stream = ours.stream_decoder()
        pieces = [stream.step(i) for i in ids]
        assert "".join(pieces) == ours.decode(ids), text
    # a 4-byte emoji is spread over several byte-level tokens: nothing comes out until it is whole
    ids = ours.encode("😀")
    assert len(ids) > 1
    stream = ours.stream_decoder()
    assert [stream.step(i) for i in ids][-1] == "😀"


def test_hf_folder_matches_and_round_trips(ours, reference, tmp_path):
    reference.save_pretrained(tmp_path)
    from_folder = Tokenizer.from_hf_folder(tmp_path)
    assert from_folder.bos_id == 1 and 2 in from_folder.eos_ids
    for text in TEXTS:
        assert from_folder.encode(text) == reference(text)["input_ids"], text
    assert from_folder.render_chat(CONVERSATIONS[1]) == ours.render_chat(CONVERSATIONS[1])
    from homellm.model.formats.checkpoint import TokenizerSource
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    source = TokenizerSource(tokenizer_json=tmp_path / "tokenizer.json", tokenizer_config=config)
    assert Tokenizer.from_source(source).encode(TEXTS[10]) == ours.encode(TEXTS[10])

    # HF folder -> GGUF fields -> tokenizer, and GGUF -> tokenizer.json -> tokenizer
    fields = from_folder.to_gguf_fields()
    assert fields["model"] == "gpt2" and fields["token_type"][:3] == [3, 3, 3]
    back = Tokenizer.from_gguf_fields(fields)
    tokenizer_json, config = ours.to_hf_files()
    (tmp_path / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    again = Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json", config)
    for text in TEXTS:
        assert back.encode(text) == again.encode(text) == ours.encode(text), text
    assert again.render_chat(CONVERSATIONS[0]) == ours.render_chat(CONVERSATIONS[0])


def test_gguf_fields_round_trip(ours, gguf_tokenizer_fields):
    fields, _ = gguf_tokenizer_fields
    assert ours.to_gguf_fields()["merges"] == fields["merges"]
    assert ours.to_gguf_fields()["pre"] == "smollm"


# -- chat templates ------------------------------------------------------------------------------

def test_chat_template_matches_transformers(ours, reference):
    for messages in CONVERSATIONS + [THREE_TURNS]:
        for add_generation_prompt in (True, False):
            text = reference.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
            assert ours.render_chat(messages, add_generation_prompt) == text
            assert ours.apply_chat_template(messages, add_generation_prompt) == \
                reference_chat_ids(reference, messages, add_generation_prompt)


def test_assistant_mask_covers_exactly_the_replies(ours):
    ids, mask = ours.encode_chat(THREE_TURNS)
    assert ids == ours.apply_chat_template(THREE_TURNS, add_generation_prompt=False)
    assert len(mask) == len(ids)
    runs = masked_runs(ids, mask)
    replies = [m["content"] for m in THREE_TURNS if m["role"] == "assistant"]
    # each reply plus the <|im_end|> that closes it; not the "<|im_start|>assistant\n" header,
    # not the "\n" ChatML writes after <|im_end|>
    assert [ours.decode(run) for run in runs] == [reply + "<|im_end|>" for reply in replies]
    unmasked = ours.decode([t for t, bit in zip(ids, mask) if not bit])
    assert all(reply not in unmasked for reply in replies)
    assert "You answer briefly." in unmasked and "Count to three." in unmasked


def test_chat_template_features_and_fallback():
    template = ChatTemplate(
        "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
        "{% if loop.index > 2 %}{% break %}{% endif %}"
        "{{ bos_token }}{{ m | tojson }}{% generation %}|{% endgeneration %}{% endfor %}"
        "{{ strftime_now('%Y')[:2] }}",
        {"bos_token": "<s>"})
    messages = [{"role": "user", "content": "é"}] * 3
    assert template.render(messages) == '<s>{"role": "user", "content": "é"}|' * 2 + "20"
    with pytest.raises(HomellmError, match="no bad roles"):
        template.render([{"role": "bad", "content": ""}])

    fallback = ChatTemplate(None)
    assert fallback.is_fallback
    assert fallback.render([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_broken_template_is_a_homellm_error():
    with pytest.raises(HomellmError, match="does not compile"):
        ChatTemplate("{% for m in messages %}{{ m.content }")
    with pytest.raises(HomellmError, match="failed to render"):
        ChatTemplate("{{ messages[5].content }}").render([{"role": "user", "content": "x"}])


# -- SentencePiece "llama" vocabularies -----------------------------------------------------------

SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tokenizers split text into pieces, and pieces into ids.",
    "SentencePiece treats the input as a raw stream, spaces included.",
    "Hello world, hello there, hello again and again!",
    "Byte pair encoding merges the most frequent pairs first, then the next ones.",
    "Numbers like 12345 and 2024 appear in the text too.",
    "the theory of the thing: they then thought through these themes thoroughly",
    "indented code:\n    return value\n        nested\n",
]

SPM_TEXTS = [
    "The quick brown fox",
    "hello  world   again",
    " leading space and trailing ",
    "themes thought then thoroughly",
    "Ünïcödé ñ 日本 😀 — bytes fall back",
    "tabs\tand\nnewlines\n\n    indented",
    "12345 67 2024",
    "",
]


@pytest.fixture(scope="module")
def tiny_spm():
    """A tiny SentencePiece BPE model trained here, and the GGUF fields llama.cpp's converter
    would write for it (tokens, scores, token_type)."""
    spm = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2 as pb
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 20), model_writer=model, model_type="bpe",
        vocab_size=500, hard_vocab_limit=False, byte_fallback=True, user_defined_symbols=["<|im_start|>"],
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    proto = pb.ModelProto()
    proto.ParseFromString(model.getvalue())
    kind = pb.ModelProto.SentencePiece
    gguf_type = {kind.NORMAL: 1, kind.UNKNOWN: 2, kind.CONTROL: 3, kind.USER_DEFINED: 4,
                 kind.UNUSED: 5, kind.BYTE: 6}
    fields = {"model": "llama", "tokens": [p.piece for p in proto.pieces],
              "scores": [p.score for p in proto.pieces],
              "token_type": [gguf_type[p.type] for p in proto.pieces],
              "bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0,
              "add_bos_token": True, "add_space_prefix": True}
    return processor, fields


def test_spm_matches_sentencepiece(tiny_spm):
    processor, fields = tiny_spm
    assert len(sentencepiece_merges(fields["tokens"], fields["scores"], fields["token_type"])) > 100
    tok = Tokenizer.from_gguf_fields(fields)
    for text in SPM_TEXTS + SPM_CORPUS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == processor.encode(text), text
        assert tok.decode(ids) == text == processor.decode(ids)
        stream = tok.stream_decoder()
        assert "".join(stream.step(i) for i in ids) == text
    assert tok.encode("hi") == [1] + processor.encode("hi")  # add_bos_token
    assert tok.bos_id == 1 and tok.eos_ids == {2}
    # a user-defined token in text is one id; as in llama.cpp the text after it gets a "▁"
    # prefix again (sentencepiece itself does not do that)
    user_defined = tok.token_to_id("<|im_start|>")
    assert tok.encode("x y<|im_start|>y", add_special_tokens=False) == \
        processor.encode("x y") + [user_defined] + processor.encode("y")


def test_spm_round_trips_through_tokenizer_json(tiny_spm, tmp_path):
    processor, fields = tiny_spm
    tok = Tokenizer.from_gguf_fields(fields)
    tokenizer_json, config = tok.to_hf_files()
    (tmp_path / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    from_json = Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json", config)
    assert from_json.add_bos
    back = Tokenizer.from_gguf_fields(from_json.to_gguf_fields())
    assert back.to_gguf_fields()["token_type"] == fields["token_type"]
    for text in SPM_TEXTS:
        assert from_json.encode(text) == back.encode(text) == tok.encode(text), text


# -- errors and unknown metadata -------------------------------------------------------------------

def test_unknown_vocabulary_type_is_a_homellm_error():
    with pytest.raises(HomellmError, match="'bert'"):
        Tokenizer.from_gguf_fields({"model": "bert", "tokens": ["[CLS]"], "token_type": [3]})
    with pytest.raises(HomellmError, match="merges"):
        Tokenizer.from_gguf_fields({"model": "gpt2", "tokens": ["a"], "token_type": [1]})


def test_unknown_pre_tokenizer_warns_and_works(gguf_tokenizer_fields, ours):
    fields, template = gguf_tokenizer_fields
    with pytest.warns(UserWarning, match="some-new-model"):
        tok = Tokenizer.from_gguf_fields({**fields, "pre": "some-new-model"}, template)
    assert tok.encode("Hello world!") == ours.encode("Hello world!")


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "default", "falcon", "dbrx"])
def test_every_pre_tokenizer_family_builds_and_round_trips(gguf_tokenizer_fields, pre):
    fields, _ = gguf_tokenizer_fields
    tok = Tokenizer.from_gguf_fields({**fields, "pre": pre, "add_bos_token": None})
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text, text
    # llama.cpp adds BOS by default for llama 3 vocabularies only
    assert tok.add_bos == (pre == "llama-bpe")
    assert tok.to_gguf_fields()["pre"] == pre


def test_assistant_mask_with_an_eos_closed_template(gguf_tokenizer_fields):
    """A template that closes replies with eos_token and puts the reply after "assistant: ":
    the reply's first byte-level token (" Blue") starts on the header's space, and is masked."""
    fields, _ = gguf_tokenizer_fields
    template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}"
                "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    tok = Tokenizer.from_gguf_fields(fields, template)
    ids, mask = tok.encode_chat(THREE_TURNS)
    runs = masked_runs(ids, mask)
    replies = [m["content"] for m in THREE_TURNS if m["role"] == "assistant"]
    assert [tok.decode(run).lstrip(" ") for run in runs] == [r + "<|im_end|>" for r in replies]
    assert tok.decode(runs[0][:1]) == " Blue"  # "1\n2\n3" starts with a digit: its " " stays out


def test_from_checkpoint_source_of_read_gguf(default_gguf, ours):
    """The path the rest of homellm takes: read_gguf's TokenizerSource, numpy arrays allowed."""
    import numpy as np
    try:
        from homellm.model.formats.gguf import read_gguf
    except ImportError:
        pytest.skip("homellm.model.formats.gguf is not there yet")
    checkpoint = read_gguf(default_gguf)
    tok = Tokenizer.from_source(checkpoint.tokenizer, checkpoint.chat_template)
    for text in TEXTS:
        assert tok.encode(text) == ours.encode(text), text
    assert tok.render_chat(THREE_TURNS) == ours.render_chat(THREE_TURNS)
    fields = dict(checkpoint.tokenizer.gguf_fields)
    fields["token_type"] = np.asarray(fields["token_type"], dtype=np.int32)
    assert Tokenizer.from_gguf_fields(fields).encode(TEXTS[9]) == ours.encode(TEXTS[9])


# -- hostile templates and text: bounded, and clear errors --------------------------------------

HELLO = [{"role": "user", "content": "hi"}]
HOSTILE_TEMPLATES = {
    "{% for i in range(100000) %}{{ 'word ' * 100 }}{% endfor %}": "limit",  # 60 bytes -> 50 MB
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}": "limit",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}": "limit",
    "{% for c in messages[0].content * 1000 %}{% for d in messages[0].content * 1000 %}"
    "{% endfor %}{% endfor %}": "limit",
    "{{ 'a' * 4000000000 }}": "limit",
    "{{ [1] * 4000000000 }}": "limit",
    "{{ 10 ** 10000000 }}": "limit",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}": "limit",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}": "limit",
    "{% set ns = namespace(s='abcd') %}{% for i in range(30) %}{% set ns.s = ns.s|replace('', ns.s) %}"
    "{% endfor %}": "limit",
    "{{ 'a'|center(4000000000) }}": "limit",
    "{{ 'a'.ljust(4000000000) }}": "limit",
    "{{ '{:>1000000000}'.format(1) }}": "limit",
    "{{ '%1000000000d' % 1 }}": "limit",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}": "recursed",
    "{% macro f(n) %}{{ f(n + 1) ~ f(n + 1) }}{% endmacro %}{{ f(0) }}": "recursed|limit",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}": "unsafe",
    "{{ raise_exception('no') }}": "no",
}


@pytest.mark.parametrize("source", list(HOSTILE_TEMPLATES))
def test_hostile_templates_stop_with_a_clear_error(source):
    """Each of these used to run until memory ran out (or for hours); now each stops at a limit
    (time, loop iterations, the size of what it makes) or the sandbox, with a HomellmError."""
    template = ChatTemplate(source)
    with pytest.raises(HomellmError, match="failed to render: .*(" + HOSTILE_TEMPLATES[source] + ")"):
        template.render(HELLO)


def test_template_limits_follow_the_conversation(ours):
    """Big conversations still render: the size limit grows with the text given, and a real
    template's output is exactly what it was (the limits change nothing within them)."""
    long = [{"role": "user", "content": "word " * 600_000}]  # 3 MB of text, over the 1M base
    text = ours.render_chat(long)
    assert text.count("word ") == 600_000
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(5001)]
    assert ours.render_chat(many).count("<|im_start|>") == 5003  # + its system turn, + the prompt


def test_template_of_the_wrong_type_is_a_clear_error():
    with pytest.raises(HomellmError, match="not a string"):
        ChatTemplate(["{{ messages }}"])
    with pytest.raises(HomellmError, match="not a string"):
        ChatTemplate(7)


def test_a_long_sentencepiece_token_loads_at_once():
    """sentencepiece_merges tried every split of every token (quadratic: a 200,000-character
    token took 12 s, a 2,000,000-character one would take ~20 minutes); now a piece costs one
    look-up per distinct token length. An alarm fails the test instead of waiting."""
    import signal

    def too_slow(*_):
        raise TimeoutError("sentencepiece_merges is still quadratic in the token length")

    tokens = ["a", "b", "ab", "abb", "▁", "▁a", "x" * 2_000_000, "y" * 200_000 + "b"]
    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(30)
    try:
        merges = sentencepiece_merges(tokens, [0.0, 0.0, -1.0, -2.0, 0.0, -0.5, -3.0, -4.0], [1] * 8)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert merges == [("▁", "a"), ("a", "b"), ("ab", "b")]


def test_text_that_is_not_unicode_is_a_clear_error(ours):
    with pytest.raises(HomellmError, match="lone surrogate"):
        ours.encode("ok \udcff then")
    with pytest.raises(HomellmError, match="lone surrogate"):
        ours.apply_chat_template([{"role": "user", "content": "\ud800"}])
    assert ours.encode("ok") == ours.encode("ok")


def test_vocabulary_fields_of_the_wrong_type_are_clear_errors(gguf_tokenizer_fields):
    fields, template = gguf_tokenizer_fields
    with pytest.raises(HomellmError, match="tokens is empty"):
        Tokenizer.from_gguf_fields({**fields, "tokens": []}, template)
    with pytest.raises(HomellmError, match="tokens holds 0"):
        Tokenizer.from_gguf_fields({**fields, "tokens": list(range(len(fields["tokens"])))}, template)
