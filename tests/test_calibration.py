"""Calibration: every row's answer_logprob / token_logprobs / confidence equal a recomputation from the model's
logits (the single prompt's, the fused distribution's, the fused row's), the vote's confidence is its share, and
evaluate.py's ECE (equal-mass bins), AUROC and Brier equal small cases worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import evaluate
from conftest import cached_tiny
from decoding import LanguageModel, StopRule, fused_row, single_rows
from fusion import FusionSettings
from methods import answer_ensemble, answer_fused, answer_per_prompt
from segment_mask import FUSED_SEGMENT, SegmentMask, segment_biases

MAX_NEW = 4


def no_stop() -> StopRule:
    return StopRule(set(), MAX_NEW, first_line_only=False)


def last_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of the model's last logits for `ids`, the whole sequence run at once (no KV cache)."""
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)


def assert_fields(row: dict, expected: list[float]) -> None:
    assert row["token_logprobs"] == pytest.approx(expected, abs=1e-4)
    assert row["answer_logprob"] == pytest.approx(sum(expected), abs=1e-4)
    assert row["confidence"] == pytest.approx(math.exp(row["answer_logprob"]), rel=1e-9)
    assert 0 <= row["confidence"] <= 1 and len(row["token_logprobs"]) == len(row["token_ids"])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_single_prompts_fields_are_its_tokens_log_probabilities(small_dataset, family):
    model, tokenizer = cached_tiny(family)
    rows = answer_per_prompt(LanguageModel(model, tokenizer), small_dataset, small_dataset.records[:2], 3, no_stop(),
                             "per_prompt")[0]
    for j, row in enumerate(rows):
        record, i = small_dataset.records[j // 3], j % 3
        prompt = single_rows(tokenizer, small_dataset.prompt_parts(record, 3), [i])[0].input_ids
        tokens = list(row["token_ids"])
        assert_fields(row, [float(last_logprobs(model, prompt + tokens[:t])[tokens[t]]) for t in range(len(tokens))])


# the fused distribution of N rows' log-probabilities [N, V], written out per rule
FUSED = {
    "avg": lambda lp, w: torch.log_softmax(lp.mean(0), -1),
    "avg_prob": lambda lp, w: torch.log(lp.exp().mean(0)),
    "max": lambda lp, w: torch.log(lp.exp().max(0).values / lp.exp().max(0).values.sum()),
    "weighted_avg": lambda lp, w: torch.log_softmax((w[:, None] * lp).sum(0), -1),
    "weighted_max": lambda lp, w: lp[int(w.argmax())],
}


@pytest.mark.parametrize("method", list(FUSED))
def test_a_logit_ensembles_fields_are_its_fused_distributions(small_dataset, method):
    model, tokenizer = cached_tiny("llama")
    record = small_dataset.records[0]
    weights = [0.2, 0.5, 0.3]
    conf = {record.uuid: weights} if method.startswith("weighted") else None
    row = answer_ensemble(LanguageModel(model, tokenizer), small_dataset, [record], 3, no_stop(), method, conf)[0][0]
    prompts = [r.input_ids for r in single_rows(tokenizer, small_dataset.prompt_parts(record, 3), [0, 1, 2])]
    tokens = list(row["token_ids"])
    expected = []
    for t in range(len(tokens)):
        rows = torch.stack([last_logprobs(model, p + tokens[:t]) for p in prompts])
        fused = FUSED[method](rows, torch.tensor(weights))
        assert int(fused.argmax()) == tokens[t]  # the distribution that chose the token
        expected.append(float(fused[tokens[t]]))
    assert_fields(row, expected)


def test_attention_fusions_fields_are_its_fused_rows_distribution(small_dataset):
    """The fused row re-run whole at every step under its mask (the default sqrt bias), as test_flex does."""
    model, tokenizer = cached_tiny("llama")
    record = small_dataset.records[1]
    row = answer_fused(LanguageModel(model, tokenizer), small_dataset, [record], 3, no_stop())[0][0]
    fused = fused_row(tokenizer, small_dataset.prompt_parts(record, 3))
    settings, biases = FusionSettings(), torch.tensor([segment_biases(3, "sqrt")])
    tokens, expected, next_pos = list(row["token_ids"]), [], max(fused.position_ids) + 1
    for t in range(len(tokens)):
        ids = torch.tensor([fused.input_ids + tokens[:t]])
        pos = torch.tensor([fused.position_ids + list(range(next_pos, next_pos + t))])
        seg = torch.tensor([fused.segment_ids + [FUSED_SEGMENT] * t])
        mask = SegmentMask(seg, 0, settings, biases, paraphrases=3, positions=pos)
        with torch.inference_mode(), mask.attention(model):
            logits = model(input_ids=ids, position_ids=pos, **mask.prefill()).logits[0, -1].float()
        expected.append(float(torch.log_softmax(logits, -1)[tokens[t]]))
    assert_fields(row, expected)


def test_the_votes_confidence_is_its_share():
    keys = ["paris", "lyon", "paris", "", "rome"]
    per_prompt = pd.DataFrame({"uuid": ["q"] * 5, "paraphrase_index": range(5), "answers": [["Paris"]] * 5,
                               "prediction": ["Paris", "Lyon", "paris!", "", "Rome"], "key": keys,
                               "answer_logprob": [-1.0, -2.0, -3.0, -4.0, -5.0]})
    rows = pd.DataFrame({"uuid": ["q"], "answers": [["Paris"]], "paraphrase_indices": [[0, 1, 2, 3, 4]]})
    vote = evaluate.vote_table(rows, evaluate.singles(rows, per_prompt, 5), 5).iloc[0]
    assert (vote["prediction"], vote["confidence"], vote["answer_logprob"]) == ("Paris", 0.4, -1.0)


# ---------------------------------------------------------------- the scores, by hand

# sorted: 0.2 (wrong), 0.3 (wrong) | 0.6 (right), 0.7 (wrong) | 0.8 (right), 0.9 (right): 3 bins of 2
CONF = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2])
RIGHT = np.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])


