import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import evaluate
from conftest import run_main

REPO = Path(__file__).resolve().parents[1]
ANSWERS = {"q1": ["Paris"], "q2": ["Jamaican English"]}
REPORT_FILES = ("report.md", "report.csv", "report.png", "report.pdf", "gain.md", "gain.csv", "questions.csv",
                "reliability.png", "reliability.pdf")


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
    # short labels: only settings that differ from the defaults (aligned = left; attn_backend never)
    assert list(report.index) == ["per_prompt", "avg", "vote", "vote", "flex_attention", "flex[bias_none]"]
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

    flex = report.loc["flex[bias_none]"]
    assert (flex["N"], flex["questions"]) == (3, 2)
    assert flex["exact"] == pytest.approx(0.5)
    assert flex["partial"] == pytest.approx(0.5)
    assert flex["seconds/question"] == pytest.approx(2.0)
    assert flex["tokens/question"] == pytest.approx(3.0)

    flex2 = report.loc["flex_attention"]
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
    assert {p.name for p in out.iterdir()} == set(REPORT_FILES)
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
    proc = run_main("evaluate.py", "--results-dir", str(tmp_path / "nope"))
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
    from decoding import LanguageModel, StopRule, eos_ids

    out = tmp_path / "run"
    assert generate.main(["--model", "tiny-llama", "--limit", "2", "--max-new-tokens", "2", "--no-progress",
                          "--method", "per_prompt", "--num_ensemble", "3", "--output-dir", str(out)]) == 0
    model, tokenizer = cached_tiny("llama")
    dataset = Dataset("test", "qa", [Record("q1", ["p0?", "p1?"], ["a"])], [])
    confidences(LanguageModel(model, tokenizer), dataset, dataset.records, 2, 2, StopRule(eos_ids(model, tokenizer), 2), out,
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
        name: 0o640 for name in REPORT_FILES}


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


# ---------------------------------------------------------------------------------------------- vote, gain, files

def _pp(answers: dict, predictions: dict, partial: dict | None = None, **extra) -> pd.DataFrame:
    """A per_prompt table: predictions[uuid] lists the single answers by paraphrase index; unscored unless
    `partial` gives the scores (exact = partial then)."""
    rows = [{"uuid": u, "answers": answers[u], "prediction": p, "seconds": 1.0 + i, "new_tokens": 1 + i,
             "method": "per_prompt", "num_ensemble": len(preds), "paraphrase_index": i,
             "paraphrases": [f"{u} phrased {i}"], **{k: v[u][i] for k, v in extra.items()}}
            for u, preds in predictions.items() for i, p in enumerate(preds)]
    df = pd.DataFrame(rows)
    if partial is not None:
        df["partial"] = df["exact"] = [partial[u][i] for u, preds in predictions.items() for i in range(len(preds))]
    return df


def _ensemble(method: str, n: int, answers: dict, predictions: dict, right: dict | None = None,
              **extra) -> pd.DataFrame:
    """An ensemble table, one row per (uuid, prediction); `right` gives the scores (else scored)."""
    rows = [{"uuid": u, "answers": answers[u], "prediction": p, "seconds": 1.0, "new_tokens": 2, "method": method,
             "num_ensemble": n, "paraphrase_index": -1, "paraphrases": [f"{u} phrased {i}" for i in range(n)]}
            for u, p in predictions.items()]
    df = pd.DataFrame(rows)
    for k, v in extra.items():
        df[k] = v
    if right is not None:
        df["partial"] = df["exact"] = [right[u] for u in predictions]
    return df


def test_vote_position_majority_ties_and_empty_answers():
    assert evaluate.vote_position(["lyon", "paris", "paris"]) == 1          # the majority, at its first place
    assert evaluate.vote_position(["b", "a", "a", "b"]) == 0                # a tie goes to the earliest
    assert evaluate.vote_position(["a", "b", "c"]) == 0
    assert evaluate.vote_position(["", "", "x"]) == 2                       # empty answers do not vote...
    assert evaluate.vote_position(["", "", ""]) == 0                        # ...unless all are empty


