import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import evaluate

REPO = Path(__file__).resolve().parents[1]
ANSWERS = {"q1": ["Paris"], "q2": ["Jamaican English"]}


def _table(method, n, uuids, predictions, seconds, tokens, paraphrase_index=None, **extra):
    rows = len(uuids)
    return pd.DataFrame(
        {
            "uuid": uuids,
            "paraphrases": [["p0", "p1", "p2"]] * rows,
            "prompts": [["prompt0", "prompt1", "prompt2"]] * rows,
            "answers": [ANSWERS[u] for u in uuids],
            "prediction": predictions,
            "generation": predictions,
            "seconds": seconds,
            "new_tokens": tokens,
            "method": method,
            "num_ensemble": n,
            "paraphrase_index": paraphrase_index if paraphrase_index is not None else [-1] * rows,
            **extra,
        }
    )


@pytest.fixture
def results_dir(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    # per_prompt, no scores (evaluate must compute them). Correct (exact, partial) by hand:
    # q1: p0 (T, T), p1 (F, F), p2 (F, F);  q2: p0 (F, F), p1 (F, T), p2 (F, F)
    _table(
        "per_prompt", 3,
        ["q1", "q1", "q1", "q2", "q2", "q2"],
        ["Paris.", "London", "Lyon", "Creole", "They speak Jamaican English mostly", "English"],
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        [2, 4, 6, 8, 10, 12],
        paraphrase_index=[0, 1, 2, 0, 1, 2],
    ).to_feather(d / "per_prompt.feather")
    # scores given: "Patois" graded correct upstream although the scorer would not match it
    _table(
        "avg", 3, ["q1", "q2"], ["Paris", "Patois"], [3.0, 5.0], [5, 7],
        exact=[True, False], partial=[True, True],
    ).to_feather(d / "ensemble_avg-3.feather")
    _table(
        "flex_attention", 3, ["q1", "q2"], ["paris", "Creole"], [1.5, 2.5], [3, 3],
        positions="aligned", attn_backend="sdpa", fusion_bias="none",
    ).to_feather(d / "flex_attention-3.feather")
    _table(
        "flex_attention", 2, ["q1"], ["Paris"], [0.5], [4],
        positions="aligned", attn_backend="sdpa", fusion_bias=[None],
    ).to_feather(d / "flex_attention-2.feather")
    # to be ignored: the jsonl copy and an unfinished table without the required columns
    (d / "per_prompt.jsonl").write_text("{}\n")
    pd.DataFrame({"uuid": ["q1"]}).to_feather(d / "ensemble_max-3.partial.feather")
    return d


def test_build_report_numbers(results_dir):
    report = evaluate.build_report(results_dir)[0].set_index("method")
    assert list(report.index) == [
        "per_prompt", "avg", "flex_attention[aligned,sdpa]", "flex_attention[aligned,sdpa,none]",
    ]
    pp = report.loc["per_prompt"]
    assert pp["N"] == 3 and pp["questions"] == 2
    assert pp["exact"] == pytest.approx(1 / 6)
    assert pp["partial"] == pytest.approx(2 / 6)
    assert pp["mean"] == pytest.approx(1 / 3)  # per index: 0.5, 0.5, 0.0
    assert pp["best"] == pytest.approx(0.5)
    assert pp["oracle"] == pytest.approx(1.0)
    assert pp["seconds/question"] == pytest.approx(21 / 2)
    assert pp["tokens/question"] == pytest.approx(42 / 2)
    assert pp["file"] == "per_prompt.feather"

    avg = report.loc["avg"]
    assert (avg["N"], avg["questions"]) == (3, 2)
    assert avg["exact"] == pytest.approx(0.5)
    assert avg["partial"] == pytest.approx(1.0)  # the given scores win
    assert avg["seconds/question"] == pytest.approx(4.0)
    assert avg["tokens/question"] == pytest.approx(6.0)
    assert avg[["mean", "best", "oracle"]].isna().all()

    flex = report.loc["flex_attention[aligned,sdpa,none]"]
    assert (flex["N"], flex["questions"]) == (3, 2)
    assert flex["exact"] == pytest.approx(0.5)
    assert flex["partial"] == pytest.approx(0.5)
    assert flex["seconds/question"] == pytest.approx(2.0)
    assert flex["tokens/question"] == pytest.approx(3.0)

    flex2 = report.loc["flex_attention[aligned,sdpa]"]
    assert (flex2["N"], flex2["questions"], flex2["partial"]) == (2, 1, 1.0)


def test_format_markdown():
    df = pd.DataFrame({"method": ["avg", "origin"], "N": [3, 1], "partial": [0.5, float("nan")]})
    assert evaluate.format_markdown(df).splitlines() == [
        "| method | N | partial |",
        "|---|---|---|",
        "| avg | 3 | 0.500 |",
        "| origin | 1 |  |",
    ]


def test_main_writes_report_files(results_dir, capsys):
    assert evaluate.main(["--results-dir", str(results_dir)]) == 0
    out = capsys.readouterr().out
    assert "| per_prompt | 3 | 2 | 0.167 | 0.333 |" in out
    md = (results_dir / "report.md").read_text()
    assert "metric (partial)" in md and "| avg | 3 | 2 | 0.500 | 1.000 |" in md
    csv = pd.read_csv(results_dir / "report.csv")
    assert csv["method"].tolist()[:2] == ["per_prompt", "avg"]
    assert csv.loc[0, "oracle"] == pytest.approx(1.0)
    assert (results_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(results_dir.glob("*.tmp"))


def test_output_dir(results_dir, tmp_path):
    out = tmp_path / "out" / "nested"
    assert evaluate.main(["--results-dir", str(results_dir), "--output-dir", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"report.md", "report.csv", "report.png"}
    assert not (results_dir / "report.md").exists()


def _bad_input(argv, capsys):
    code = evaluate.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    return err


def test_missing_results_dir(tmp_path, capsys):
    missing = tmp_path / "nope"
    err = _bad_input(["--results-dir", str(missing)], capsys)
    assert str(missing) in err
    assert not missing.exists()


def test_results_dir_without_tables(results_dir, capsys):
    for p in results_dir.glob("*.feather"):
        if ".partial" not in p.name:
            p.unlink()
    before = sorted(p.name for p in results_dir.iterdir())
    err = _bad_input(["--results-dir", str(results_dir)], capsys)
    assert str(results_dir) in err
    assert sorted(p.name for p in results_dir.iterdir()) == before


def test_table_missing_columns(results_dir, capsys):
    _table("origin", 1, ["q1"], ["Paris"], [1.0], [1]).drop(columns=["seconds", "new_tokens"]).to_feather(
        results_dir / "origin.feather"
    )
    err = _bad_input(["--results-dir", str(results_dir)], capsys)
    assert "origin.feather" in err and "seconds" in err and "new_tokens" in err
    assert not (results_dir / "report.md").exists()
    assert not (results_dir / "report.csv").exists()


def test_cli_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "evaluate.py", "--results-dir", str(tmp_path / "nope")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_folder_with_every_kind_of_file_reports_only_result_tables(tmp_path):
    """Tables, their .jsonl copies and settings, partial files, a stale lock, an atomic write's leftover, an
    earlier report, the confidence cache (and an earlier version's confidence.feather): only tables count."""
    import generate
    from confidence import confidences
    from conftest import cached_tiny
    from dataset import Dataset, Record
    from decoding import StopRule, eos_ids

    out = tmp_path / "run"
    assert generate.main(["--model", "tiny-llama", "--limit", "2", "--max-new-tokens", "2", "--no-progress",
                          "--method", "per_prompt", "--num_ensemble", "3", "--output-dir", str(out)]) == 0
    model, tokenizer = cached_tiny("llama")
    dataset = Dataset("test", "qa", [Record("q1", ["p0?", "p1?"], ["a"])], [])
    confidences(model, tokenizer, dataset, dataset.records, 2, 2, StopRule(eos_ids(model, tokenizer), 2), out,
                model_name="tiny-llama")
    pd.DataFrame({"uuid": ["q1"], "paraphrase_index": [0], "paraphrase": ["p"], "greedy": ["a"], "samples": [10],
                  "confidence": [0.5]}).to_feather(out / "confidence.feather")
    (out / "ensemble_avg-3.rank0.partial.jsonl").write_text('{"uuid": "q1"}\n{"uuid": "q2", "pred')
    (out / "ensemble_avg-3.settings.json").write_text("{}")
    (out / "ensemble_avg-3.rank0.lock").write_text("pid 999999999 on nowhere")
    (out / ".per_prompt.feather.x1y2.tmp").write_bytes(b"half a file")
    assert evaluate.main(["--results-dir", str(out)]) == 0  # leaves report.md/.csv/.png behind
    assert list((out / "confidence-cache").glob("*.feather"))
    report = evaluate.build_report(out)[0]
    assert report["method"].tolist() == ["per_prompt"] and report["file"].tolist() == ["per_prompt.feather"]
    assert evaluate.main(["--results-dir", str(out)]) == 0


def test_confidence_time_counts_in_the_cost(tmp_path):
    _table("weighted_avg", 3, ["q1", "q2"], ["Paris", "Creole"], [1.0, 2.0], [1, 1],
           confidence_seconds=[4.0, 6.0]).to_feather(tmp_path / "ensemble_weighted_avg-3.feather")
    report = evaluate.build_report(tmp_path)[0]
    assert report.loc[0, "seconds/question"] == pytest.approx((1 + 2 + 4 + 6) / 2)


def test_reports_are_readable_as_the_umask_says(results_dir, tmp_path):
    old = os.umask(0o027)
    try:
        assert evaluate.main(["--results-dir", str(results_dir), "--output-dir", str(tmp_path / "r")]) == 0
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "r").iterdir()} == {
        "report.md": 0o640, "report.csv": 0o640, "report.png": 0o640}


def test_intervals_paired_differences_and_oracle_gap(tmp_path):
    """4 questions, N=2, partial scores set by hand. per_prompt: q1 both right, q2 one right, q3 and q4
    none (per-question mean 1, .5, 0, 0 -> .375; oracle 1, 1, 0, 0 -> .5). avg right on q1 only; flex on
    q1 and q2. flex - avg = (0, 1, 0, 0) -> +0.25; flex - mean = (0, .5, 0, 0) -> +0.125; gap closed by
    flex (.5 - .375) / (.5 - .375) = 1, by avg (.25 - .375) / .125 = -1."""
    uuids = ["q1", "q2", "q3", "q4"]
    pp = pd.DataFrame({"uuid": [u for u in uuids for _ in range(2)], "answers": [["x"]] * 8, "prediction": "x",
                       "seconds": 1.0, "new_tokens": 1, "method": "per_prompt", "num_ensemble": 2,
                       "paraphrase_index": [0, 1] * 4, "exact": False,
                       "partial": [True, True, True, False, False, False, False, False]})
    pp.to_feather(tmp_path / "per_prompt.feather")
    for name, method, right in (("ensemble_avg-2", "avg", [1, 0, 0, 0]), ("flex_attention-2", "flex_attention",
                                                                          [1, 1, 0, 0])):
        pd.DataFrame({"uuid": uuids, "answers": [["x"]] * 4, "prediction": "x", "seconds": 1.0, "new_tokens": 1,
                      "method": method, "num_ensemble": 2, "paraphrase_index": -1, "exact": False,
                      "partial": [bool(r) for r in right]}).to_feather(tmp_path / f"{name}.feather")
    report = evaluate.build_report(tmp_path)[0].set_index("method")
    flex, avg = report.loc["flex_attention"], report.loc["avg"]
    assert flex["vs avg"].startswith("+0.250 [") and flex["vs per-prompt mean"].startswith("+0.125 [")
    lo, hi = (float(x) for x in flex["vs avg"].split("[")[1].rstrip("]").split(","))
    assert 0.0 <= lo <= 0.25 <= hi <= 1.0
    assert flex["oracle gap closed"] == pytest.approx(1.0) and avg["oracle gap closed"] == pytest.approx(-1.0)
    assert report.loc["per_prompt", "mean"] == pytest.approx(0.375) and report.loc["per_prompt", "oracle"] == 0.5
    assert evaluate.bootstrap(np.ones(10)) == (1.0, 1.0)


def test_agreement_counts_equal_pairs():
    pp = pd.DataFrame({"uuid": ["a"] * 3 + ["b"] * 3, "paraphrase_index": [0, 1, 2] * 2,
                       "prediction": ["Paris", "paris.", "Lyon", "x", "y", "z"]})
    agree = evaluate.agreement(pp, 3)
    assert agree["a"] == pytest.approx(1 / 3) and agree["b"] == 0.0
    assert evaluate.agreement(pp, 2)["a"] == 1.0
