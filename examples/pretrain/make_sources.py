"""Gather the example's openly licensed text into WORK (default /tmp/homellm-pretrain-example).

- Python's documentation (PSF License): the reStructuredText sources of the docs, shipped by
  Debian's python3.11-doc as /usr/share/doc/python3.11/html/_sources/**/*.rst.txt; the recipe
  reads that folder directly.
- Debian's package READMEs (/usr/share/doc/*/README*, each under its
  package's DFSG-free license); the recipe reads it directly.
- chitchat-dataset (MIT, BYU PCC lab; the PyPI package): ~7k casual English conversations.
  Written here twice: as plain text (WORK/chitchat/chitchat.jsonl, "A: ... / B: ..." lines)
  for pretraining, and as chat messages (WORK/chitchat-sft.jsonl, -val.jsonl) for
  `homellm tune sft`.

Needs: `apt-get install python3.11-doc` (root) and `pip download chitchat-dataset` (done here
with the running Python's pip).
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")


def chitchat(work: Path) -> dict:
    wheels = sorted((work / "download").glob("chitchat_dataset-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "chitchat-dataset==0.9.0", "-d", str(work / "download")], check=True)
        wheels = sorted((work / "download").glob("chitchat_dataset-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as z:
        return json.loads(z.read("chitchat_dataset/dataset.json"))


def main():
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/homellm-pretrain-example")
    work.mkdir(parents=True, exist_ok=True)
    if not PYTHON_DOCS.is_dir():
        sys.exit(f"{PYTHON_DOCS} is missing: apt-get install python3.11-doc (as root)")
    convs = chitchat(work)
    rng = random.Random(0)
    keys = sorted(convs)
    rng.shuffle(keys)
    (work / "chitchat").mkdir(exist_ok=True)
    n_text = n_sft = 0
    with open(work / "chitchat" / "chitchat.jsonl", "w") as text_out, \
            open(work / "chitchat-sft.jsonl", "w") as sft, open(work / "chitchat-sft-val.jsonl", "w") as val:
        for i, key in enumerate(keys):
            turns = [" ".join(m["text"].strip() for m in turn if m["text"].strip())
                     for turn in convs[key]["messages"]]
            turns = [t for t in turns if t]
            if len(turns) < 2:
                continue
            # the first half of the conversations is pretraining text, the rest teaches chat
            if i < len(keys) // 2:
                lines = [f"{'AB'[j % 2]}: {t}" for j, t in enumerate(turns)]
                text_out.write(json.dumps({"text": "\n".join(lines)}) + "\n")
                n_text += 1
            else:
                n = len(turns) - len(turns) % 2
                messages = [{"role": "user" if j % 2 == 0 else "assistant", "content": turns[j]}
                            for j in range(n)]
                (val if i % 50 == 0 else sft).write(json.dumps({"messages": messages}) + "\n")
                n_sft += 1
    print(f"{work}: {n_text} chitchat conversations as text, {n_sft} as SFT chats; "
          f"Python docs from {PYTHON_DOCS}", file=sys.stderr)


if __name__ == "__main__":
    main()
