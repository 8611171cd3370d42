"""`homellm eval judge`: an LLM judge compares two models' answers (or grades them 1-10).

    homellm eval judge --models base,base+./adapter --questions mt.jsonl --judge judge-model
    homellm eval judge --models a,b --questions mt.jsonl --judge http://127.0.0.1:8080/v1
    homellm eval judge --models a --questions mt.jsonl --judge MODEL --mode single

Answers are made once per (model file, question, settings) and kept under
$HOMELLM_HOME/evals/answers; the judge's replies under evals/judgments. A run stopped by a
judge that is down keeps both: the same command resumes it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from homellm.cli.options import SAMPLING_FLAGS, sampling_options

HELP = "compare two models with an LLM judge (MT-bench style), or grade answers 1-10"
DEFAULT_MAX_TOKENS = 1024  # an answer's tokens a turn (MT-bench's default)
DEFAULT_JUDGE_MAX_TOKENS = 1024


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--models", required=True, metavar="A,B",
                   help="the models: two for pairwise, one or more for single; NAME or "
                        "NAME+ADAPTER_DIR, as `homellm run -m` takes them")
    p.add_argument("--questions", required=True, metavar="FILE",
                   help='MT-bench JSONL: {"question_id", "category", "turns": [...], '
                        'optional "reference": [...]} a line')
    p.add_argument("--judge", required=True, metavar="MODEL_OR_URL",
                   help="a model homellm runs, or an OpenAI-compatible API (http://HOST:PORT/v1)")
    p.add_argument("--judge-model", default=None, metavar="NAME",
                   help="the model name to ask a judge URL for (default: the one it lists)")
    p.add_argument("--judge-key", default=None, metavar="KEY",
                   help="API key for a judge URL (default: $OPENAI_API_KEY)")
    p.add_argument("--judge-max-tokens", type=int, default=DEFAULT_JUDGE_MAX_TOKENS, metavar="N",
                   help=f"the judge's reply at most N tokens (default {DEFAULT_JUDGE_MAX_TOKENS})")
    p.add_argument("--mode", choices=["pairwise", "single"], default="pairwise",
                   help="pairwise: A against B, both orders; single: a 1-10 grade an answer")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="requests in flight at once to a judge URL (default 1)")
    p.add_argument("--ctx", type=int, default=None,
                   help="context size of the answering models and a local judge (default 4096)")
    p.add_argument("--out", default=None, metavar="FILE.jsonl",
                   help="per-question results (default $HOMELLM_HOME/evals/judge/<time>.jsonl)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    g = p.add_argument_group("the answers (greedy unless --temperature says otherwise)")
    g.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help=f"an answer's tokens a turn at most (default {DEFAULT_MAX_TOKENS})")
    for name, (kind, help_text) in SAMPLING_FLAGS.items():
        if name == "temperature":
            help_text = "0 is greedy (default 0 here)"
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)


def _bar(total: int, desc: str, unit: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                dynamic_ncols=True, disable=None)  # None: no bar when stderr is not a terminal


def _loading_bar(label: str):
    bar = None

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = _bar(total, f"loading {label}", "layer")
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()
    return progress


def _say(args, text: str):
    if not args.json:
        print(text, file=sys.stderr)


def _answers(args, refs, hashes, questions, settings) -> tuple[list[dict], dict]:
    """Each model's answers by question id, made where not kept; and the counts and speed."""
    import gc

    from homellm.eval.answers import AnswerCache, generate_answers
    from homellm.eval.models import open_model
    every, made, kept, tokens, seconds = [], 0, 0, 0, 0.0
    for ref, h in zip(refs, hashes):
        cache = AnswerCache(h)
        have = {q.id: a for q in questions if (a := cache.get(q, settings)) is not None}
        missing = [q for q in questions if q.id not in have]
        kept += len(have)
        if missing:
            model = open_model(ref, ctx=args.ctx, progress=_loading_bar(ref.label))
            bar = _bar(len(missing), f"answers {ref.label}", "answer")
            t0 = time.perf_counter()
            n_tok = 0
            for answer in generate_answers(model, h, missing, settings, ref.label):
                cache.add(answer)
                have[answer.question_id] = answer
                n_tok += sum(answer.tokens)
                bar.update(1)
                bar.set_postfix_str(f"{n_tok / max(time.perf_counter() - t0, 1e-9):.1f} tok/s")
            bar.close()
            dt = time.perf_counter() - t0
            made, tokens, seconds = made + len(missing), tokens + n_tok, seconds + dt
            _say(args, f"answers {ref.label}: {len(missing)} made in {dt:.1f} s "
                       f"({len(missing) / dt:.2f} answers/s, {n_tok / dt:.1f} tok/s), "
                       f"{len(questions) - len(missing)} kept -> {cache.path}")
            del model
            gc.collect()
        else:
            _say(args, f"answers {ref.label}: all {len(questions)} kept -> {cache.path}")
        every.append(have)
    stats = {"made": made, "kept": kept, "tokens": tokens, "seconds": round(seconds, 3),
             "answers_per_s": round(made / seconds, 3) if seconds else None}
    return every, stats


