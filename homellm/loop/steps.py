"""The steps of a round: data, tune, merge, eval, promote (see homellm/loop/__init__.py).

Library code: each step takes the Loop and its Round, records what it did in round.json and
returns that record; `say(text)` and `progress(event)` report to whoever runs it (the CLI).
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from homellm.errors import HomellmError
from homellm.loop.state import Loop, Round, write_json

VAL_EVERY = 10  # one pair or prompt in ten is held out (chosen by its fingerprint: stable)
MAX_QUESTIONS = 24


@dataclass
class Settings:
    """What a round may be told; saved in round.json (a round continues with its own)."""

    method: str = "dpo"  # dpo | ppo | grpo
    all_feedback: bool = False  # every pair again, not only those since the last round
    shared: bool = False  # every user who opted in (an admin's loop)
    user: str | None = None
    reward: str | None = None  # an existing reward model (ppo/grpo); None: train one
    reward_fn: str | None = None  # grpo/ppo: FILE.py:FUNCTION instead of a reward model
    steps: int | None = None  # optimizer steps (dpo, rm) or rollouts (ppo, grpo)
    rm_steps: int | None = None
    epochs: int | None = None
    lr: float | None = None
    rank: int = 8
    max_length: int = 512
    max_new_tokens: int = 64
    group_size: int | None = None
    prompts_per_step: int = 8
    beta: float = 0.1
    threads: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    merge_dtype: str = "float32"
    answer_tokens: int = 128  # tokens an answer of the eval
    questions: str | None = None  # an MT-bench file instead of the held-out prompts
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> "Settings":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def _fp(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode(
        "utf-8", "surrogatepass")).hexdigest()[:24]


def _held_out(fingerprint: str) -> bool:
    return int(fingerprint[:8], 16) % VAL_EVERY == 0


def _write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def _split(rows: list[tuple[str, dict]]) -> tuple[list[dict], list[dict]]:
    train = [r for fp, r in rows if not _held_out(fp)]
    val = [r for fp, r in rows if _held_out(fp)]
    if not val and len(train) >= 4:  # at least one held out where there are a few
        val, train = train[-1:], train[:-1]
    if not train and val:
        train, val = val, []
    return train, val


# -- 1. data ------------------------------------------------------------------------------------

def data(loop: Loop, rnd: Round, store, user, s: Settings) -> dict:
    """The round's data from the store: new pairs (all with all_feedback), prompts, questions."""
    from homellm.data.pairs import _check, fingerprint
    from homellm.loop.feedback import gather
    t0 = time.perf_counter()
    fb = gather(store, user, shared=s.shared)
    seen = set() if s.all_feedback else loop.seen(but=rnd)
    pairs, invalid, repeated, by_source = [], 0, 0, {}
    kept = set()
    for source, pair in fb.pairs:
        try:
            _check(pair)
        except ValueError:
            invalid += 1
            continue
        fp = fingerprint(pair)
        if fp in seen or fp in kept:
            repeated += fp in seen
            continue
        kept.add(fp)
        pairs.append((fp, pair))
        by_source[source] = by_source.get(source, 0) + 1
    prompts = [(_fp(p["prompt"]), p) for p in fb.prompts]
    needs_pairs = s.method == "dpo" or (s.reward is None and s.reward_fn is None)
    if needs_pairs and not pairs:
        since = "" if s.all_feedback else (f" since round {rnd.number - 1}" if rnd.number > 1 else "")
        raise HomellmError(
            f"no {'new ' if seen else ''}preference pairs{since}: {len(fb.pairs)} pairs in the store "
            f"({repeated} used by earlier rounds, {invalid} with two equal replies); people make "
            f"pairs by rating two replies to one message differently (regenerate, thumbs up/down), "
            f"voting in the arena, or ranking volunteer tasks. --all uses every pair again")
    if s.method in ("ppo", "grpo") and not prompts:
        raise HomellmError("no prompts in the store: PPO and GRPO need what people asked")
    folder = rnd.path("data")
    train_pairs, val_pairs = _split(pairs)
    train_prompts, val_prompts = _split(prompts)
    n_pairs = _write_jsonl(folder / "pairs.jsonl", train_pairs)
    n_val = _write_jsonl(folder / "val_pairs.jsonl", val_pairs)
    _write_jsonl(folder / "prompts.jsonl", train_prompts)
    _write_jsonl(folder / "val_prompts.jsonl", val_prompts or train_prompts[:MAX_QUESTIONS])
    questions = [{"question_id": f"r{rnd.number}-{i + 1}", "category": "feedback",
                  "turns": [p["prompt"][-1]["content"]]}
                 for i, p in enumerate((val_prompts or train_prompts)[:MAX_QUESTIONS])]
    _write_jsonl(folder / "questions.jsonl", questions)
    (folder / "fingerprints.txt").write_text("".join(fp + "\n" for fp, _ in pairs))
    record = {"pairs": n_pairs, "val_pairs": n_val, "pairs_by_source": by_source,
              "pairs_in_store": len(fb.pairs), "pairs_used_before": repeated,
              "pairs_invalid": invalid, "prompts": len(train_prompts), "val_prompts": len(val_prompts),
              "questions": len(questions), "counts": fb.counts, "all_feedback": s.all_feedback,
              "seconds": round(time.perf_counter() - t0, 3)}
    write_json(folder / "stats.json", record)
    rnd.advance("data", "data", record)
    return record


