"""The study's halves (issue 35): the WebQuestions dev set's "half" field is what dataset.assign_halves gives
(stratified by the question's first word, seeded), and --half keeps one half's questions and every few-shot row."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from constants import DATA_DIR, InputError
from dataset import assign_halves, load_dataset_by_name, question_stratum

DEV = DATA_DIR / "webqa_dev.jsonl"


def dev_rows() -> list[dict]:
    return [json.loads(line) for line in DEV.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_the_dev_halves_are_rebuilt_from_their_rule():
    questions = [r for r in dev_rows() if r.get("split") != "train"]
    strata: dict[str, list[str]] = {}
    for r in questions:
        strata.setdefault(question_stratum(r["paraphrases"][0]), []).append(r["uuid"])
    assert {r["uuid"]: r["half"] for r in questions} == assign_halves(strata, seed=0)
    per_stratum = Counter((question_stratum(r["paraphrases"][0]), r["half"]) for r in questions)
    for stratum in strata:  # balanced within every stratum
        assert abs(per_stratum[stratum, "choose"] - per_stratum[stratum, "confirm"]) <= 1
    assert Counter(r["half"] for r in questions) == {"choose": 151, "confirm": 149}


def test_assign_halves_alternates_a_seeded_shuffle_within_each_stratum():
    halves = assign_halves({"b": ["b1", "b2", "b3"], "a": ["a2", "a1"]}, seed=3)
    assert sorted(halves) == ["a1", "a2", "b1", "b2", "b3"]
    assert Counter(v for k, v in halves.items() if k.startswith("a")) == {"choose": 1, "confirm": 1}
    assert Counter(v for k, v in halves.items() if k.startswith("b")) == {"choose": 2, "confirm": 1}
    assert assign_halves({"a": ["a1", "a2"], "b": ["b3", "b2", "b1"]}, seed=3) == halves  # input order ignored
    assert question_stratum("Who wrote it?") == "who" and question_stratum("name the capital") == "other"


def test_half_keeps_one_half_and_the_shared_few_shot_examples(tmp_path):
    choose = load_dataset_by_name("jsonl", str(DEV), half="choose")
    confirm = load_dataset_by_name("jsonl", str(DEV), half="confirm")
    everything = load_dataset_by_name("jsonl", str(DEV))
    assert len(choose.records) == 151 and len(confirm.records) == 149
    assert not {r.uuid for r in choose.records} & {r.uuid for r in confirm.records}
    assert {r.uuid for r in choose.records} | {r.uuid for r in confirm.records} == {r.uuid for r in everything.records}
    assert choose.few_shot == confirm.few_shot == everything.few_shot
    no_half = tmp_path / "d.jsonl"
    no_half.write_text("".join(json.dumps(r) + "\n" for r in [*dev_rows()[:6], {**dev_rows()[6], "half": "other"}]))
    with pytest.raises(InputError, match=r"d.jsonl:7: no 'half' \(choose or confirm\) for --half choose"):
        load_dataset_by_name("jsonl", str(no_half), half="choose")
    with pytest.raises(InputError, match="--half 'both': choose one of choose, confirm"):
        load_dataset_by_name("jsonl", str(DEV), half="both")
    with pytest.raises(InputError, match="--half choose: applies to --dataset jsonl"):
        load_dataset_by_name("webqa_sample", half="choose")
