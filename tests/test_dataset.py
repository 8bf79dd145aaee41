"""Loaders on their fixtures, prompt building, and every bad input as one line with exit code 2."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import run_main
from constants import MYRIADLAMA_FIXTURE_FILE, QA_INSTRUCTION, WEBQA_BUNDLED_DIR, InputError
from dataset import load_dataset_by_name

BUNDLED_WEBQ = WEBQA_BUNDLED_DIR / "test.json"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def rows(n: int, paraphrases: int = 3, train: bool = False) -> list[dict]:
    out = [{"uuid": f"t{i}", "paraphrases": [f"train q {i}?"], "answers": [f"a{i}"], "split": "train"}
           for i in range(5)] if train else []
    return out + [{"uuid": f"u{i}", "paraphrases": [f"question {i} form {j}?" for j in range(paraphrases)],
                   "answers": [f"answer {i}"]} for i in range(n)]


def test_bundled_webqa_sample():
    ds = load_dataset_by_name("webqa_sample", num_paraphrases=6)
    assert len(ds.records) == 100 and len(ds.few_shot) == 5
    assert all(len(r.paraphrases) == 6 and len(set(r.paraphrases)) == 6 for r in ds.records)
    original = json.loads(BUNDLED_WEBQ.read_text())[0]  # the first paraphrase is WebQuestions' own question
    assert ds.records[0].paraphrases[0] == original["qText"] and ds.records[0].answers == original["answers"]


def test_qa_prompt_parts_and_full_prompt():
    ds = load_dataset_by_name("webqa_sample", num_paraphrases=2, limit=1)
    parts = ds.prompt_parts(ds.records[0], 2)
    assert parts.prefix.startswith(QA_INSTRUCTION) and parts.prefix.count("\nA: ") == 5
    assert parts.segments == [f"Q: {p}" for p in ds.records[0].paraphrases[:2]]
    assert parts.full(1) == parts.prefix + f"Q: {ds.records[0].paraphrases[1]}\nA:"


def test_myriadlama_fixture_groups_facts_into_cloze_prompts():
    ds = load_dataset_by_name("myriadlama", str(MYRIADLAMA_FIXTURE_FILE), num_paraphrases=5)
    facts = {json.loads(line)["uuid"] for line in MYRIADLAMA_FIXTURE_FILE.read_text().splitlines()}
    assert len(ds.records) == len(facts) - 5 and len(ds.few_shot) == 5
    test_sentences = {p for r in ds.records for p in r.paraphrases}
    assert not test_sentences & {q for q, _ in ds.few_shot}  # few-shot facts are not test facts
    rows_by_fact = {}
    for line in MYRIADLAMA_FIXTURE_FILE.read_text().splitlines():
        row = json.loads(line)
        rows_by_fact.setdefault(row["uuid"], []).append(row)
    for record in ds.records:
        fact = rows_by_fact[record.uuid]
        manual = [r["template"].replace("[X]", r["sub_ent"]).replace("[Y]", "[MASK]") for r in fact if r["is_manual"]]
        assert record.paraphrases[:5] == manual  # the 5 manual templates come first
        assert len(record.paraphrases) == len(fact) and all("[MASK]" in p for p in record.paraphrases)
        assert set(fact[0]["obj_aliases"]) <= set(record.answers)
    assert ds.prompt_parts(ds.records[0], 1).prefix.startswith("Predict the [MASK]")
    again = load_dataset_by_name("myriadlama", str(MYRIADLAMA_FIXTURE_FILE), num_paraphrases=5)
    assert [r.paraphrases for r in again.records] == [r.paraphrases for r in ds.records]  # seeded


def test_jsonl_few_shot_from_train_rows_or_first_five(tmp_path, caplog):
    with_train = load_dataset_by_name("jsonl", str(write_jsonl(tmp_path / "a.jsonl", rows(3, train=True))))
    assert [r.uuid for r in with_train.records] == ["u0", "u1", "u2"] and with_train.few_shot[0] == ("train q 0?", "a0")
    without = load_dataset_by_name("jsonl", str(write_jsonl(tmp_path / "b.jsonl", rows(7))))
    assert [r.uuid for r in without.records] == ["u5", "u6"] and len(without.few_shot) == 5
    assert "first 5 rows" in caplog.text


def test_webqa_from_the_local_copy_without_paraphrasing():
    ds = load_dataset_by_name("webqa", str(BUNDLED_WEBQ), num_paraphrases=1, limit=3)
    questions = [r["qText"] for r in json.loads(BUNDLED_WEBQ.read_text())[:3]]
    assert [r.uuid for r in ds.records] == [hashlib.md5(q.encode()).hexdigest() for q in questions]  # upstream's uuid
    assert len(ds.few_shot) == 5


BAD_INPUTS = {
    "missing file": (["--data-file", "nope.jsonl"], "not found"),
    "malformed line": (["--data-file", "{bad}"], ":3: malformed JSON"),
    "empty paraphrases": (["--data-file", "{empty}"], "'paraphrases' must be a non-empty list"),
    "too few paraphrases": (["--data-file", "{few}", "--num_ensemble", "4"], "fewer than the 4 asked for"),
    "duplicate uuid": (["--data-file", "{dup}"], "duplicate uuid"),
    "unknown dataset": (["--dataset", "nosuch"], "invalid choice"),
    "unknown model": (["--data-file", "{good}", "--num_ensemble", "3", "--model", "no-such-model"], "not a model key"),
    "prompt longer than the context": (["--data-file", "{long}", "--num_ensemble", "3"], "more than the model's context of 2048"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, case):
    good = rows(3, train=True)
    files = {
        "good": write_jsonl(tmp_path / "good.jsonl", good),
        "bad": write_jsonl(tmp_path / "bad.jsonl", [good[0], good[1], "{not json"]),
        "empty": write_jsonl(tmp_path / "empty.jsonl", good[:5] + [{"uuid": "x", "paraphrases": [], "answers": []}]),
        "few": write_jsonl(tmp_path / "few.jsonl", good),
        "dup": write_jsonl(tmp_path / "dup.jsonl", good + [good[-1]]),
        "long": write_jsonl(tmp_path / "long.jsonl", good + [{"uuid": "L", "paraphrases": ["why? " * 500] * 3,
                                                              "answers": ["x"]}]),
    }
    args, expected = BAD_INPUTS[case]
    args = [a.format(**files) for a in args]
    out = tmp_path / "out"
    cmd = ["--dataset", "jsonl", "--model", "tiny-llama", "--output-dir", str(out), *args]
    if "--dataset" in args:
        cmd = ["--model", "tiny-llama", "--output-dir", str(out), *args]
    proc = run_main("generate.py", *cmd)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert expected in last and (case == "unknown dataset" or last.startswith("error: "))
    assert not out.exists()


def test_input_error_names_the_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", rows(2, train=True) + ["[1, 2]"])
    with pytest.raises(InputError, match=rf"{path}:8: expected a JSON object"):
        load_dataset_by_name("jsonl", str(path))


def test_prompt_parts_refuse_more_paraphrases_than_stored():
    ds = load_dataset_by_name("webqa_sample", num_paraphrases=6, limit=1)
    assert len(ds.prompt_parts(ds.records[0], 6).segments) == 6
    with pytest.raises(InputError, match="has 6 paraphrases, fewer than the 7 asked for"):
        ds.prompt_parts(ds.records[0], 7)
