"""`homellm loop`: from what people said in the web app to a better served model, a round at a time.

    homellm loop -m mybot --base smollm2 [--method dpo|ppo|grpo] [--judge MODEL_OR_URL]
    homellm loop -m mybot                  # the next round (or the rest of an open one)
    homellm loop data|tune|merge|eval -m mybot     # one step of the open round
    homellm loop serve -m mybot            # both versions of the last round, arena included
    homellm loop --promote -m mybot [vN]   # the winner (or vN) becomes mybot:latest
    homellm loop history [-m mybot] [--json]

The rules of each step: homellm/loop/. The feedback is read from --db (default
$HOMELLM_HOME/homellm.db): the local user's (or --user's; --shared: every user who opted in).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time

HELP = "the feedback loop: data from people's ratings -> tune -> merge -> judge/arena -> promote"
ACTIONS = ["run", "data", "tune", "merge", "eval", "serve", "promote", "history"]


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("action", nargs="?", default="run", choices=ACTIONS,
                   help="one step, or run (default): every step left of the open round, or a new round")
    p.add_argument("version", nargs="?", default=None,
                   help="with promote: the version to make the default (vN); default the winner")
    p.add_argument("-m", "--model", default=None, metavar="NAME",
                   help="the loop's name (its versions are NAME:v1, NAME:v2, ...); a catalog model "
                        "NAME[:TAG] starts a new loop from that model")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="the model a new loop starts from (version 0)")
    p.add_argument("--promote", nargs="?", const="", default=None, metavar="VERSION",
                   help="the same as the action promote (optionally with the version, vN)")
    p.add_argument("--method", choices=["dpo", "ppo", "grpo"], default="dpo",
                   help="how a new round tunes (default dpo)")
    p.add_argument("--all", action="store_true",
                   help="use every preference pair in the store, not only those since the last round")
    g = p.add_argument_group("feedback")
    g.add_argument("--db", default=None, help="database URL or file (default $HOMELLM_HOME/homellm.db)")
    g.add_argument("--user", default=None, help="whose feedback (default: the local user)")
    g.add_argument("--shared", action="store_true", help="every user who opted in (an admin's loop)")
    g = p.add_argument_group("tuning (a new round's settings; an open round keeps its own)")
    g.add_argument("--reward", default=None, metavar="RM",
                   help="ppo/grpo: this reward model instead of one trained on the round's pairs")
    g.add_argument("--reward-fn", default=None, metavar="FILE.py:F", help="ppo/grpo: a reward function")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (dpo) or rollouts (ppo, grpo)")
    g.add_argument("--rm-steps", type=int, default=None, help="the round's reward model's steps")
    g.add_argument("--epochs", type=int, default=None, help="passes over the pairs (default auto)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    g.add_argument("--max-length", type=int, default=512, help="tokens a training example (default 512)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="ppo/grpo: tokens a completion (default 64)")
    g.add_argument("--group-size", type=int, default=None, help="ppo/grpo: completions a prompt")
    g.add_argument("--merge-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the new version's weights (default float32)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    g = p.add_argument_group("eval")
    g.add_argument("--judge", default=None, metavar="MODEL_OR_URL",
                   help="run `homellm eval judge` between the two versions with this judge")
    g.add_argument("--judge-model", default=None, help="the model name at a judge URL")
    g.add_argument("--judge-key", default=None, help="the API key of a judge URL")
    g.add_argument("--questions", default=None, metavar="FILE",
                   help="MT-bench questions (default: the round's held-out prompts)")
    g.add_argument("--answer-tokens", type=int, default=128, help="tokens an eval answer (default 128)")
    g.add_argument("--min-votes", type=int, default=10,
                   help="arena votes between the two versions that decide a promotion (default 10)")
    g.add_argument("--port", type=int, default=8080, help="serve: the port (default 8080)")
    p.add_argument("--json", action="store_true", help="history: one JSON object")


def _say(text: str):
    print(text, file=sys.stderr, flush=True)


def _progress():
    """A progress callback for the training steps (tqdm on stderr)."""
    from tqdm import tqdm
    state = {"bar": None}

    def progress(event: dict):
        if "warning" in event:
            _say(f"warning: {event['warning']}")
            return
        if event.get("val_only"):
            return
        bar = state["bar"]
        if bar is None or bar.total != event["total"] or bar.n >= bar.total:
            if bar is not None:
                bar.close()
            bar = state["bar"] = tqdm(total=event["total"], unit="step", file=sys.stderr,
                                      initial=event["step"] - 1, leave=False, disable=None)
        bar.update(1)
        shown = {k: f"{event[k]:.4f}" for k in ("loss", "reward", "kl") if isinstance(event.get(k), float)}
        bar.set_postfix(shown, refresh=False)
    return progress


def _store(args):
    from homellm.errors import HomellmError
    from homellm.store import open_store
    store = open_store(args.db)
    if args.user is None:
        return store, store.local_user()
    user = store.user_by_name(args.user)
    if user is None:
        raise HomellmError(f"no user {args.user!r} in {store.url}")
    return store, user


def _settings(args, loop, rnd):
    from homellm.loop.steps import Settings
    device = args.device
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if rnd is not None and rnd.data.get("settings"):
        s = Settings.from_json(rnd.data["settings"])
        s.threads, s.device = args.threads or s.threads, device
        if args.judge or args.questions:
            s.questions = args.questions or s.questions
        return s
    from homellm.cli.tune import auto_dtype
    return Settings(method=args.method, all_feedback=args.all, shared=args.shared, user=args.user,
                    reward=args.reward, reward_fn=args.reward_fn, steps=args.steps, rm_steps=args.rm_steps,
                    epochs=args.epochs, lr=args.lr, rank=args.rank, max_length=args.max_length,
                    max_new_tokens=args.max_new_tokens, group_size=args.group_size,
                    threads=args.threads, device=device, dtype=auto_dtype(device, "none"),
                    merge_dtype=args.merge_dtype, answer_tokens=args.answer_tokens,
                    questions=args.questions)


def _open_loop(args, create: bool):
    from homellm.catalog.library import find
    from homellm.errors import HomellmError
    from homellm.loop.state import Loop, family, loops_dir
    if args.model is None:
        raise HomellmError("name the loop: -m NAME")
    base = args.base
    fam = family(args.model)
    if base is None and create and not (loops_dir() / fam / "loop.json").is_file():
        if find(args.model) is not None or args.model in ("smollm2", "default"):
            base = args.model  # a catalog model starts its own loop
    return Loop.open(args.model, create=create, base=base)


def _judge(args, rnd, s) -> dict:
    """`homellm eval judge` between the round's two versions, as its command runs it."""
    from homellm.cli import eval_judge
    from homellm.loop.steps import questions_file
    new, old = rnd.data["to"]["model"], rnd.data["from"]["model"]
    argv = ["--models", f"{new},{old}", "--questions", str(questions_file(rnd, s)), "--judge", args.judge,
            "--max-tokens", str(s.answer_tokens), "--json",
            "--out", str(rnd.path("eval", "judge.jsonl"))]
    if args.judge_model:
        argv += ["--judge-model", args.judge_model]
    if args.judge_key:
        argv += ["--judge-key", args.judge_key]
    parser = argparse.ArgumentParser(prog="homellm eval judge")
    eval_judge.add_arguments(parser)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        eval_judge.main(parser.parse_args(argv))
    result = json.loads(out.getvalue())
    m = result["metrics"][new]
    return {"judge": result["judge"], "questions": result["questions"], "runs": result["runs"],
            "details": result["out"], "win_rate": m.get("win_rate_raw"), "wins": m.get("wins"),
            "ties": m.get("ties"), "losses": m.get("losses"), "errors": m.get("errors"),
            "lc_win_rate": m.get("lc_win_rate")}


