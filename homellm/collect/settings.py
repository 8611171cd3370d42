"""The tree manager's thresholds, with Open Assistant's defaults.

The names and defaults are those of Open Assistant's `TreeManagerConfiguration`
(LAION-AI/Open-Assistant, backend/oasst_backend/config.py) for everything it has; the few of
our own are marked. A tree grows to `goal_tree_size` reviewed messages, at most
`max_tree_depth` replies deep (the prompt is depth 0) and `max_children_count` replies under a
prompt (`num_prompter_replies` under an assistant reply); each message needs its reviews
(`num_reviews_initial_prompt` / `num_reviews_reply`) and passes when its acceptance score
(1 - mean spam - mean lang_mismatch) is above the threshold; each set of sibling replies needs
`num_required_rankings` rankings before the tree is ready for export. OA's
`max_pending_tasks_per_user` has no equal here: a volunteer holds one task at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from homellm.errors import HomellmError


@dataclass
class CollectSettings:
    max_active_trees: int = 10              # trees in review or growing; no prompt tasks beyond
    max_tree_depth: int = 3                 # replies below the prompt (the prompt is depth 0)
    max_children_count: int = 3             # replies under one prompter message
    num_prompter_replies: int = 1           # prompter replies under one assistant reply
    goal_tree_size: int = 12                # reviewed messages a tree grows to
    num_reviews_initial_prompt: int = 3
    num_reviews_reply: int = 3
    acceptance_threshold_initial_prompt: float = 0.6
    acceptance_threshold_reply: float = 0.6
    num_required_rankings: int = 3
    rank_prompter_replies: bool = False     # OA ranks only assistant replies by default
    p_full_labeling_review_prompt: float = 1.0          # else the simple (spam) labeling
    p_full_labeling_review_reply_assistant: float = 1.0
    p_full_labeling_review_reply_prompter: float = 0.25
    lonely_children_count: int = 2          # a prompt with fewer replies is extended first ...
    p_lonely_child_extension: float = 0.75  # ... this often
    auto_mod_red_flags: int = 4             # reports that delete a reply (or abort a tree)
    auto_mod_max_skip_reply: int = 25       # skips of one reply task that halt its tree
    max_message_chars: int = 2000           # OA's MESSAGE_SIZE_LIMIT
    # ours
    task_timeout_s: int = 900               # a reserved task is released after this
    num_reviews_edit: int = 3               # votes an edit proposal needs
    acceptance_threshold_edit: float = 0.6  # share of approvals that applies it
    default_lang: str = "en"                # the language of a prompt that names none

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """HomellmError naming the first field out of its range."""
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int):
                low = 0 if f.name in ("max_tree_depth", "auto_mod_max_skip_reply",
                                      "lonely_children_count") else 1
                if not isinstance(v, int) or isinstance(v, bool) or v < low:
                    raise HomellmError(f"collect setting {f.name}: expected an integer >= {low}, "
                                       f"got {v!r}")
            elif f.type in ("float", float):
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
                    raise HomellmError(f"collect setting {f.name}: expected a number from 0 to "
                                       f"1, got {v!r}")
        if not isinstance(self.default_lang, str) or not self.default_lang:
            raise HomellmError("collect setting default_lang: expected a language tag like 'en'")

    def reviews_needed(self, is_prompt: bool) -> int:
        return self.num_reviews_initial_prompt if is_prompt else self.num_reviews_reply

    def threshold(self, is_prompt: bool) -> float:
        return self.acceptance_threshold_initial_prompt if is_prompt else \
            self.acceptance_threshold_reply

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
