"""The loop's record on disk: `$HOMELLM_HOME/loop/<NAME>/`.

    loop.json               {"name", "versions": [{"version", "model", "round"}], "default"}
    rounds/0001/round.json  {"round", "method", "status", "from", "to", "settings", "steps":
                             {"data": {...}, "tune": {...}, "merge": {...}, "eval": {...}},
                             "promoted"}
    rounds/0001/data/       pairs.jsonl, val_pairs.jsonl, prompts.jsonl, val_prompts.jsonl,
                            questions.jsonl (MT-bench format), stats.json, fingerprints.txt
                            (of the pairs used: a later round leaves them out)
    rounds/0001/rm/         the round's reward model (PPO / GRPO without --reward)
    rounds/0001/tune/       the adapter, its resolved config, metrics, checkpoint
    rounds/0001/eval/       answers compared, judge and reward results

Every JSON file is written whole (temp file + rename). A round's status goes data -> tuned ->
merged -> evaluated; a round that is not evaluated is "open" and the next `homellm loop`
continues it.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from homellm.errors import HomellmError

STATUSES = ("data", "tuned", "merged", "evaluated")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def loops_dir() -> Path:
    from homellm.catalog.library import home
    return home() / "loop"


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HomellmError(f"{path}: cannot read the loop's record ({e})") from None


def family(name: str) -> str:
    """The loop's name for `-m NAME[:TAG]`: the catalog family (versions are FAMILY:vN)."""
    fam = name.split(":")[0]
    if not _NAME.fullmatch(fam) or ".." in fam:
        raise HomellmError(f"-m {name}: a loop is named like a catalog model family (letters, "
                           f"digits, '_', '-', '.'); its versions are <name>:v1, <name>:v2, ...")
    return fam


@dataclass
class Round:
    folder: Path
    data: dict

    @property
    def number(self) -> int:
        return int(self.data["round"])

    @property
    def status(self) -> str:
        return self.data["status"]

    @property
    def open(self) -> bool:
        return self.status != "evaluated"

    def path(self, *parts: str) -> Path:
        return self.folder.joinpath(*parts)

    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json(self.folder / "round.json", self.data)

    def advance(self, status: str, step: str, record: dict) -> None:
        self.data["steps"][step] = record
        self.data["status"] = status
        self.save()


@dataclass
class Loop:
    name: str
    folder: Path
    data: dict = field(default_factory=dict)

    @classmethod
    def open(cls, name: str, create: bool = False, base: str | None = None) -> "Loop":
        """The loop called `name` (a family); created with v0 = `base` when asked to."""
        fam = family(name)
        folder = loops_dir() / fam
        if (folder / "loop.json").is_file():
            loop = cls(fam, folder, read_json(folder / "loop.json"))
            if base is not None and base != loop.version(0):
                raise HomellmError(f"loop {fam} started from {loop.version(0)}; --base {base} is "
                                   f"for a new loop (choose another -m name)")
            return loop
        if not create:
            known = sorted(p.name for p in loops_dir().glob("*") if (p / "loop.json").is_file()) \
                if loops_dir().is_dir() else []
            raise HomellmError(f"no loop named {fam} in {loops_dir()} "
                               f"({'loops: ' + ', '.join(known) if known else 'none yet'}); "
                               f"start one with `homellm loop -m {fam} --base MODEL`")
        if base is None:
            raise HomellmError(f"no loop named {fam} yet: give the model its first round starts "
                               f"from, --base MODEL (or -m MODEL when that is a catalog model)")
        loop = cls(fam, folder, {"name": fam, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                 "versions": [{"version": 0, "model": base, "round": None}],
                                 "default": None})
        loop.save()
        return loop

    def save(self) -> None:
        write_json(self.folder / "loop.json", self.data)

    def version(self, n: int) -> str:
        for v in self.data["versions"]:
            if v["version"] == n:
                return v["model"]
        raise HomellmError(f"loop {self.name} has no version v{n} (it has "
                           f"{', '.join('v%d' % v['version'] for v in self.data['versions'])})")

    @property
    def latest(self) -> int:
        return max(v["version"] for v in self.data["versions"])

    @property
    def current(self) -> int:
        """The version the next round starts from: the promoted default, else the latest."""
        return self.data["default"] if self.data.get("default") is not None else self.latest

    def version_name(self, n: int) -> str:
        return f"{self.name}:v{n}"

    def add_version(self, n: int, model: str, round_number: int) -> None:
        self.data["versions"] = [v for v in self.data["versions"] if v["version"] != n]
        self.data["versions"].append({"version": n, "model": model, "round": round_number})
        self.data["versions"].sort(key=lambda v: v["version"])
        self.save()

    # -- rounds --------------------------------------------------------------------------

    def rounds(self) -> list[Round]:
        root = self.folder / "rounds"
        out = []
        for f in sorted(root.glob("[0-9]*")) if root.is_dir() else []:
            if (f / "round.json").is_file():
                out.append(Round(f, read_json(f / "round.json")))
        return out

    def open_round(self) -> Round | None:
        rounds = self.rounds()
        return rounds[-1] if rounds and rounds[-1].open else None

    def last_round(self) -> Round | None:
        rounds = self.rounds()
        return rounds[-1] if rounds else None

    def new_round(self, method: str, settings: dict) -> Round:
        n = len(self.rounds()) + 1
        start = self.current
        r = Round(self.folder / "rounds" / f"{n:04d}",
                  {"round": n, "method": method, "status": "new",
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "from": {"version": start, "model": self.version(start)},
                   "to": {"version": self.latest + 1, "model": self.version_name(self.latest + 1)},
                   "settings": settings, "steps": {}, "promoted": None})
        r.save()
        return r

    # -- pairs used before ---------------------------------------------------------------

    def seen(self, but: Round | None = None) -> set[str]:
        """Fingerprints of the pairs earlier rounds used (each round's data/fingerprints.txt)."""
        out: set[str] = set()
        for r in self.rounds():
            f = r.path("data", "fingerprints.txt")
            if (but is None or r.number != but.number) and f.is_file():
                out |= set(f.read_text().split())
        return out