def test_ece_over_equal_mass_bins_by_hand():
    # bins: |0 - 0.25| , |0.5 - 0.65| , |1 - 0.85|, each 2 rows of 6
    assert evaluate.ece(CONF, RIGHT, bins=3) == pytest.approx((2 * 0.25 + 2 * 0.15 + 2 * 0.15) / 6)
    assert evaluate.ece(CONF, RIGHT, bins=1) == pytest.approx(abs(0.5 - CONF.mean()))  # one bin: the means
    assert evaluate.ece(np.array([0.0, 1.0]), np.array([0.0, 1.0])) == 0.0  # perfectly calibrated
    # ties share a bin: two rows at 0.5 (one right) are one bin, whatever their order
    assert list(evaluate.calibration_bins(np.array([0.2, 0.5, 0.5, 0.9]), bins=2)) == [0, 0, 0, 1]
    assert evaluate.ece(np.array([0.5, 0.5, 0.2, 0.9]), np.array([1.0, 0.0, 0.0, 1.0]), bins=2) == pytest.approx(
        (abs(1 / 3 - 0.4) * 3 + abs(1 - 0.9)) / 4)
    assert evaluate.CALIBRATION_BINS == 10
    assert sorted(np.bincount(evaluate.calibration_bins(np.linspace(0, 1, 20)))) == [2] * 10


