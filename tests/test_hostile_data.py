"""Hostile data (issue 37): what is planted as the data file, a huge file read for two questions, chat templates
that raise or do not parse; each ends in one line, nothing hangs."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

import dataset
from constants import InputError
from dataset import Dataset, Record, load_dataset_by_name
from models import tiny_tokenizer


def rows(n: int, start: int = 0, split: str | None = None) -> list[str]:
    extra = {"split": split} if split else {}
    return [json.dumps({"uuid": f"q{i}", "paraphrases": [f"question {i}?"], "answers": [f"a{i}"], **extra})
            for i in range(start, start + n)]


@pytest.mark.parametrize("kind", ["a folder", "a FIFO", "a device"])
def test_what_is_not_a_file_of_lines_is_named_not_read(tmp_path, kind):
    path = tmp_path / "data"
    if kind == "a folder":
        path.mkdir()
    elif kind == "a FIFO":
        os.mkfifo(path)  # opening it would wait for a writer forever
    else:
        path = "/dev/null"
    with pytest.raises(InputError, match=f"data file {path} is {kind}, not a file of JSON lines"):
        load_dataset_by_name("jsonl", str(path))


def test_a_limit_parses_only_what_the_run_needs_and_hashes_every_byte(tmp_path, monkeypatch):
    """2,000 questions, a malformed line far past the limit, the few-shot rows at the end: --limit 2 parses the
    first questions and the lines that may be few-shot rows, and the hash covers the whole file as read."""
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(rows(1000) + ["{not json"] + rows(1000, 1000) + rows(5, 5000, "train")) + "\n")
    parsed = []
    real = dataset.json_object
    monkeypatch.setattr(dataset, "json_object", lambda line, where: parsed.append(where) or real(line, where))
    ds = load_dataset_by_name("jsonl", str(path), limit=2)
    assert [r.uuid for r in ds.records] == ["q0", "q1"] and [a for _, a in ds.few_shot] == [f"a{i}" for i in range(5000, 5005)]
    assert len(parsed) == 7 + 5  # the first 2 + 5 (the few-shot rows could have been the first 5), the 5 train rows
    assert ds.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(InputError, match=r"big.jsonl:1001: malformed JSON"):  # without a limit every line is read
        load_dataset_by_name("jsonl", str(path))


@pytest.mark.parametrize("template, why", [
    ("{{ raise_exception('System role not supported') }}", "System role not supported"),  # Gemma's refuse a system turn
    ("{% for m in messages %}{{ m.content }", "TemplateSyntaxError")])
def test_a_chat_template_that_raises_or_does_not_parse_is_one_line(template, why):
    tokenizer = tiny_tokenizer(add_bos=True)
    tokenizer.chat_template = template
    ds = Dataset("t", "qa", [Record("q", ["what?"], ["x"])], [("2+2?", "4")], chat=tokenizer)
    with pytest.raises(InputError, match=f"the tokenizer's chat template fails on this prompt .*{why}") as err:
        ds.prompt_parts(ds.records[0], 1)
    assert "\n" not in str(err.value) and "--prompt-format plain" in str(err.value)