def _judge(args, judge, prompts) -> tuple[list, dict]:
    from homellm.eval.answers import answers_dir
    from homellm.eval.judges import JudgeUnavailable, JudgmentCache, run_judgments
    cache = JudgmentCache(judge.id)
    bar = _bar(len(prompts), "judging", "judgment")
    counts = {"made": 0, "kept": 0, "failed": 0}

    def done(reply):
        counts["kept" if reply.cached else "failed" if reply.text is None else "made"] += 1
        bar.update(1)

    t0 = time.perf_counter()
    try:
        replies = run_judgments(judge, prompts, cache, args.judge_max_tokens, args.parallel, done)
    except JudgeUnavailable as e:
        bar.close()
        raise JudgeUnavailable(
            f"{e}. Nothing is lost: the answers are kept in {answers_dir()} and the "
            f"{counts['made'] + counts['kept']} judgments so far in {cache.path}; run the same "
            f"command again to resume") from None
    finally:
        judge.close()
    bar.close()
    dt = time.perf_counter() - t0
    asked = counts["made"] + counts["failed"]
    counts.update(seconds=round(dt, 3), judgments_per_s=round(asked / dt, 3) if asked and dt else None)
    _say(args, f"judgments: {counts['made']} made in {dt:.1f} s"
               + (f" ({asked / dt:.2f} judgments/s)" if asked and dt else "")
               + f", {counts['kept']} kept" + (f", {counts['failed']} failed" if counts["failed"] else "")
               + f" -> {cache.path}")
    return replies, counts


