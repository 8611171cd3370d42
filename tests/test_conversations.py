"""Conversation readers: every format to the same messages, FILE:LINE problems, mostly-bad
files refused; the loss mask of a multi-turn example covers exactly the assistant tokens."""
import json

import pytest

from homellm.data.conversations import DataError, read
from homellm.train.batches import IGNORE, collate, dpo_item, sft_item

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green, and also red."}]


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def oasst_tree():
    """A prompt with two rated replies (rank 0 preferred) and a follow-up under the best."""
    return {"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": {
        "message_id": "p", "parent_id": None, "role": "prompter", "text": "Name a color.",
        "replies": [
            {"message_id": "a1", "parent_id": "p", "role": "assistant", "text": "Blue.", "rank": 0,
             "replies": [{"message_id": "p2", "parent_id": "a1", "role": "prompter",
                          "text": "Another one?", "replies": [
                              {"message_id": "a3", "parent_id": "p2", "role": "assistant",
                               "text": "Green, and also red.", "rank": 0}]}]},
            {"message_id": "a2", "parent_id": "p", "role": "assistant", "text": "I refuse.", "rank": 1},
        ]}}


def test_every_sft_format_gives_the_same_messages(tmp_path):
    sharegpt = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                   "value": m["content"]} for m in CHAT]}
    path = write_lines(tmp_path / "mixed.jsonl", [
        {"messages": CHAT}, "", sharegpt,
        {"prompt": "Name a color.", "response": "Blue."},
        {"prompt": "Name a color.", "completion": "Blue."}, oasst_tree()])
    data = read(path, "sft")
    assert data.problems == [] and data.n_lines == 5
    assert data.records[0] == data.records[1] == {"messages": CHAT}
    assert data.records[2] == data.records[3] == {"messages": CHAT[1:3]}
    assert data.records[4] == {"messages": CHAT[1:]}  # the tree's best path


def test_dpo_formats(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [
        {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "I refuse."},
        {"prompt": CHAT[1:2], "chosen": [{"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "assistant", "content": "I refuse."}]},
        oasst_tree()])
    data = read(path, "dpo")
    assert data.problems == []
    expected = {"prompt": CHAT[1:2], "chosen": [{"role": "assistant", "content": "Blue."}],
                "rejected": [{"role": "assistant", "content": "I refuse."}]}
    assert data.records == [expected] * 3


def test_malformed_records_are_reported_with_file_and_line(tmp_path):
    good = {"messages": CHAT}
    path = write_lines(tmp_path / "some-bad.jsonl", [
        good, "{not json", good, {"messages": [{"role": "wizard", "content": "x"}]}, good,
        {"conversations": [{"from": "alien", "value": "x"}]}, good,
        {"prompt": "no answer"}, good, {"prompt": "a", "chosen": "b", "rejected": "c"}, good, good])
    data = read(path, "sft")
    assert len(data.records) == 7
    lines = [p.split(": ", 1)[0] for p in data.problems]
    assert lines == [f"{path}:{n}" for n in (2, 4, 6, 8, 10)]
    assert "not JSON" in data.problems[0] and "'role' must be one of" in data.problems[1]
    assert "'from' must be one of" in data.problems[2] and "unknown record" in data.problems[3]
    assert "DPO data" in data.problems[4]
    tree = oasst_tree()
    tree["prompt"]["replies"][0]["role"] = "prompter"
    data = read(write_lines(tmp_path / "tree.jsonl", [oasst_tree(), tree, oasst_tree()]), "sft")
    assert len(data.problems) == 1 and data.problems[0].startswith(f"{tmp_path / 'tree.jsonl'}:2: ")
    assert "roles alternate" in data.problems[0]


def test_a_mostly_bad_file_stops_before_training(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [{"messages": CHAT}, "[1, 2]", {"text": "hi"}, "nope"])
    with pytest.raises(DataError, match=r"3 of 4 records are malformed") as e:
        read(path, "sft")
    assert f"{path}:2: expected a JSON object" in str(e.value)
    with pytest.raises(DataError, match="no records"):
        read(write_lines(tmp_path / "empty.jsonl", ["", "  "]), "sft")
    with pytest.raises(DataError, match="cannot read"):
        read(tmp_path / "missing.jsonl", "sft")
    with pytest.raises(DataError, match="1 of 1 records"):
        read(write_lines(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "y", "rejected": "y"}]), "dpo")


@pytest.fixture(scope="module")
def tokenizer(default_gguf):
    from homellm.model.formats import open_checkpoint
    from homellm.tokenizer import Tokenizer
    ckpt = open_checkpoint(default_gguf)
    return Tokenizer.from_source(ckpt.tokenizer, ckpt.chat_template)


def runs(ids, labels):
    """Maximal runs of labelled ids."""
    out, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer, tmp_path):
    path = write_lines(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                            "value": m["content"]} for m in CHAT]}])
    (ids, labels), = sft_item(tokenizer, read(path).records[0]["messages"], 1024).rows
    assert ids == tokenizer.apply_chat_template(CHAT, add_generation_prompt=False)
    assert [tokenizer.decode(r) for r in runs(ids, labels)] == ["Blue.<|im_end|>",
                                                               "Green, and also red.<|im_end|>"]
    unlabelled = tokenizer.decode([i for i, lab in zip(ids, labels) if lab == IGNORE])
    assert "Blue" not in unlabelled and "Green" not in unlabelled and "Another one?" in unlabelled
    # cut at max_length: the first reply stays, the second is cut off
    (short, short_labels), = sft_item(tokenizer, CHAT, 30).rows
    assert len(short) == 30 and short == ids[:30] and short_labels == labels[:30]
    assert sft_item(tokenizer, CHAT, 8) is None  # nothing of a reply left to learn


def test_dpo_rows_label_only_the_final_reply(tokenizer):
    pair = {"prompt": CHAT[:4], "chosen": [{"role": "assistant", "content": "Green."}],
            "rejected": [{"role": "assistant", "content": "No."}]}
    item = dpo_item(tokenizer, pair, 1024)
    (c_ids, c_lab), (r_ids, r_lab) = item.rows
    assert [tokenizer.decode(r) for r in runs(c_ids, c_lab)] == ["Green.<|im_end|>"]
    assert [tokenizer.decode(r) for r in runs(r_ids, r_lab)] == ["No.<|im_end|>"]
    tokens, labels = collate([item], [0], pad_id=0)
    assert tokens.shape == (2, max(len(c_ids), len(r_ids)))
    assert tokens[0, :len(c_ids)].tolist() == c_ids and tokens[1, :len(r_ids)].tolist() == r_ids
    assert (labels[1, len(r_ids):] == IGNORE).all()