def test_vote_row_normalises_follows_paraphrase_indices_and_costs(tmp_path):
    """q1: indices (3, 1, 2) hold "Paris." / "paris" / "Lyon" -> the vote is Paris. (right); the first 3 would
    vote Lyon (wrong). q2: indices (0, 2, 3) hold "", "Rome", "" -> Rome, not the empty answer (right).
    Cost: the sum of the chosen single prompts' (seconds 1 + index, tokens 1 + index)."""
    answers = {"q1": ["Paris"], "q2": ["Rome"]}
    _pp(answers, {"q1": ["Lyon", "paris", "Lyon", "Paris."], "q2": ["", "Oslo", "Rome", ""]}).to_feather(
        tmp_path / "per_prompt.feather")
    _ensemble("avg", 3, answers, {"q1": "Lyon", "q2": "Oslo"}, paraphrase_indices=[[3, 1, 2], [0, 2, 3]]).to_feather(
        tmp_path / "ensemble_avg-3.feather")
    analysis = evaluate.analyse(tmp_path)
    vote = next(g for g in analysis.groups if g.label == "vote")
    assert vote.n == 3 and vote.rows.set_index("uuid")["prediction"].to_dict() == {"q1": "Paris.", "q2": "Rome"}
    report = analysis.report.set_index("method")
    assert report.loc["vote", "exact"] == 1.0 and report.loc["vote", "partial"] == 1.0
    assert report.loc["vote", "seconds/question"] == pytest.approx(((4 + 2 + 3) + (1 + 3 + 4)) / 2)
    assert report.loc["vote", "tokens/question"] == pytest.approx(((4 + 2 + 3) + (1 + 3 + 4)) / 2)
    assert report.loc["avg", "vs_vote"] == pytest.approx(-1.0) and report.loc["avg", "vs vote"].startswith("-1.000 [")
    assert report.loc["vote", "vs_avg"] == pytest.approx(1.0)
    # without paraphrase_indices the first N count: q1 votes Lyon (tie of three, earliest), q2 Oslo
    _ensemble("avg", 3, answers, {"q1": "Lyon", "q2": "Oslo"}).to_feather(tmp_path / "ensemble_avg-3.feather")
    vote = next(g for g in evaluate.analyse(tmp_path).groups if g.label == "vote")
    assert vote.rows.set_index("uuid")["prediction"].to_dict() == {"q1": "Lyon", "q2": "Oslo"}
    assert not vote.rows["exact"].any()


def test_a_vote_needs_every_single_answer_it_votes_over(tmp_path):
    """per_prompt holds 3 single answers of q1 and 2 of q2: the vote at N=3 is q1's only, and no vote at N=4 is
    made from 3 (nor a per-prompt mean or oracle beside those rows)."""
    answers = {"q1": ["Paris"], "q2": ["Rome"]}
    _pp(answers, {"q1": ["Paris", "Paris", "Lyon"], "q2": ["Rome", "Rome"]}).to_feather(tmp_path / "per_prompt.feather")
    _ensemble("avg", 3, answers, {"q1": "Paris", "q2": "Rome"}).to_feather(tmp_path / "ensemble_avg-3.feather")
    _ensemble("max", 4, answers, {"q1": "Paris", "q2": "Rome"}).to_feather(tmp_path / "ensemble_max-4.feather")
    analysis = evaluate.analyse(tmp_path)
    votes = {g.n: g for g in analysis.groups if g.label == "vote"}
    assert set(votes) == {3} and votes[3].rows["uuid"].tolist() == ["q1"]
    four = next(g for g in analysis.groups if g.label == "max")
    assert four.singles.empty and four.stats.empty