def _pct(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def _eval_line(ev: dict, new: str) -> str:
    parts = []
    if ev.get("judge"):
        j = ev["judge"]
        parts.append(f"judge: {new} wins {_pct(j['win_rate'])} ({j['wins']}-{j['ties']}-{j['losses']}"
                     f"{', %d errors' % j['errors'] if j.get('errors') else ''})")
    if ev.get("reward"):
        r = ev["reward"]
        parts.append(f"reward model: {new} wins {_pct(r['win_rate'])} (mean reward "
                     f"{r['mean_reward']:.3f} vs {r['mean_reward_opponent']:.3f})")
    held = ev.get("held_out") or {}
    if not parts and "reward_accuracy" in held:
        parts.append(f"held-out pairs: {new} prefers the chosen reply in {_pct(held['reward_accuracy'])} "
                     f"(DPO's implicit reward)")
    if not ev.get("judge") and not ev.get("reward"):
        parts.append("no judge or reward model: give --judge MODEL_OR_URL, or compare them in the arena")
    return "; ".join(parts)


def run(args) -> int:
    from homellm.errors import HomellmError
    from homellm.loop import steps
    if args.promote is not None:
        args.action, args.version = "promote", args.promote or args.version
    action = args.action
    if action == "history":
        return history(args)
    if action == "promote":
        return promote(args)
    loop = _open_loop(args, create=action in ("run", "data"))
    rnd = loop.open_round()
    if action == "serve":
        rnd = loop.last_round()
        if rnd is None or rnd.status not in ("merged", "evaluated"):
            raise HomellmError(f"loop {loop.name} has no merged round to serve")
        return serve(args, rnd)
    fresh = rnd is None
    if rnd is None:
        if action not in ("run", "data"):
            raise HomellmError(f"loop {loop.name} has no open round: start one with "
                               f"`homellm loop -m {loop.name}` (or `homellm loop data`)")
        s = _settings(args, loop, None)
        from dataclasses import asdict
        rnd = loop.new_round(s.method, asdict(s))
        _say(f"loop {loop.name}: round {rnd.number} ({s.method}) from {rnd.data['from']['model']} "
             f"to {rnd.data['to']['model']}")
    s = _settings(args, loop, rnd)
    order = ["data", "tune", "merge", "eval"]
    done_upto = {"new": 0, "data": 1, "tuned": 2, "merged": 3, "evaluated": 4}[rnd.status]
    todo = order[done_upto:] if action == "run" else [action]
    if action != "run":
        need = order.index(action)
        if action == "data" and rnd.status not in ("new", "data"):
            raise HomellmError(f"round {rnd.number} is tuned already; its data is fixed")
        if action != "data" and done_upto < need:
            raise HomellmError(f"round {rnd.number} is at step {rnd.status!r}: run "
                               f"`homellm loop {order[done_upto]} -m {loop.name}` first")
    store = None
    try:
        for step in todo:
            t0 = time.perf_counter()
            if step == "data":
                store, user = _store(args)
                if s.shared and not user.is_admin:
                    raise HomellmError(f"--shared is an admin's loop; {user.username!r} is not one")
                try:
                    d = steps.data(loop, rnd, store, user, s)
                except HomellmError:
                    if fresh:  # nothing was done: no empty round is left behind
                        import shutil
                        shutil.rmtree(rnd.folder, ignore_errors=True)
                    raise
                src = ", ".join(f"{n} {k}" for k, n in d["pairs_by_source"].items()) or "none"
                _say(f"data: {d['pairs']} pairs + {d['val_pairs']} held out ({src}; "
                     f"{d['pairs_used_before']} used by earlier rounds), {d['prompts']} prompts, "
                     f"{d['questions']} questions; feedback {d['counts']} -> {rnd.path('data')}")
            elif step == "tune":
                t = steps.tune(loop, rnd, s, progress=_progress(), say=_say)
                summary = (f"loss {t['losses'][0]:.4f} -> {t['losses'][1]:.4f}" if t.get("losses") else
                           f"reward {t['rewards'][0]:.4f} -> {t['rewards'][1]:.4f}, KL {t['kl']:.3f}"
                           if t.get("rewards") else "")
                _say(f"tune ({s.method}): {t['steps']} steps in {t['seconds']:.1f} s "
                     f"({t['tokens_per_s']:.0f} tok/s), {summary} -> {rnd.path('tune')}")
            elif step == "merge":
                m = steps.merge(loop, rnd, s)
                _say(f"merge: {m['model']} registered ({m['size'] / 1e6:.0f} MB in {m['seconds']:.1f} s)")
            elif step == "eval":
                judge = _judge(args, rnd, s) if args.judge else None
                ev = steps.evaluate(loop, rnd, s, judge=judge, say=_say)
                _say(f"eval: {_eval_line(ev, rnd.data['to']['model'])}")
            _say(f"  ({step}: {time.perf_counter() - t0:.1f} s)")
    finally:
        if store is not None:
            store.close()
    if rnd.status == "evaluated":
        old, new = rnd.data["from"]["model"], rnd.data["to"]["model"]
        _say(f"round {rnd.number} done: {new} beside {old}.\n"
             f"  serve both (people vote in the web app's arena): homellm loop serve -m {loop.name}"
             f"   (= homellm serve -m {old} {new})\n"
             f"  make the winner the default:                    homellm loop --promote -m {loop.name}")
    return 0


def serve(args, rnd) -> int:
    from homellm.cli import serve as serve_cli
    parser = argparse.ArgumentParser(prog="homellm serve")
    serve_cli.add_arguments(parser)
    argv = ["-m", rnd.data["from"]["model"], rnd.data["to"]["model"], "--port", str(args.port)]
    if args.db:
        argv += ["--db", args.db]
    _say(f"serving {' and '.join(argv[1:3])}: the arena at http://127.0.0.1:{args.port}/arena")
    return serve_cli.main(parser.parse_args(argv))


def promote(args) -> int:
    from homellm.errors import HomellmError
    from homellm.loop import steps
    loop = _open_loop(args, create=False)
    version = None
    if args.version is not None:
        text = args.version.removeprefix("v")
        if not text.isdigit():
            raise HomellmError(f"promote {args.version}: expected a version like v2")
        version = int(text)
        loop.version(version)  # (an unknown one fails here)
    store = None
    if version is None:
        from homellm.store import open_store
        store = open_store(args.db)
    try:
        p = steps.promote(loop, store, version, args.min_votes, say=_say)
    finally:
        if store is not None:
            store.close()
    _say(f"promoted v{p['version']} ({p['model']}; {p['why']}): it is now {p['latest']}, and the "
         f"next round starts from it.\n  serve it: homellm serve -m {p['latest']}")
    return 0


def history(args) -> int:
    from homellm.loop import steps
    from homellm.loop.state import Loop, loops_dir
    if args.model is not None:
        loops = [Loop.open(args.model)]
    else:
        loops = [Loop.open(p.name) for p in sorted(loops_dir().glob("*")) if (p / "loop.json").is_file()] \
            if loops_dir().is_dir() else []
    out = {loop.name: {"versions": loop.data["versions"], "default": loop.data.get("default"),
                       "rounds": steps.history(loop)} for loop in loops}
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
        return 0
    if not loops:
        print(f"no loops yet in {loops_dir()}: start one with `homellm loop -m NAME --base MODEL`")
    for loop in loops:
        d = loop.data.get("default")
        print(f"loop {loop.name}: versions " + ", ".join(
            f"v{v['version']}={v['model']}{' (default)' if v['version'] == d else ''}"
            for v in loop.data["versions"]))
        for row in out[loop.name]["rounds"]:
            train = (f"loss {row['train_loss'][0]:.3f}->{row['train_loss'][1]:.3f}" if row["train_loss"] else
                     f"reward {row['train_rewards'][0]:.3f}->{row['train_rewards'][1]:.3f}"
                     if row["train_rewards"] else "-")
            ev = _eval_line({"judge": row["judge"], "reward": row["reward"]}, row["to"]) \
                if row["judge"] or row["reward"] else "-"
            won = f"; promoted {row['promoted']['winner']}" if row["promoted"] else ""
            print(f"  round {row['round']}  {row['created']}  {row['method']:4s}  {row['status']:9s}  "
                  f"{row['from']} -> {row['to']}  pairs {row['pairs'] if row['pairs'] is not None else '-'}"
                  f"+{row['val_pairs'] or 0}  prompts {row['prompts'] if row['prompts'] is not None else '-'}  "
                  f"{train}  {ev}{won}")
            print(f"           {row['folder']}")
    return 0


def main(args: argparse.Namespace) -> int:
    return run(args)
