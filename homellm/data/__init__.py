"""Datasets in and out: Open Assistant conversation trees and the SFT / DPO JSONL made from them.

`homellm.data.oasst` reads and writes oasst trees and extracts training examples:

    from homellm.data.oasst import read_trees, write_trees, sft_examples, dpo_pairs
    trees = read_trees("trees.jsonl")          # ValueError "FILE:LINE: ..." on a bad record
    sft = [ex for t in trees for ex in sft_examples(t)]    # {"messages": [...]}
    dpo = [p for t in trees for p in dpo_pairs(t)]         # {"prompt", "chosen", "rejected"}

and moves whole conversations between the store and trees:

    trees = export_trees(store, user, [conversation_id])   # or all; shared=True for an admin
    text = dumps_trees(trees)                              # JSONL text, e.g. a download
    import_trees(store, user, parse_trees(upload.splitlines(), "upload.jsonl"))
"""