def _gain_dir(tmp_path):
    """3 paraphrases, partial scores by hand. singles right: q1 none, q2 one, q3 two, q4 one; the ensemble is
    right on q1 (new), q2 (kept), wrong on q3 (lost: 2 of 3 right) and q4 (neither)."""
    answers = {u: ["x"] for u in ("q1", "q2", "q3", "q4")}
    preds = {"q1": ["a", "a", "b"], "q2": ["x", "y", "z"], "q3": ["x", "x", "c d"], "q4": ["c d", "c", "x"]}
    right = {"q1": [0, 0, 0], "q2": [1, 0, 0], "q3": [1, 1, 0], "q4": [0, 0, 1]}
    _pp(answers, preds, {u: [bool(r) for r in v] for u, v in right.items()}).to_feather(tmp_path / "per_prompt.feather")
    _ensemble("avg", 3, answers, {"q1": "x", "q2": "x", "q3": "c", "q4": "c"},
              {"q1": True, "q2": True, "q3": False, "q4": False}).to_feather(tmp_path / "ensemble_avg-3.feather")
    return tmp_path


def test_gain_counts_consistency_jaccard_and_bins(tmp_path):
    analysis = evaluate.analyse(_gain_dir(tmp_path))
    gain = evaluate.gain_table(analysis).set_index("method").loc["avg"]
    assert (gain["new"], gain["kept"], gain["lost"], gain["questions"]) == (1, 1, 1, 4)
    assert gain["AND"] == 0.0 and gain["OR"] == pytest.approx(3 / 4)
    assert gain["accuracy"] == 0.5 and gain["single mean"] == pytest.approx((0 + 1 / 3 + 2 / 3 + 1 / 3) / 4)
    # equal pairs: q1 1 of 3, q2 0, q3 1 of 3, q4 0; token sets {c, d} / {c}: overlap 1/2
    assert gain["consistency"] == pytest.approx((1 / 3 + 0 + 1 / 3 + 0) / 4)
    assert gain["jaccard"] == pytest.approx((1 / 3 + 0 + 1 / 3 + 0.5 / 3) / 4)
    # consistency bins: 0-0.2 holds q2 (right) and q4 (wrong), 0.2-0.4 q1 (right) and q3 (wrong)
    assert (gain["n 0–0.2"], gain["acc 0–0.2"]) == (2, 0.5)
    assert (gain["n 0.2–0.4"], gain["acc 0.2–0.4"]) == (2, 0.5)
    assert gain["n 0.8–1"] == 0 and np.isnan(gain["acc 0.8–1"])
    vote = evaluate.gain_table(analysis).set_index("method").loc["vote"]  # votes a, x (tie), x, c d (tie)
    assert (vote["new"], vote["kept"], vote["lost"], vote["accuracy"]) == (0, 2, 0, 0.5)


def test_sampled_runs_mean_over_samples_with_their_spread(tmp_path):
    """Two samples per question with their own paraphrase indices: accuracy per question is the mean over its
    samples, the spread is the std of the per-sample accuracy, and the vote follows each sample's indices."""
    answers = {"q1": ["x"], "q2": ["x"]}
    _pp(answers, {"q1": ["x", "y", "y"], "q2": ["y", "x", "x"]}).to_feather(tmp_path / "per_prompt.feather")
    rows = _ensemble("avg", 2, answers, {"q1": "x", "q2": "x"})
    rows = pd.concat([rows, rows]).assign(sample_index=[0, 0, 1, 1], prediction=["x", "x", "y", "x"],
                                          paraphrase_indices=[[0, 1], [1, 2], [1, 2], [0, 1]])
    rows.reset_index(drop=True).to_feather(tmp_path / "syncedsample_ensemble_avg-2paras-2samples.feather")
    analysis = evaluate.analyse(tmp_path)
    report = analysis.report.set_index("method")
    assert report.loc["avg[S2]", "partial"] == pytest.approx(0.75)
    assert report.loc["avg[S2]", "sample std"] == pytest.approx(np.std([1.0, 0.5], ddof=1))  # sample 0: 1, sample 1: .5
    assert analysis.scores[("avg[S2]", 2)].to_dict() == {"q1": 0.5, "q2": 1.0}
    # vote: q1 s0 (x, y) -> x, s1 (y, y) -> y; q2 s0 (x, x) -> x, s1 (y, x) -> y
    vote = next(g for g in analysis.groups if g.label == "vote[S2]").rows
    assert sorted(zip(vote["uuid"], vote["sample_index"], vote["prediction"])) == [
        ("q1", 0, "x"), ("q1", 1, "y"), ("q2", 0, "x"), ("q2", 1, "y")]
    gain = evaluate.gain_table(analysis).set_index("method").loc["avg[S2]"]
    assert gain["samples"] == 2 and gain["kept"] == pytest.approx(1.5) and gain["accuracy"] == pytest.approx(0.75)


