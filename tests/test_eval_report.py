"""`homellm eval report`: kept runs (real JSON files under $HOMELLM_HOME/evals) as a table, JSON
rows and a PNG chart; clear errors without matplotlib or with a bad chart path."""
from __future__ import annotations

import json
import sys

import pytest

from homellm.cli.main import main as cli
from homellm.eval.report import chart_groups, report_rows
from homellm.eval.results import load_runs, record


def keep_some_runs():
    record("ppl", model="smollm2", model_hash="a" * 16, task="wiki.txt", settings={"ctx": 512},
           metrics={"ppl": 18.25, "ppl_err": 0.12, "bpb": 0.93, "tokens_per_s": 900.0})
    record("ppl", model="smollm2+runs/sft", model_hash="b" * 16, task="wiki.txt",
           settings={"ctx": 512}, metrics={"ppl": 17.5, "ppl_err": 0.11, "bpb": 0.9})
    record("kld", model="q4_1.gguf", model_hash="c" * 16, task="wiki.txt",
           settings={"ctx": 512, "reference_model": "f16.gguf"},
           metrics={"kld_mean": 0.0123, "kld_err": 0.0004, "same_top1": 0.91, "ppl": 18.9})
    record("tasks", model="smollm2", model_hash="a" * 16, task="arc_local",
           metrics={"acc": 0.61, "acc_stderr": 0.05, "acc_norm": 0.64, "acc_norm_stderr": 0.048,
                    "samples": 40})
    record("judge", model="smollm2+runs/sft", model_hash="b" * 16, task="mt.jsonl",
           settings={"opponent": "smollm2"},
           metrics={"win_rate": 0.58, "win_rate_ci": [0.49, 0.67], "wins": 14, "ties": 3, "losses": 9})
    record("custom", model="m", model_hash="d" * 16, task="t", metrics={"samples": 3, "zeta": 2.5})
    # a later ppl run of the first model on the same data (the chart keeps the latest)
    record("ppl", model="smollm2", model_hash="a" * 16, task="wiki.txt", settings={"ctx": 512},
           metrics={"ppl": 18.0, "ppl_err": 0.1})


def test_table_rows_and_filters(homellm_home, capsys):
    keep_some_runs()
    rows = report_rows(load_runs())
    assert [(r["kind"], r["metric"], r["value"]) for r in rows] == [
        ("ppl", "ppl", 18.25), ("ppl", "ppl", 17.5), ("kld", "kld_mean", 0.0123),
        ("tasks", "acc_norm", 0.64), ("judge", "win_rate", 0.58), ("custom", "zeta", 2.5),
        ("ppl", "ppl", 18.0)]
    assert rows[0]["lower_is_better"] and not rows[3]["lower_is_better"]
    assert rows[4]["uncertainty"] == [0.49, 0.67] and rows[2]["against"] == "f16.gguf"

    assert cli(["eval", "report"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["date", "kind", "model", "hash", "task", "metric", "details"]
    assert len(out) == 8
    assert "smollm2+runs/sft" in out[2] and "bbbbbbbbbbbb" in out[2] and "ppl 17.5 ± 0.11" in out[2]
    assert "acc_norm 0.64 ± 0.048" in out[4] and "samples 40" in out[4]
    assert "win_rate 0.58 [0.49, 0.67]" in out[5] and "lc_win_rate" not in out[5]

    assert cli(["eval", "report", "--kind", "ppl", "--task", "wiki.txt", "--json"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [g["value"] for g in got] == [18.25, 17.5, 18.0]
    assert cli(["eval", "report", "--model", "sft"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert cli(["eval", "report", "--kind", "nothing"]) == 0
    assert "no kept eval runs for --kind nothing" in capsys.readouterr().out


def test_chart(homellm_home, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    keep_some_runs()
    groups = dict(chart_groups(report_rows(load_runs())))
    ppl = groups[("ppl", "wiki.txt", "ppl", None)]
    assert sorted((r["model"], r["value"]) for r in ppl) == [("smollm2", 18.0), ("smollm2+runs/sft", 17.5)]
    assert len(groups) == 5
    path = tmp_path / "evals.png"
    assert cli(["eval", "report", "--chart", str(path)]) == 0
    assert f"chart: {path}" in capsys.readouterr().out
    import matplotlib.image
    image = matplotlib.image.imread(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.shape[0] > 400 and image.shape[1] > 800
    assert (image[..., :3] < 0.5).any()  # bars and text, not a blank page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evals.png", "home"]


def test_chart_errors(homellm_home, tmp_path, capsys, monkeypatch):
    def error(*argv) -> str:
        assert cli(["eval", "report", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        return err
    assert "nothing to chart" in error("--chart", str(tmp_path / "a.png"))
    keep_some_runs()
    assert "expected a .png" in error("--chart", str(tmp_path / "a.jpg"))
    assert "does not exist" in error("--chart", str(tmp_path / "no" / "a.png"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert "pip install 'homellm[eval]'" in error("--chart", str(tmp_path / "a.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