# -- 2. tune ------------------------------------------------------------------------------------

def _tune_config(s: Settings, method: str, model: str, data: Path, val: Path | None, out: Path):
    from homellm.train.config import LoraConfig, TuneConfig
    kw = dict(method=method, model=model, data=str(data), val=str(val) if val else None, out=str(out),
              lora=LoraConfig(rank=s.rank, alpha=2.0 * s.rank), max_length=s.max_length,
              threads=s.threads, device=s.device, dtype=s.dtype, seed=s.seed, beta=s.beta,
              epochs=s.epochs, max_steps=s.rm_steps if method == "rm" else s.steps)
    if s.lr is not None and method != "rm":
        kw["lr"] = s.lr
    return TuneConfig(**kw)


def _has_lines(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def tune(loop: Loop, rnd: Round, s: Settings, progress=None, say=print) -> dict:
    """Tune the round's starting model: DPO, or (PPO / GRPO) a reward model then RL. A step
    interrupted before resumes from its checkpoint."""
    from homellm.train import checkpoint
    t0 = time.perf_counter()
    start = rnd.data["from"]["model"]
    d = rnd.path("data")
    val_pairs = d / "val_pairs.jsonl" if _has_lines(d / "val_pairs.jsonl") else None
    out = rnd.path("tune")
    record: dict = {"method": s.method, "model": start}

    def resume(folder: Path) -> bool:
        return checkpoint.path_in(folder).is_file()

    if s.method == "dpo":
        from homellm.train import dpo
        config = _tune_config(s, "dpo", start, d / "pairs.jsonl", val_pairs, out)
        result = dpo.train(config, progress=progress, resume=resume(out))
        record.update(config=result.config.to_json(), steps=result.steps, losses=[result.losses[0], result.losses[-1]],
                      val=result.val[-1] if result.val else None, tokens_per_s=round(result.tokens_per_s, 1))
    else:
        reward = s.reward
        if reward is None and s.reward_fn is None:
            from homellm.train import reward as rm
            config = _tune_config(s, "rm", start, d / "pairs.jsonl", val_pairs, rnd.path("rm"))
            say(f"round {rnd.number}: reward model on {rnd.data['steps']['data']['pairs']} pairs")
            if not (rnd.path("rm", "reward_config.json").is_file() and not resume(rnd.path("rm"))):
                result = rm.train(config, progress=progress, resume=resume(rnd.path("rm")))
                record["reward_model"] = {"folder": str(rnd.path("rm")), "steps": result.steps,
                                          "val": result.val[-1] if result.val else None}
            reward = str(rnd.path("rm"))
            gc.collect()
        from homellm.train import grpo, ppo
        from homellm.train.config import LoraConfig
        from homellm.train.rl_config import RLConfig
        config = RLConfig(method=s.method, model=start, prompts=str(d / "prompts.jsonl"),
                          val_prompts=str(d / "val_prompts.jsonl"), out=str(out),
                          reward=None if s.reward_fn else reward, reward_fn=s.reward_fn,
                          lora=LoraConfig(rank=s.rank, alpha=2.0 * s.rank), dtype=s.dtype,
                          steps=s.steps or 50, prompts_per_step=s.prompts_per_step,
                          group_size=s.group_size, max_new_tokens=s.max_new_tokens,
                          threads=s.threads, device=s.device, seed=s.seed,
                          **({"lr": s.lr} if s.lr is not None else {}))
        train = ppo.train if s.method == "ppo" else grpo.train
        result = train(config, progress=progress, resume=resume(out))
        record.update(config=result.config.to_json(), steps=result.steps, reward=reward or s.reward_fn,
                      rewards=[result.logs[0]["reward"], result.logs[-1]["reward"]] if result.logs else None,
                      kl=result.logs[-1]["kl"] if result.logs else None, base_val=result.base_val,
                      val=result.val[-1] if result.val else None, tokens_per_s=round(result.tokens_per_s, 1))
    record["seconds"] = round(time.perf_counter() - t0, 3)
    gc.collect()
    rnd.advance("tuned", "tune", record)
    return record


# -- 3. merge -----------------------------------------------------------------------------------

def merge(loop: Loop, rnd: Round, s: Settings, progress=None) -> dict:
    """Fold the round's adapter into its starting model; register NAME:vN+1."""
    from homellm.catalog.library import find
    from homellm.train.merge import merge as merge_adapter
    name, n = rnd.data["to"]["model"], rnd.data["to"]["version"]
    force = find(name) is not None  # a merge of this round interrupted after its commit
    entry, _, seconds = merge_adapter(rnd.data["from"]["model"], rnd.path("tune"), name,
                                      dtype=s.merge_dtype, force=force, progress=progress)
    loop.add_version(n, name, rnd.number)
    record = {"model": name, "folder": str(entry.folder), "size": entry.size, "seconds": round(seconds, 3)}
    rnd.advance("merged", "merge", record)
    return record


# -- 4. eval ------------------------------------------------------------------------------------

def questions_file(rnd: Round, s: Settings) -> Path:
    return Path(s.questions).expanduser() if s.questions else rnd.path("data", "questions.jsonl")


def answer_settings(s: Settings) -> dict:
    from homellm.eval.answers import answer_settings as settings
    return settings(s.answer_tokens, {"temperature": 0.0})


def answers(ref: str, questions, settings: dict, say=print) -> dict:
    """A model's answers to the questions, from the eval answer cache or made now (kept)."""
    from homellm.eval.answers import AnswerCache, generate_answers
    from homellm.eval.models import model_hash, open_model, parse_model
    m = parse_model(ref)
    h = model_hash(m)
    cache = AnswerCache(h)
    have = {q.id: a for q in questions if (a := cache.get(q, settings)) is not None}
    missing = [q for q in questions if q.id not in have]
    if missing:
        t0 = time.perf_counter()
        model = open_model(m, ctx=2048)
        n_tok = 0
        for a in generate_answers(model, h, missing, settings, ref):
            cache.add(a)
            have[a.question_id] = a
            n_tok += sum(a.tokens)
        dt = time.perf_counter() - t0
        say(f"answers {ref}: {len(missing)} made in {dt:.1f} s ({n_tok / max(dt, 1e-9):.1f} tok/s)")
        del model
        gc.collect()
    return have


def reward_comparison(rnd: Round, s: Settings, reward: str, say=print) -> dict:
    """Both versions' answers to the questions scored by a reward model: the new version's win
    rate (a tie counts half), kept as an eval run of kind "reward"."""
    from homellm.eval.answers import load_questions
    from homellm.eval.models import model_hash, parse_model
    from homellm.eval.results import record
    from homellm.train.reward import load_reward_model
    qs = load_questions(questions_file(rnd, s))
    settings = answer_settings(s)
    new, old = rnd.data["to"]["model"], rnd.data["from"]["model"]
    a, b = answers(new, qs, settings, say), answers(old, qs, settings, say)
    rm = load_reward_model(reward, device=s.device)
    prompts = [[{"role": "user", "content": q.turns[0]}] for q in qs]
    ra = rm.rewards([(p, a[q.id].turns[0]) for p, q in zip(prompts, qs)])
    rb = rm.rewards([(p, b[q.id].turns[0]) for p, q in zip(prompts, qs)])
    wins = sum(x > y for x, y in zip(ra, rb))
    ties = sum(x == y for x, y in zip(ra, rb))
    metrics = {"questions": len(qs), "wins": wins, "ties": ties, "losses": len(qs) - wins - ties,
               "win_rate": (wins + 0.5 * ties) / len(qs), "mean_reward": sum(ra) / len(qs),
               "mean_reward_opponent": sum(rb) / len(qs)}
    rows = [{"question_id": q.id, "turns": q.turns, new: a[q.id].turns[0], old: b[q.id].turns[0],
             "reward": {new: x, old: y}} for q, x, y in zip(qs, ra, rb)]
    _write_jsonl(rnd.path("eval", "reward.jsonl"), rows)
    run = record("reward", model=new, model_hash=model_hash(parse_model(new)), task=questions_file(rnd, s).name,
                 settings={"opponent": old, "reward_model": str(reward), "answers": settings},
                 metrics=metrics)
    return {"run": run.id, **metrics}


def evaluate(loop: Loop, rnd: Round, s: Settings, judge: dict | None = None, say=print) -> dict:
    """Record the round's evals: the reward comparison (when the round has a reward model) and
    the judge's result that the caller ran (`judge`: its metrics and run ids)."""
    record = dict(rnd.data["steps"].get("eval") or {})
    reward = (rnd.data["steps"].get("tune") or {}).get("reward") if not s.reward_fn else None
    reward = s.reward or reward
    if reward is not None and "reward" not in record:
        record["reward"] = reward_comparison(rnd, s, reward, say)
    if judge is not None:
        record["judge"] = judge
    tuned = rnd.data["steps"].get("tune") or {}
    if tuned.get("val"):  # the trainer's held-out numbers (DPO: reward accuracy on held-out pairs)
        record["held_out"] = tuned["val"]
    old, new = rnd.data["from"]["model"], rnd.data["to"]["model"]
    record["serve"] = f"homellm serve -m {old} {new}"
    rnd.advance("evaluated", "eval", record)
    return record


# -- 5. promote ---------------------------------------------------------------------------------

def arena_votes(store, a: str, b: str) -> dict:
    """The arena's votes between models a and b: wins of each, ties."""
    from homellm.store.arena import Battles
    out = {"votes": 0, a: 0, b: 0, "ties": 0}
    for ma, mb, vote in Battles(store.db).outcomes():
        if {ma, mb} != {a, b}:
            continue
        out["votes"] += 1
        if vote in ("a", "b"):
            out[ma if vote == "a" else mb] += 1
        else:
            out["ties"] += 1
    return out


def decide(rnd: Round, votes: dict | None, min_votes: int) -> tuple[str, str]:
    """(winner model, why) for an evaluated round: the arena's votes when there are enough,
    else the judge's win rate, else the reward model's; a tie keeps the old version."""
    old, new = rnd.data["from"]["model"], rnd.data["to"]["model"]
    ev = rnd.data["steps"].get("eval") or {}
    if votes and votes["votes"] >= min_votes:
        w = new if votes[new] > votes[old] else old
        return w, f"arena: {votes[new]} votes for {new}, {votes[old]} for {old}, {votes['ties']} ties"
    for kind in ("judge", "reward"):
        m = ev.get(kind)
        rate = m.get("win_rate") if m else None
        if rate is not None:
            return (new if rate > 0.5 else old), f"{kind}: {new} wins {100 * rate:.1f}% against {old}"
    raise HomellmError(f"round {rnd.number} has nothing to decide with: no judge result, no reward "
                       f"comparison and fewer than {min_votes} arena votes between {old} and {new}; "
                       f"run `homellm loop eval --judge MODEL_OR_URL`, let people vote in the arena "
                       f"(`{ev.get('serve') or 'homellm serve -m ' + old + ' ' + new}`), or name the "
                       f"winner: `homellm loop promote vN`")


def link_model(source: str, name: str) -> Path:
    """Register catalog model `name` holding the files of `source` (hard links where the file
    system allows, else copies); replaces an older `name`."""
    from homellm.catalog.library import commit, find, new_staging, resolve
    from homellm.catalog.manifest import ModelEntry, files_of, read_manifest, summarize, utc_now
    entry = find(source)
    path = Path(resolve(source))
    staging = new_staging()
    try:
        files = [p for p in (entry.folder.rglob("*") if entry else ([path] if path.is_file() else path.rglob("*")))
                 if p.is_file() and p.name != "manifest.json"]
        root = entry.folder if entry else (path.parent if path.is_file() else path)
        for f in files:
            target = staging / f.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
        if entry is not None:
            old = read_manifest(entry.folder)
            new = ModelEntry(name=name, format=old.format, files=files_of(staging),
                             source={"kind": "promote", "from": source}, size=old.size,
                             created=utc_now(), summary=old.summary)
        else:
            from homellm.model.formats import open_checkpoint
            ckpt = open_checkpoint(staging / path.name if path.is_file() else staging)
            got = files_of(staging)
            new = ModelEntry(name=name, format=ckpt.format, files=got, source={"kind": "promote", "from": source},
                             size=sum(f["size"] for f in got), created=utc_now(), summary=summarize(ckpt, staging))
            del ckpt
        return commit(staging, new, force=True).folder
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def promote(loop: Loop, store, version: int | None = None, min_votes: int = 10, say=print) -> dict:
    """Make a version the default (NAME:latest, and the next round's start): `version`, or
    the winner of the last evaluated round."""
    rounds = [r for r in loop.rounds() if r.status == "evaluated"]
    if version is None:
        if not rounds:
            raise HomellmError(f"loop {loop.name} has no evaluated round to promote from")
        rnd = rounds[-1]
        votes = arena_votes(store, rnd.data["from"]["model"], rnd.data["to"]["model"]) if store else None
        winner, why = decide(rnd, votes, min_votes)
        version = rnd.data["to"]["version"] if winner == rnd.data["to"]["model"] else rnd.data["from"]["version"]
        rnd.data["promoted"] = {"winner": winner, "why": why, "votes": votes,
                                "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        rnd.save()
    else:
        why = "named by hand"
    model = loop.version(version)
    folder = link_model(model, f"{loop.name}:latest")
    loop.data["default"] = version
    loop.data.setdefault("promotions", []).append(
        {"version": version, "model": model, "why": why, "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    loop.save()
    return {"version": version, "model": model, "why": why, "latest": f"{loop.name}:latest",
            "folder": str(folder)}


# -- history --------------------------------------------------------------------------------------

def history(loop: Loop) -> list[dict]:
    """One row per round: what it used, made and measured."""
    rows = []
    for r in loop.rounds():
        st = r.data["steps"]
        d, t, e = st.get("data") or {}, st.get("tune") or {}, st.get("eval") or {}
        rows.append({"round": r.number, "created": r.data["created"], "method": r.data["method"],
                     "status": r.status, "from": r.data["from"]["model"], "to": r.data["to"]["model"],
                     "pairs": d.get("pairs"), "val_pairs": d.get("val_pairs"),
                     "prompts": d.get("prompts"), "sources": d.get("pairs_by_source"),
                     "feedback": d.get("counts"), "train_steps": t.get("steps"),
                     "train_loss": t.get("losses"), "train_rewards": t.get("rewards"),
                     "held_out": t.get("val"), "judge": e.get("judge"), "reward": e.get("reward"),
                     "promoted": r.data.get("promoted"), "folder": str(r.folder)})
    return rows