def test_questions_csv_puts_disagreements_first(tmp_path):
    answers = {u: ["x"] for u in ("q1", "q2", "q3")}
    _pp(answers, {u: ["x", "y"] for u in answers}).to_feather(tmp_path / "per_prompt.feather")
    _ensemble("avg", 2, answers, {"q1": "x", "q2": "x", "q3": "y"}).to_feather(tmp_path / "ensemble_avg-2.feather")
    _ensemble("max", 2, answers, {"q1": "x", "q2": "y", "q3": "y"}).to_feather(tmp_path / "ensemble_max-2.feather")
    assert evaluate.main(["--results-dir", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "questions.csv", keep_default_na=False)
    # avg, max, vote (x on every question: a tie, earliest): q2 avg right, max wrong, vote right -> 1 disagrees
    assert table["uuid"].tolist() == ["q2", "q3", "q1"]
    assert table["methods disagreeing"].tolist() == [1, 1, 0]
    assert table.loc[0, "max N=2"] == "y" and table.loc[0, "max N=2 right"] == 0.0
    assert table.loc[0, "avg N=2 right"] == 1.0 and table.loc[0, "paraphrase"] == "q2 phrased 0"
    assert table.loc[0, "single answers"] == "x | y" and table.loc[0, "answers"] == "x"


def test_report_csv_holds_numbers(results_dir):
    assert evaluate.main(["--results-dir", str(results_dir)]) == 0
    csv = pd.read_csv(results_dir / "report.csv").set_index("method")
    assert "95% CI" not in csv.columns and "vs avg" not in csv.columns
    numeric = ["ci_low", "ci_high", "vs_avg", "vs_avg_low", "vs_avg_high", "vs_vote", "vs_vote_low", "vs_vote_high",
               "vs_mean", "vs_mean_low", "vs_mean_high", "model tokens/question"]
    assert all(pd.api.types.is_float_dtype(csv[c]) for c in numeric)
    flex = csv.loc["flex[bias_none]"]
    assert flex["vs_avg"] == pytest.approx(-0.5) and flex["vs_avg_low"] <= -0.5 <= flex["vs_avg_high"]
    assert flex["ci_low"] <= flex["partial"] <= flex["ci_high"]
    assert np.isnan(csv.loc["avg", "vs_avg"]) and np.isnan(csv.loc["per_prompt", "vs_vote"])
    md = (results_dir / "report.md").read_text()
    assert "| flex[bias_none] | 3 | 2 | 0.500 | 0.500 | [" in md  # the readable strings stay in report.md


def test_short_labels_and_label_map(tmp_path):
    settings = dict(positions="right", attn_backend="flex", fusion_bias="sqrt", fusion_temperature=0.7,
                    fewshot_format="single")
    df = pd.DataFrame([{"method": "flex_attention", **settings}, {"method": "flex_attention", **settings,
                       "positions": "left", "fusion_temperature": 1.0, "fewshot_format": "fused"},
                       {"method": "flex_attention", **settings, "positions": "aligned", "fusion_temperature": 1.0}])
    assert evaluate._labels(df.assign(num_ensemble=3)) == ["flex[right,t0.7]", "flex[fewshot_fused]", "flex_attention"]
    assert evaluate._labels(pd.DataFrame({"method": ["avg"], "num_ensemble": [2], "sample_index": [0],
                                          "paraphrase_indices": [[1, 1]]})) == ["avg[S1,repeat]"]
    answers = {"q1": ["x"]}
    _ensemble("flex_attention", 3, answers, {"q1": "x"}, **{k: [v] for k, v in settings.items()}).to_feather(
        tmp_path / "flex_attention-3-right-t0.7.feather")
    assert evaluate.main(["--results-dir", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| flex[right,t0.7] | flex_attention | right | sqrt | 0.7 | single | flex | first N | 3 |" in md


def _figure(tmp_path, ns):
    """Per_prompt with 5 paraphrases and avg / flex_attention at each N; scores by hand."""
    uuids = [f"q{i}" for i in range(8)]
    answers = {u: ["x"] for u in uuids}
    preds = {u: ["x" if (i + j) % 3 else "y" for j in range(5)] for i, u in enumerate(uuids)}
    scores = {u: [p == "x" for p in v] for u, v in preds.items()}
    _pp(answers, preds, scores).to_feather(tmp_path / "per_prompt.feather")
    for n in ns:
        for method, name in (("avg", f"ensemble_avg-{n}"), ("flex_attention", f"flex_attention-{n}")):
            right = {u: (i + n + len(method)) % 4 != 0 for i, u in enumerate(uuids)}
            _ensemble(method, n, answers, {u: "x" if r else "y" for u, r in right.items()}, right,
                      prompt_tokens=10 * n, decode_tokens=3).to_feather(tmp_path / f"{name}.feather")
    analysis = evaluate.analyse(tmp_path)
    return analysis, {ax.get_label(): ax for ax in evaluate.report_figure(analysis).axes}


def _bar_containers(ax):
    from matplotlib.container import BarContainer
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_figure_with_one_n_draws_bars_with_intervals_and_reference_lines(tmp_path):
    analysis, axes = _figure(tmp_path, [3])
    assert set(axes) == {"accuracy", "cost", "diversity", "split"}
    acc = axes["accuracy"]
    bars = _bar_containers(acc)
    assert len(bars) == 1 and len(bars[0]) == 3 and bars[0].errorbar is not None  # avg, vote, flex_attention
    assert [t.get_text() for t in acc.get_xticklabels()] == ["avg", "vote", "flex_attention"]
    assert [round(b.get_height(), 3) for b in bars[0]] == list(analysis.report.set_index("method").loc[
        ["avg", "vote", "flex_attention"], "partial"].round(3))
    legend = _legend(acc)
    assert any(t.startswith("single prompts: mean") for t in legend) and any("best" in t for t in legend) \
        and any("oracle" in t for t in legend)
    assert acc.get_legend().get_window_extent().x0 >= acc.get_window_extent().x1  # outside the data
    split = axes["split"]
    assert [len(c) for c in _bar_containers(split)] == [3, 3, 3]
    assert [t.split(" ")[0] for t in _legend(split)] == ["kept", "new", "lost"]
    assert all(b.get_height() <= 0 for b in _bar_containers(split)[2])  # lost below zero
    diversity = axes["diversity"]
    assert len(_bar_containers(diversity)) == 3 and _legend(diversity) == ["avg", "vote", "flex_attention"]
    ticks = [t.get_text() for t in diversity.get_xticklabels()]
    assert len(ticks) == evaluate.BINS and all("\nn=" in t for t in ticks)
    counts = [int(t.split("n=")[1]) for t in ticks]
    assert sum(counts) == 8


def test_figure_with_several_n_draws_lines_on_integer_ticks(tmp_path):
    _, axes = _figure(tmp_path, [2, 3, 5])
    acc = axes["accuracy"]
    assert not _bar_containers(acc)
    lines = {line.get_label(): line for line in acc.get_lines()}
    assert {"avg", "vote", "flex_attention", "single prompts: mean (first N)"} <= set(lines)
    assert list(lines["avg"].get_xdata()) == [2, 3, 5]
    assert len(acc.collections) >= 3  # a band per method
    assert list(acc.get_xticks()) == [2, 3, 5] and [t.get_text() for t in acc.get_xticklabels()] == ["2", "3", "5"]
    assert _legend(acc)[:3] == ["avg", "vote", "flex_attention"]


def test_cost_labels_are_short_and_do_not_overlap(tmp_path):
    _, axes = _figure(tmp_path, [2, 3, 4, 5])
    cost = axes["cost"]
    texts = [t for t in cost.texts]
    assert sorted(t.get_text() for t in texts) == ["avg", "flex_attention", "single prompt", "vote"]
    renderer = cost.figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    inside = cost.get_window_extent(renderer)
    assert all(inside.contains(b.x0, b.y0) and inside.contains(b.x1, b.y1) for b in boxes)
    assert cost.get_xlabel() == "tokens run through the model per question"


def test_attention_share_follows_top_and_entropy_panel(tmp_path):
    """q1 attends mostly to paraphrase 2 ("x", equal to the answer), q2 evenly (entropy 1)."""
    answers = {"q1": ["x"], "q2": ["x"]}
    _pp(answers, {"q1": ["y", "x"], "q2": ["x", "y"]}).to_feather(tmp_path / "per_prompt.feather")
    shares = [[[0.1, 0.1, 0.7, 0.1]] * 2, [[0.2, 0.3, 0.3, 0.2]]]
    _ensemble("flex_attention", 2, answers, {"q1": "X.", "q2": "y"}, attention_share=shares).to_feather(
        tmp_path / "flex_attention-2.feather")
    analysis = evaluate.analyse(tmp_path)
    stats = next(g for g in analysis.groups if g.label == "flex_attention").stats.set_index("uuid")
    assert stats.loc["q1", "follows_top"] == 1.0 and stats.loc["q2", "follows_top"] == 0.0  # q2: a tie -> first
    p = np.array([1, 7]) / 8
    assert stats.loc["q1", "share_entropy"] == pytest.approx(-(p * np.log(p)).sum() / np.log(2))
    assert stats.loc["q2", "share_entropy"] == pytest.approx(1.0)
    gain = evaluate.gain_table(analysis).set_index("method")
    assert gain.loc["flex_attention", "follows top share"] == 0.5
    axes = {ax.get_label(): ax for ax in evaluate.report_figure(analysis).axes}
    assert len(_bar_containers(axes["attention"])) == 1
    # absent column: no attention panel, no column
    _ensemble("flex_attention", 2, answers, {"q1": "X.", "q2": "y"}).to_feather(tmp_path / "flex_attention-2.feather")
    analysis = evaluate.analyse(tmp_path)
    assert "follows top share" not in evaluate.gain_table(analysis).columns
    assert "attention" not in {ax.get_label() for ax in evaluate.report_figure(analysis).axes}


def test_every_fusion_setting_that_differs_from_the_defaults_is_in_its_label(tmp_path):
    """isolation none, a beside and its weight name their rows apart from the default's."""
    d = tmp_path / "results"
    d.mkdir()
    _table("flex_attention", 3, ["q1", "q2"], ["Paris", "x"], [1.0, 1.0], [3, 3],
           positions="left", fusion_bias="sqrt").to_feather(d / "flex_attention-3.feather")
    _table("flex_attention", 3, ["q1", "q2"], ["x", "x"], [1.0, 1.0], [3, 3], positions="left",
           fusion_bias="sqrt", isolation="none").to_feather(d / "flex_attention-3-isolation_none.feather")
    _table("flex_attention", 3, ["q1", "q2"], ["Paris", "Jamaican English"], [1.0, 1.0], [3, 3],
           positions="left", fusion_bias="agreement", beside="singles",
           beside_weight=0.5).to_feather(d / "flex_attention-3-bias_agreement-beside_singles_w0.5.feather")
    _table("flex_attention", 3, ["q1", "q2"], ["x", "x"], [1.0, 1.0], [3, 3], positions="left",
           fusion_bias="uniform").to_feather(d / "flex_attention-3-bias_uniform.feather")  # the default until sqrt
    report = evaluate.build_report(d)[0].set_index("method")
    assert set(report.index) == {"flex_attention", "flex[isolation_none]", "flex[bias_agreement,beside_singles,w0.5]",
                                 "flex[bias_uniform]"}
    assert report.loc["flex[bias_agreement,beside_singles,w0.5]", "exact"] == pytest.approx(1.0)
    assert report.loc["flex[isolation_none]", "exact"] == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------- the study

QUESTIONS = [f"q{i:02d}" for i in range(30)]


def _study_set(folder: Path, right: dict[str, set[int]], n: int = 2) -> Path:
    """A dev set of 30 questions at N=2: per_prompt (paraphrase 0 right where `right` says, paraphrase 1 never),
    avg, the default fusion, flex[right] and the default's repeat control, each right where `right` says."""
    folder.mkdir(parents=True)
    answers = {u: ["x"] for u in QUESTIONS}
    singles = right.pop("per_prompt")
    _pp(answers, {u: ["x" if i in singles else "y", "y"] for i, u in enumerate(QUESTIONS)},
        {u: [i in singles, False] for i, u in enumerate(QUESTIONS)}).to_feather(folder / "per_prompt.feather")
    tables = {"ensemble_avg-2": ("avg", "avg", {}), "flex_attention-2": ("flex_attention", "flex_attention", {}),
              "flex_attention-2-right": ("flex[right]", "flex_attention", {"positions": "right"}),
              "syncedsample_flex_attention-2paras-1samples-repeat": (
                  "flex[S1,repeat]", "flex_attention", {"sample_index": 0, "paraphrase_indices": [[0, 0]] * 30})}
    for name, (label, method, extra) in tables.items():
        if label not in right:
            continue
        hits = {u: i in right[label] for i, u in enumerate(QUESTIONS)}
        _ensemble(method, n, answers, {u: "x" if r else "y" for u, r in hits.items()}, hits,
                  **extra).to_feather(folder / f"{name}.feather")
    return folder


def both_sets(tmp_path: Path) -> tuple[Path, Path]:
    """Set A: flex[right] right on q0-q19 where the default has q0-q4 (b 15, c 0); avg as the default; the default's
    repeat control right on q0-q1. Set B: flex[right] and the default alike (q0-q4)."""
    a = _study_set(tmp_path / "set_a" / "confirm", {"per_prompt": set(range(3)), "avg": set(range(5)),
                                                    "flex_attention": set(range(5)), "flex[right]": set(range(20)),
                                                    "flex[S1,repeat]": {0, 1}})
    b = _study_set(tmp_path / "set_b" / "confirm", {"per_prompt": set(range(3)), "avg": set(range(4)),
                                                    "flex_attention": set(range(5)), "flex[right]": set(range(5))})
    return a, b


def test_the_study_reports_discordant_counts_exact_tests_holm_and_the_diversity_gain(tmp_path):
    from significance import holm, mcnemar_exact
    a, b = both_sets(tmp_path)
    out = tmp_path / "study"
    assert evaluate.main(["--study", str(a), str(b), "--output-dir", str(out), "--metric", "exact"]) == 0
    rows = pd.read_csv(out / "study.csv").set_index(["dataset", "method"])
    right = rows.loc[("set_a", "flex[right]")]
    assert right["vs_default"] == pytest.approx(0.5) and right["b, c"] == "15, 0" and right["verdict"] == "better"
    assert right["p"] == pytest.approx(mcnemar_exact(15, 0), rel=0.01)  # 3 significant digits
    raw = {key: rows.loc[key, "p"] for key in rows.index if not pd.isna(rows.loc[key, "p"])}
    corrected = dict(zip(raw, holm(list(raw.values()))))  # Holm over every comparison with the default, both sets
    assert all(rows.loc[k, "p (Holm)"] == pytest.approx(p, rel=0.01) for k, p in corrected.items())
    assert rows.loc[("set_a", "avg"), "verdict"] == "not separated" and "(few)" in rows.loc[("set_a", "avg"), "b, c"]
    assert rows.loc[("set_b", "flex[right]"), "verdict"] == "not separated"
    default = rows.loc[("set_a", "flex_attention")]
    assert default["diversity_gain"] == pytest.approx(0.1) and default["b, c control"] == "3, 0 (few)"
    text = (out / "study.md").read_text()
    assert text.startswith("# The study: ") and "confirm half" in text and "## set_a" in text
    assert "| better on set_a; not separated on set_b |" in text  # what held on all


def test_the_pick_is_the_best_variant_on_average_only_if_it_beats_the_default(tmp_path):
    import json

    import sweep
    from fusion import FusionSettings
    a = _study_set(tmp_path / "a" / "choose", {"per_prompt": set(), "flex_attention": set(range(5)),
                                               "flex[right]": set(range(9))})
    b = _study_set(tmp_path / "b" / "choose", {"per_prompt": set(), "flex_attention": set(range(5)),
                                               "flex[right]": set(range(3))})
    assert evaluate.main(["--choose", str(a), str(b), "--output-dir", str(tmp_path), "--metric", "exact"]) == 0
    pick = json.loads((tmp_path / "pick.json").read_text())
    assert pick["pick"] == "flex[right]" and pick["settings"]["positions"] == "right" and pick["sets"] == ["a", "b"]
    assert pick["candidates"]["flex[right]"]["mean"] == pytest.approx(0.2)  # (9 + 3) / 2 / 30 > 5 / 30
    assert sweep.read_pick(str(tmp_path / "pick.json"), FusionSettings()) == FusionSettings(positions="right")
    worse = _study_set(tmp_path / "c" / "choose", {"per_prompt": set(), "flex_attention": set(range(5)),
                                                   "flex[right]": set(range(4))})
    assert evaluate.pick_default([worse], "exact")["pick"] == "flex_attention"  # no variant beat it: it stays


def test_the_study_figure_names_what_it_shows_and_flags_few_discordant_questions(tmp_path):
    a, b = both_sets(tmp_path)
    evaluate.write_study([a, b], tmp_path / "out", "exact")
    assert (tmp_path / "out" / "study.png").stat().st_size > 10_000 and (tmp_path / "out" / "study.pdf").exists()
    tables = {name: evaluate.study_rows(evaluate.analyse(d, "exact")) for name, d in (("set_a", a), ("set_b", b))}
    fig = evaluate.study_figure(tables, "a model, N=2, exact match, confirm halves")
    left, right = fig.axes
    assert fig._suptitle.get_text().startswith("a model, N=2, exact match, confirm halves\nb:c = discordant")
    labels = [t.get_text() for t in left.get_yticklabels()]
    assert labels[-1] == "flex[right]" and "flex_attention (the default)" in labels
    bars = [c for c in left.containers]  # set_a's flex[right] (15 discordant) is drawn with its interval...
    assert any(50.0 in list(c.lines[0].get_xdata()) for c in bars)
    hollow = [line for line in left.lines if line.get_markerfacecolor() == "none"]
    assert hollow  # ...avg's and set_b's, on fewer than 10 discordant questions, hollow without a bar
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["set_a", "set_b"]


def test_the_study_needs_an_output_dir_and_distinct_set_names(tmp_path, capsys):
    a, _ = both_sets(tmp_path)
    assert evaluate.main(["--study", str(a)]) == 2
    assert "--output-dir" in capsys.readouterr().err
    twin = tmp_path / "other" / "set_a"
    twin.parent.mkdir()
    twin.symlink_to(a.parent)
    assert evaluate.main(["--study", str(a), str(twin), "--output-dir", str(tmp_path / "o")]) == 2
    assert "distinct" in capsys.readouterr().err and not (tmp_path / "o").exists()