def test_auroc_and_brier_by_hand():
    # right rows 0.9, 0.8, 0.6 against wrong 0.7, 0.3, 0.2: 8 of 9 pairs ordered right
    assert evaluate.auroc(CONF, RIGHT) == pytest.approx(8 / 9)
    assert evaluate.auroc(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == 0.5  # a tie counts half
    assert evaluate.auroc(1 - CONF, RIGHT) == pytest.approx(1 / 9)
    assert math.isnan(evaluate.auroc(CONF, np.ones(6)))  # no wrong row: undefined
    assert evaluate.brier(CONF, RIGHT) == pytest.approx((0.01 + 0.04 + 0.49 + 0.16 + 0.09 + 0.04) / 6)


def test_the_intervals_resample_questions_with_all_their_rows():
    """Per question several rows (per_prompt): a draw takes every row of each question it picks."""
    uuids = np.array(["a", "b", "a", "c", "b", "a"])
    for draw in list(evaluate.cluster_draws(uuids))[:50]:
        picked = pd.Series(uuids[draw]).value_counts()
        assert all(count % {"a": 3, "b": 2, "c": 1}[u] == 0 for u, count in picked.items())
    rows = pd.DataFrame({"uuid": uuids, "confidence": CONF, "partial": RIGHT.astype(bool)})
    scores = evaluate.calibration(rows, "partial")
    assert scores["Brier"][0] == pytest.approx(evaluate.brier(CONF, RIGHT))
    assert all(lo <= value <= hi for value, lo, hi in scores.values())
    assert evaluate.calibration(rows.drop(columns="confidence"), "partial") == dict.fromkeys(evaluate.CALIBRATION)


# ---------------------------------------------------------------- in the report


def table(method: str, n: int, uuids, predictions, confidence, **extra) -> pd.DataFrame:
    answers = {"q1": ["Paris"], "q2": ["Rome"], "q3": ["Oslo"], "q4": ["Lima"]}
    return pd.DataFrame({"uuid": uuids, "answers": [answers[u] for u in uuids], "prediction": predictions,
                         "seconds": 1.0, "new_tokens": 2, "method": method, "num_ensemble": n,
                         "paraphrase_index": extra.pop("paraphrase_index", [-1] * len(uuids)),
                         "confidence": confidence, "prompt_tokens": 10, "decode_tokens": 3, **extra})


def write_results(d):
    d.mkdir()
    uuids = [u for u in ("q1", "q2", "q3", "q4") for _ in range(2)]
    table("per_prompt", 2, uuids, ["Paris", "Lyon", "Rome", "Rome", "Bergen", "Oslo", "Quito", "Cusco"],
          [0.9, 0.2, 0.8, 0.7, 0.3, 0.6, 0.1, 0.4], paraphrase_index=[0, 1] * 4,
          answer_logprob=np.log([0.9, 0.2, 0.8, 0.7, 0.3, 0.6, 0.1, 0.4])).to_feather(d / "per_prompt.feather")
    table("avg", 2, ["q1", "q2", "q3", "q4"], ["Paris", "Rome", "Oslo", "Quito"], [0.8, 0.9, 0.4, 0.3],
          paraphrase_indices=[[0, 1]] * 4).to_feather(d / "ensemble_avg-2.feather")
    table("self_consistency", 2, ["q1", "q2", "q3", "q4"], ["Paris", "Rome", "Bergen", "Cusco"], [1.0, 1.0, 0.5, 0.5],
          paraphrase_indices=[[0]] * 4, sc_samples=2, sc_temperature=0.7, sc_top_p=1.0, sc_prompts="first",
          prompt_tokens=20, decode_tokens=6).to_feather(d / "ensemble_self_consistency-2.feather")
    return d


def test_the_report_has_calibration_and_self_consistency_beside_the_vote(tmp_path):
    analysis = evaluate.analyse(write_results(tmp_path / "r"), "partial")
    report = analysis.report.set_index("method")
    assert list(report.index) == ["per_prompt", "avg", "self_consistency", "vote"]
    pp = report.loc["per_prompt"]
    conf, right = np.array([0.9, 0.2, 0.8, 0.7, 0.3, 0.6, 0.1, 0.4]), np.array([1, 0, 1, 1, 0, 1, 0, 0.0])
    assert (pp["ece"], pp["auroc"], pp["brier"]) == pytest.approx((evaluate.ece(conf, right), 1.0,
                                                                   evaluate.brier(conf, right)))
    assert pp["ECE"] == f"{pp['ece']:.3f} [{pp['ece_low']:.3f}, {pp['ece_high']:.3f}]"
    vote = report.loc["vote"]  # per question the 2 singles: q1 1-1 (Paris), q2 2-0, q3 1-1 (Bergen), q4 1-1 (Quito)
    assert vote["brier"] == pytest.approx(((0.5 - 1) ** 2 + 0 + 0.5 ** 2 + 0.5 ** 2) / 4)
    sc = report.loc["self_consistency"]
    assert sc["partial"] == 0.5 and sc["vs vote"] != "" and sc["vs_vote"] == pytest.approx(0.5 - 0.5)
    assert sc["model tokens/question"] == vote["model tokens/question"] == 26  # matched: 2 decodes each
    assert sc["brier"] == pytest.approx((0 + 0 + 0.25 + 0.25) / 4)
    assert report.loc["avg", "auroc"] == 1.0  # its three right rows (0.8, 0.9, 0.4) above its wrong one (0.3)
    csv_columns = set(evaluate.CSV_COLUMNS)
    assert {"ece", "ece_low", "auroc_high", "brier"} <= csv_columns and "ECE" not in csv_columns


def test_labels_name_self_consistencys_settings(tmp_path):
    d = write_results(tmp_path / "r")
    table("self_consistency", 2, ["q1"], ["Paris"], [1.0], paraphrase_indices=[[0, 1, 0]], sc_samples=3,
          sc_temperature=0.5, sc_top_p=0.9, sc_prompts="each").to_feather(d / "ensemble_self_consistency-2-k3.feather")
    labels = list(evaluate.analyse(d, "partial").report["method"])
    assert "sc[each,t0.5,p0.9,k3]" in labels and "self_consistency" in labels


def test_the_reliability_diagram(tmp_path):
    d = write_results(tmp_path / "r")
    analysis = evaluate.analyse(d, "partial")
    ax = evaluate.reliability_figure(analysis).axes[0]
    names = [line.get_label() for line in ax.get_lines()]
    assert names[0] == "perfect calibration"
    assert {n.split(":")[0] for n in names[1:]} == {"per_prompt", "avg", "self_consistency", "vote"}
    assert ax.get_xlabel().startswith("confidence") and ax.get_legend() is not None
    out = tmp_path / "out"
    out.mkdir()
    evaluate.write_report(analysis, out, d)
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "reliability.pdf").read_bytes()[:5] == b"%PDF-"
