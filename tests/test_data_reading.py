"""Reading the user's data (issue 24): lines end at "\\n" only, bad Unicode, deep nesting and odd uuids are one
InputError naming file:line, --task mask needs the [MASK] placeholder, --num-fewshot K (0 allowed)."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from constants import MYRIADLAMA_FIXTURE_FILE, NUM_FEW_SHOT, QA_INSTRUCTION, WEBQA_BUNDLED_DIR, InputError
from dataset import load_dataset_by_name, read_jsonl, upstream_few_shot

# every character str.splitlines ends a line at, besides "\n"
LINE_SEPARATORS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r"]


def question(i: int, text: str = "question", n: int = 3) -> dict:
    return {"uuid": f"q{i}", "paraphrases": [f"{text} {i} form {j}?" for j in range(n)], "answers": [f"a{i}"]}


def shots(k: int = 5) -> list[dict]:
    return [{"uuid": f"t{i}", "paraphrases": [f"shot {i}?"], "answers": [f"s{i}"], "split": "train"} for i in range(k)]


def write(path: Path, *rows, ensure_ascii: bool = False) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=ensure_ascii)) + "\n"
                            for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("ensure_ascii", [False, True], ids=["raw", "escaped"])
@pytest.mark.parametrize("sep", LINE_SEPARATORS, ids=[f"U+{ord(c):04X}" for c in LINE_SEPARATORS])
def test_line_separators_inside_a_paraphrase_are_data(tmp_path, sep, ensure_ascii):
    rows = [question(i) for i in range(3)]
    rows[1]["paraphrases"][1] = f"before{sep}after?"
    path = write(tmp_path / "d.jsonl", *shots(), *rows, ensure_ascii=ensure_ascii)
    if not ensure_ascii:  # json.dumps escapes control characters; U+2028, U+2029, U+0085 are written raw
        assert (sep in path.read_text(encoding="utf-8")) == (sep in "\u2028\u2029\x85")
    assert [lineno for lineno, _ in read_jsonl(path)] == list(range(1, 9))
    ds = load_dataset_by_name("jsonl", str(path), num_paraphrases=3)
    assert [r.uuid for r in ds.records] == ["q0", "q1", "q2"]
    assert ds.records[1].paraphrases[1] == f"before{sep}after?"


def test_a_raw_control_character_in_a_string_is_still_malformed_json(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"uuid": "q1", "paraphrases": ["a\x0cb?"], "answers": ["a"]}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"d.jsonl:1: malformed JSON \(Invalid control character"):
        read_jsonl(path)


def test_windows_line_ends_and_blank_lines_are_read(tmp_path):
    path = tmp_path / "d.jsonl"
    text = "\r\n".join(json.dumps(r) for r in [*shots(), question(0)]) + "\r\n\r\n  \n"
    path.write_bytes(text.encode())
    assert len(read_jsonl(path)) == 6
    assert load_dataset_by_name("jsonl", str(path)).records[0].uuid == "q0"


@pytest.mark.parametrize("text, message", [
    ('{"uuid": "q9", "paraphrases": ["bad \\ud800 here?"], "answers": ["a"]}', ":7: invalid Unicode (lone surrogate)"),
    ('{"uuid": "q9", "paraphrases": ["ok?"], "answers": ["\\udfff"]}', ":7: invalid Unicode (lone surrogate)"),
    ('{"uuid": "q9", "paraphrases": ["ok?"], "answers": ["a"], "x": {"\\ud83d": 1}}', ":7: invalid Unicode"),
    ("[" * 100_000 + "]" * 100_000, ":7: nested too deeply"),
    ('{"uuid": "q9", "paraphrases": ["ok?"], "answers": ["a"], "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
     ":7: nested too deeply"),
])
def test_bad_unicode_and_deep_nesting_name_the_line(tmp_path, text, message):
    path = write(tmp_path / "d.jsonl", *shots(), question(0), text)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        load_dataset_by_name("jsonl", str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_surrogate_pair_is_one_character_not_an_error(tmp_path):
    row = {"uuid": "q9", "paraphrases": ["smile \U0001F600?"], "answers": ["a"]}
    path = write(tmp_path / "d.jsonl", *shots(), row, ensure_ascii=True)
    assert "\\ud83d\\ude00" in path.read_text()
    assert load_dataset_by_name("jsonl", str(path)).records[0].paraphrases == ["smile \U0001F600?"]


def test_a_lone_surrogate_in_a_webquestions_file_names_its_row(tmp_path):
    path = tmp_path / "test.json"
    path.write_text('[{"qId": "WebQTest-0", "qText": "who \\udc00 is?", "answers": ["x"]}]', encoding="utf-8")
    with pytest.raises(InputError, match=r"test.json: row 1: invalid Unicode \(lone surrogate\)"):
        load_dataset_by_name("webqa", str(path))
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(InputError, match="test.json: nested too deeply"):
        load_dataset_by_name("webqa", str(path))


@pytest.mark.parametrize("uuid", [True, False, [1, 2], {"a": 1}, 1.5, 2.0, "", "   ", "\t\n"],
                         ids=["true", "false", "list", "dict", "float", "whole-float", "empty", "blank", "whitespace"])
def test_uuids_must_be_non_blank_strings_or_integers(tmp_path, uuid):
    path = write(tmp_path / "d.jsonl", *shots(), question(0), {**question(1), "uuid": uuid})
    with pytest.raises(InputError, match=r"d.jsonl:7: 'uuid' must be a non-blank string or an integer"):
        load_dataset_by_name("jsonl", str(path))


def test_integer_and_string_uuids_are_kept_as_strings(tmp_path):
    path = write(tmp_path / "d.jsonl", *shots(), {**question(0), "uuid": 7}, {**question(1), "uuid": " x "})
    assert [r.uuid for r in load_dataset_by_name("jsonl", str(path)).records] == ["7", " x "]
    with pytest.raises(InputError, match=r":6: missing 'uuid'"):
        load_dataset_by_name("jsonl", str(write(tmp_path / "e.jsonl", *shots(), {**question(0), "uuid": None})))


def test_myriadlama_uuids_are_checked_too(tmp_path):
    rows = [json.loads(line) for line in MYRIADLAMA_FIXTURE_FILE.read_text().split("\n") if line.strip()]
    rows[3]["uuid"] = True
    path = write(tmp_path / "m.jsonl", *rows)
    with pytest.raises(InputError, match=r"row 4: 'uuid' must be a non-blank string or an integer, got True"):
        load_dataset_by_name("myriadlama", str(path))


def mask_question(i: int) -> dict:
    return {"uuid": f"m{i}", "paraphrases": [f"The capital of country {i} is [MASK].", f"[MASK] is capital {i}."],
            "answers": [f"c{i}"]}


def test_task_mask_needs_the_placeholder_in_every_paraphrase(tmp_path):
    train = [{**mask_question(90 + i), "split": "train"} for i in range(5)]
    good = write(tmp_path / "good.jsonl", *train, mask_question(0), mask_question(1))
    ds = load_dataset_by_name("jsonl", str(good), task="mask", num_paraphrases=2)
    assert ds.task == "mask" and len(ds.records) == 2
    bad = mask_question(2)
    bad["paraphrases"][1] = "capital number 2 is?"
    path = write(tmp_path / "bad.jsonl", *train, mask_question(0), bad)
    with pytest.raises(InputError) as err:
        load_dataset_by_name("jsonl", str(path), task="mask")
    assert str(err.value) == f"{path}:7: paraphrase 1 has no [MASK] placeholder (--task mask)"
    load_dataset_by_name("jsonl", str(path), task="qa")  # a QA prompt needs none
    shot = {**mask_question(80), "split": "train", "paraphrases": ["no placeholder here"]}
    with pytest.raises(InputError, match=r":1: paraphrase 0 has no \[MASK\] placeholder"):
        load_dataset_by_name("jsonl", str(write(tmp_path / "s.jsonl", shot, mask_question(0))), task="mask")
    with pytest.raises(InputError, match=r"no \[MASK\] placeholder \(--task mask\)"):
        load_dataset_by_name("webqa_sample", task="mask")


def test_myriadlama_templates_without_the_object_slot_are_refused(tmp_path):
    rows = [json.loads(line) for line in MYRIADLAMA_FIXTURE_FILE.read_text().split("\n") if line.strip()]
    assert load_dataset_by_name("myriadlama", str(MYRIADLAMA_FIXTURE_FILE)).task == "mask"
    for row in rows:
        row["template"] = row["template"].replace("[Y]", "something")
    with pytest.raises(InputError, match=r"myriadlama: question \S+: paraphrase 0 has no \[MASK\] placeholder"):
        load_dataset_by_name("myriadlama", str(write(tmp_path / "m.jsonl", *rows)))


def test_num_fewshot_zero_takes_no_examples_and_scores_every_row(tmp_path, caplog):
    path = write(tmp_path / "d.jsonl", *[question(i) for i in range(7)])
    with caplog.at_level(logging.WARNING):
        default = load_dataset_by_name("jsonl", str(path))
    assert len(default.records) == 2 and len(default.few_shot) == NUM_FEW_SHOT
    assert "the first 5 rows are the few-shot examples" in caplog.text and "--num-fewshot 5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        none = load_dataset_by_name("jsonl", str(path), num_fewshot=0, num_paraphrases=3)
    assert [r.uuid for r in none.records] == [f"q{i}" for i in range(7)] and none.few_shot == []
    assert "few-shot" not in caplog.text
    for fewshot in ("single", "fused"):
        parts = none.prompt_parts(none.records[0], 2, fewshot)
        assert parts.full(0) == f"{QA_INSTRUCTION}\n\nQ: question 0 form 0?\nA:"


def test_num_fewshot_three_from_the_first_rows_and_from_train_rows(tmp_path, caplog):
    path = write(tmp_path / "d.jsonl", *[question(i) for i in range(7)])
    with caplog.at_level(logging.WARNING):
        ds = load_dataset_by_name("jsonl", str(path), num_fewshot=3)
    assert [r.uuid for r in ds.records] == ["q3", "q4", "q5", "q6"]
    assert [q for q, _ in ds.few_shot] == ["question 0 form 0?", "question 1 form 0?", "question 2 form 0?"]
    assert "the first 3 rows are the few-shot examples" in caplog.text and "--num-fewshot 3" in caplog.text
    prefix = ds.prompt_parts(ds.records[0], 1).prefix
    assert prefix.count("Q: ") == 3 and prefix.endswith("Q: question 2 form 0?\nA: a2\n\n")
    with_train = write(tmp_path / "t.jsonl", *shots(5), question(0))
    assert [a for _, a in load_dataset_by_name("jsonl", str(with_train), num_fewshot=3).few_shot] == ["s0", "s1", "s2"]
    with pytest.raises(InputError, match="--num-fewshot 6: .* has only 5 rows with split=train"):
        load_dataset_by_name("jsonl", str(with_train), num_fewshot=6)
    for bad in (-1, 1.5, True):
        with pytest.raises(InputError, match="--num-fewshot"):
            load_dataset_by_name("jsonl", str(path), num_fewshot=bad)
    with pytest.raises(InputError, match="no questions left"):
        load_dataset_by_name("jsonl", str(path), num_fewshot=7)


def test_num_fewshot_on_webqa_and_myriadlama_draws_as_upstream():
    train_size = 3778
    assert upstream_few_shot(train_size, 42) == random.Random(42).sample(range(train_size), 5)
    assert upstream_few_shot(train_size, 42, 3) == random.Random(42).sample(range(train_size), 3)
    assert upstream_few_shot(train_size, 42, 0) == []
    test_file = WEBQA_BUNDLED_DIR / "test.json"
    default = load_dataset_by_name("webqa", str(test_file), limit=2)
    assert load_dataset_by_name("webqa", str(test_file), limit=2, num_fewshot=5).few_shot == default.few_shot
    three = load_dataset_by_name("webqa", str(test_file), limit=2, num_fewshot=3)
    assert len(three.few_shot) == 3 and [r.uuid for r in three.records] == [r.uuid for r in default.records]
    assert load_dataset_by_name("webqa", str(test_file), limit=2, num_fewshot=0).few_shot == []
    lama = load_dataset_by_name("myriadlama", str(MYRIADLAMA_FIXTURE_FILE))
    for k in (0, 3):
        other = load_dataset_by_name("myriadlama", str(MYRIADLAMA_FIXTURE_FILE), num_fewshot=k)
        assert len(other.few_shot) == len(other.few_shot_paraphrases) == k
        assert [r.uuid for r in other.records] == [r.uuid for r in lama.records]  # the same test facts for K <= 5
        assert not other.prompt_parts(other.records[0], 1).prefix.count("Q: ") - k
