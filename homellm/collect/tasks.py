"""The kinds of task a volunteer is handed, and how one is picked when any will do.

Open Assistant's task types (`TaskRequestType` in oasst-shared/.../protocol.py), plus one of
ours, `review_edit` (vote on another volunteer's proposed edit of a message):

    initial_prompt          write the first message of a new tree
    assistant_reply         reply as the assistant to a conversation
    prompter_reply          reply as the user to the assistant's reply
    rank_initial_prompts    order a few accepted prompts, best first
    rank_assistant_replies  order the assistant replies to one message, best first
    rank_prompter_replies   ... the user replies (only with rank_prompter_replies)
    label_initial_prompt    review a prompt (spam and the other labels)
    label_assistant_reply   review an assistant reply
    label_prompter_reply    review a user reply
    review_edit             approve or reject a proposed edit

A request for "random" draws a group with OA's weights (`_random_task_selection`: ranking
10, reviewing replies 5, reviewing prompts 5, replying 2, a new prompt 0.01; edits 5, as
reviews), among the groups that have a task for this volunteer now: what unblocks a tree
(rankings, then reviews) comes first, a new tree almost never while others need work.
`rank_initial_prompts` is handed out only when asked for, as in OA.
"""
from __future__ import annotations

import random

INITIAL_PROMPT = "initial_prompt"
ASSISTANT_REPLY = "assistant_reply"
PROMPTER_REPLY = "prompter_reply"
RANK_INITIAL_PROMPTS = "rank_initial_prompts"
RANK_ASSISTANT_REPLIES = "rank_assistant_replies"
RANK_PROMPTER_REPLIES = "rank_prompter_replies"
LABEL_INITIAL_PROMPT = "label_initial_prompt"
LABEL_ASSISTANT_REPLY = "label_assistant_reply"
LABEL_PROMPTER_REPLY = "label_prompter_reply"
REVIEW_EDIT = "review_edit"

KINDS = (INITIAL_PROMPT, ASSISTANT_REPLY, PROMPTER_REPLY, RANK_INITIAL_PROMPTS,
         RANK_ASSISTANT_REPLIES, RANK_PROMPTER_REPLIES, LABEL_INITIAL_PROMPT,
         LABEL_ASSISTANT_REPLY, LABEL_PROMPTER_REPLY, REVIEW_EDIT)
REQUESTS = ("random",) + KINDS

REPLY = {ASSISTANT_REPLY: "assistant", PROMPTER_REPLY: "prompter"}   # kind -> role written
RANK = {RANK_ASSISTANT_REPLIES: "assistant", RANK_PROMPTER_REPLIES: "prompter"}  # role ranked
LABEL = {LABEL_INITIAL_PROMPT: "initial_prompt", LABEL_ASSISTANT_REPLY: "assistant",
         LABEL_PROMPTER_REPLY: "prompter"}
TEXT_KINDS = (INITIAL_PROMPT,) + tuple(REPLY)
RANK_KINDS = (RANK_INITIAL_PROMPTS,) + tuple(RANK)

# OA's weights by group, and the kinds in each group
GROUPS = (
    ("ranking", 10.0, (RANK_ASSISTANT_REPLIES, RANK_PROMPTER_REPLIES)),
    ("label_reply", 5.0, (LABEL_ASSISTANT_REPLY, LABEL_PROMPTER_REPLY)),
    ("label_prompt", 5.0, (LABEL_INITIAL_PROMPT,)),
    ("edit", 5.0, (REVIEW_EDIT,)),
    ("reply", 2.0, (ASSISTANT_REPLY, PROMPTER_REPLY)),
    ("prompt", 0.01, (INITIAL_PROMPT,)),
)

# what each kind asks, for the page
TITLES = {
    INITIAL_PROMPT: "Write a prompt",
    ASSISTANT_REPLY: "Reply as the assistant",
    PROMPTER_REPLY: "Reply as the user",
    RANK_INITIAL_PROMPTS: "Rank prompts",
    RANK_ASSISTANT_REPLIES: "Rank assistant replies",
    RANK_PROMPTER_REPLIES: "Rank user replies",
    LABEL_INITIAL_PROMPT: "Label a prompt",
    LABEL_ASSISTANT_REPLY: "Label an assistant reply",
    LABEL_PROMPTER_REPLY: "Label a user reply",
    REVIEW_EDIT: "Review an edit",
}

# the skip "emoji" each kind leaves on its message (OA's EmojiCode skip_*), so the same
# volunteer is not handed it again
SKIP_EMOJI = {**{k: "_skip_reply" for k in REPLY}, **{k: "_skip_ranking" for k in RANK},
              **{k: "_skip_labeling" for k in LABEL}}


def random_order(available: dict[str, int], rng: random.Random) -> list[str]:
    """The kinds to try for a "random" request, given how many candidates each kind has:
    groups drawn one after another by OA's weights (without replacement) among those with
    candidates; inside a group, its kinds with candidates in a random order."""
    groups = [(w, [k for k in kinds if available.get(k)]) for _, w, kinds in GROUPS]
    groups = [(w, ks) for w, ks in groups if ks]
    order: list[str] = []
    while groups:
        total = sum(w for w, _ in groups)
        x, i = rng.random() * total, 0
        while i < len(groups) - 1 and x >= groups[i][0]:
            x -= groups[i][0]
            i += 1
        _, ks = groups.pop(i)
        order += rng.sample(ks, len(ks))
    return order