def _finite(value):
    """NaN (a rate over no questions) as None, so that the JSON written is valid."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _pct(rate: float | None, ci) -> str:
    if rate is None:  # nothing to rate
        return "    -"
    return f"{100 * rate:5.1f}%  [{100 * ci[0]:5.1f}%, {100 * ci[1]:5.1f}%]"


def main(args: argparse.Namespace) -> int:
    from homellm.errors import HomellmError
    from homellm.eval.answers import answer_settings, load_questions
    from homellm.eval.judges import open_judge
    from homellm.eval.models import model_hash, parse_model_list
    from homellm.eval.results import evals_dir, record

    for flag, value in (("--judge-max-tokens", args.judge_max_tokens), ("--parallel", args.parallel)):
        if value < 1:
            raise HomellmError(f"{flag} {value}: expected at least 1")
    if args.ctx is not None and args.ctx < 2:
        raise HomellmError(f"--ctx {args.ctx}: the context must hold at least 2 tokens")
    sampling = sampling_options(args)
    settings = answer_settings(args.max_tokens, sampling)
    questions = load_questions(args.questions)
    refs = parse_model_list(args.models)
    if args.mode == "pairwise" and len(refs) != 2:
        raise HomellmError(f"--models {args.models}: pairwise judging takes exactly two models "
                           f"(A,B); got {len(refs)}. Use --mode single to grade one or more")
    hashes = [model_hash(ref) for ref in refs]  # (an unknown model fails here, before any work)
    judge = open_judge(args.judge, model=args.judge_model, api_key=args.judge_key, ctx=args.ctx,
                       progress=_loading_bar("judge"))
    labels = [ref.label for ref in refs]
    if len(set(labels)) < len(labels):
        raise HomellmError(f"--models {args.models}: a model is named twice")

    answers, answer_stats = _answers(args, refs, hashes, questions, settings)

    from homellm.eval import judge as J
    if args.mode == "pairwise":
        a, b = answers
        replies, judge_stats = _judge(args, judge, J.pairwise_prompts(questions, a, b))
        results = J.pair_results(questions, a, b, replies)
        rows = [r.to_json(labels[0], labels[1]) for r in results]
        metrics = {labels[0]: J.pairwise_metrics(results)}
    else:
        prompts = [J.single_prompt(q, ans[q.id].turns) for ans in answers for q in questions]
        replies, judge_stats = _judge(args, judge, prompts)
        n = len(questions)
        graded = [J.grade_results(questions, ans, replies[i * n:(i + 1) * n])
                  for i, ans in enumerate(answers)]
        rows = [r.to_json(label) for label, rs in zip(labels, graded) for r in rs]
        metrics = {label: J.single_metrics(rs) for label, rs in zip(labels, graded)}

    out = Path(args.out).expanduser() if args.out else \
        evals_dir() / "judge" / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.mode}.jsonl"
    J.write_results(out, rows)
    metrics = _finite(metrics)
    base = {"mode": args.mode, "judge": judge.describe, "judge_max_tokens": args.judge_max_tokens,
            "answers": settings, "questions": str(Path(args.questions).expanduser().resolve()),
            "details": str(out)}
    runs = []
    for i, (label, h) in enumerate(zip(labels, hashes)):
        if label not in metrics:
            continue
        extra = {"opponent": labels[1], "opponent_hash": hashes[1]} if args.mode == "pairwise" else {}
        runs.append(record("judge", model=label, model_hash=h, task=Path(args.questions).name,
                           settings={**base, **extra}, metrics=metrics[label]).id)
    if args.json:
        print(json.dumps({"mode": args.mode, "models": labels, "model_hashes": hashes,
                          "judge": judge.describe, "questions": len(questions), "metrics": metrics,
                          "answers": answer_stats, "judgments": judge_stats, "out": str(out),
                          "runs": runs}))
        return 0
    print(f"judge: {judge.describe}; {len(questions)} questions; mode {args.mode}")
    if args.mode == "pairwise":
        m = metrics[labels[0]]
        print(f"A = {labels[0]}\nB = {labels[1]}")
        print(f"  A wins  {m['wins']:4d}  {_pct(m['win_rate'], m['win_rate_ci'])}")
        print(f"  ties    {m['ties']:4d}  {_pct(m['tie_rate'], m['tie_rate_ci'])}")
        print(f"  B wins  {m['losses']:4d}  {_pct(m['loss_rate'], m['loss_rate_ci'])}")
        print(f"  win rate of A (a tie counts 1/2)   {_pct(m['win_rate_raw'], m['win_rate_raw_ci'])}")
        print(f"  length-controlled win rate of A    {_pct(m['lc_win_rate'], m['lc_win_rate_ci'])}")
        if m["n"]:
            print(f"  mean answer length: A {m['mean_length_a']:.0f}, B {m['mean_length_b']:.0f} "
                  f"chars; {m['inconsistent']} verdicts changed with the order (counted as ties)")
        if m["errors"]:
            print(f"  errors: {m['errors']} of {m['questions']} questions had no readable verdict "
                  f"(left out of the rates; the replies are in {out})")
    else:
        for label in labels:
            m = metrics[label]
            mean = "-" if not m["n"] else \
                f"{m['mean_rating']:.2f}  [{m['mean_rating_ci'][0]:.2f}, {m['mean_rating_ci'][1]:.2f}]"
            errors = f"; errors: {m['errors']} without a readable rating" if m["errors"] else ""
            print(f"  {label}: mean rating {mean} over {m['n']} of {m['questions']} answers{errors}")
    print(f"per-question results: {out}")
    print(f"kept as eval run{'s' if len(runs) > 1 else ''} {', '.join(runs)}")
    return 0
