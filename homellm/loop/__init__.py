"""The loop from what people said to a better served model, one round at a time.

    homellm loop -m mybot --base smollm2 --method dpo    # round 1: v0 = smollm2 -> mybot:v1
    homellm loop history -m mybot                        # every round, its data, metrics, evals
    homellm loop promote -m mybot                        # the winner becomes mybot:latest

A round (`steps.py`) is five steps, each of which also runs on its own:

1. data     what people said since the last round (`feedback.py`): preference pairs from
            rated sibling replies (thumbs, regenerations, edits), the arena's A/B votes, the
            volunteer collection's rankings; and every user prompt (for PPO / GRPO). Pairs
            used by an earlier round are left out (their fingerprints are kept).
2. tune     DPO on the pairs; or a reward model on the pairs, then PPO or GRPO on the prompts
            against it (or against --reward RM / --reward-fn FILE.py:F).
3. merge    the adapter folded into the round's starting model, registered as NAME:vN+1.
4. eval     both versions answer the held-out prompts; a reward model (when the round has one)
            compares them; `homellm eval judge` runs when a judge is given (cli/loop.py); the
            arena is served for people to vote between the two (`homellm loop serve`).
5. promote  the winner (arena votes first, then the judge, then the reward model) becomes
            NAME:latest (hard links of its files) and the start of the next round.

Everything a round used and made stays under `$HOMELLM_HOME/loop/<NAME>/rounds/<k>/`: the data
files and their counts, the resolved training configs, the adapter and its logs, the merge,
the eval results (state.py).
"""
