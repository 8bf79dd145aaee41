"""Defining behaviour of result tables (results.py) on the exact conditions they guard: check_settings (a changed
key refused, provenance kept but never compared, stale or unreadable settings beside no row replaced), what makes a
question complete (row_key, done_uuids, incomplete, drop_incomplete, finish's order and refusals), has_rows,
TableLock (a live holder refused, a dead one taken over, pid_alive's rules), the row fields, the file names and
the small helpers. Every expectation is written by hand from the docstrings' rules."""
from __future__ import annotations

import json
import logging
import math
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import results
from constants import InputError
from dataset import Record
from results import (ResultsError, ResultWriter, TableLock, WriteError, atomic_write, check_settings, has_rows,
                     jsonl_text, non_finite, read_settings, read_table, result_row, row_counts, row_key, split_lines,
                     table_file_names, write_table)


def rows_of(uuid: str, n: int = 2, **extra) -> list[dict]:
    return [{"uuid": uuid, "paraphrase_index": i, "prediction": f"{uuid}-{i}", "answers": [f"{uuid}-0"], **extra}
            for i in range(n)]


def sidecar(table: Path) -> dict:
    return json.loads(table.with_suffix(".settings.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- check_settings

def test_first_run_keeps_its_settings_and_provenance(tmp_path):
    table = tmp_path / "t.feather"
    check_settings(table, {"seed": 0, "path": Path("a/b"), "shape": (1, 2), "provenance": {"git_commit": "c1"}})
    assert sidecar(table) == {"seed": 0, "path": "a/b", "shape": [1, 2], "provenance": {"git_commit": "c1"}}
    text = table.with_suffix(".settings.json").read_text(encoding="utf-8")
    assert text == json.dumps(sidecar(table), indent=1, sort_keys=True)


def test_without_provenance_none_is_kept(tmp_path):
    table = tmp_path / "t.feather"
    check_settings(table, {"seed": 0})
    assert sidecar(table) == {"seed": 0}


def test_write_false_writes_nothing(tmp_path):
    table = tmp_path / "t.feather"
    check_settings(table, {"seed": 0}, write=False)
    assert not table.with_suffix(".settings.json").exists()


def test_a_changed_key_is_refused_once_the_table_has_rows(tmp_path):
    table = tmp_path / "t.feather"
    check_settings(table, {"seed": 0, "max_new_tokens": 40, "method": "avg"})
    ResultWriter(table).append(rows_of("q1"))
    check_settings(table, {"seed": 0, "max_new_tokens": 40, "method": "avg"})  # the same: resumed
    with pytest.raises(InputError) as err:
        check_settings(table, {"seed": 1, "max_new_tokens": 40, "method": "max"})
    assert str(err.value) == (f"{table} was made with other settings (method: 'avg' -> 'max', seed: 0 -> 1); use "
                              f"another --output-dir or delete it")


def test_an_added_or_a_dropped_key_is_a_change(tmp_path):
    table = tmp_path / "t.feather"
    check_settings(table, {"seed": 0})
    ResultWriter(table).append(rows_of("q1"))
    with pytest.raises(InputError, match=r"\(top_p: None -> 0\.9\)"):
        check_settings(table, {"seed": 0, "top_p": 0.9})
    with pytest.raises(InputError, match=r"\(seed: 0 -> None\)"):
        check_settings(table, {})


def test_settings_are_compared_as_they_are_kept(tmp_path):
    table = tmp_path / "t.feather"
    check_settings(table, {"shape": (1, 2), "path": Path("x")})
    ResultWriter(table).append(rows_of("q1"))
    check_settings(table, {"shape": [1, 2], "path": "x"})  # a tuple is kept as a list, a path as its text


def test_a_finished_table_counts_as_rows(tmp_path):
    table = tmp_path / "t.feather"
    check_settings(table, {"seed": 0})
    writer = ResultWriter(table)
    writer.append(rows_of("q1"))
    writer.finish(["q1"], {"q1": 2})
    assert not writer.partial.exists()
    with pytest.raises(InputError, match="seed: 0 -> 1"):
        check_settings(table, {"seed": 1})


def test_provenance_is_kept_not_compared_and_a_new_one_is_added_once(tmp_path):
    table = tmp_path / "t.feather"
    first, second, third = {"git_commit": "c1"}, {"git_commit": "c2"}, {"git_commit": "c3"}
    check_settings(table, {"seed": 0, "provenance": first})
    ResultWriter(table).append(rows_of("q1"))
    check_settings(table, {"seed": 0, "provenance": first})  # the same code: nothing added
    assert sidecar(table) == {"seed": 0, "provenance": first}
    check_settings(table, {"seed": 0, "provenance": second})  # other code: not refused, recorded
    assert sidecar(table) == {"seed": 0, "provenance": first, "resumed_with": [second]}
    check_settings(table, {"seed": 0, "provenance": second})  # recorded once
    check_settings(table, {"seed": 0, "provenance": third}, write=False)  # write=False: nothing written
    assert sidecar(table) == {"seed": 0, "provenance": first, "resumed_with": [second]}
    check_settings(table, {"seed": 0, "provenance": third})
    assert sidecar(table)["resumed_with"] == [second, third]
    check_settings(table, {"seed": 0})  # no provenance given: nothing to add
    assert sidecar(table)["resumed_with"] == [second, third]
    with pytest.raises(InputError, match="seed: 0 -> 2"):  # provenance never hides a changed setting
        check_settings(table, {"seed": 2, "provenance": first})


def test_settings_beside_no_row_are_stale_and_replaced(tmp_path):
    table = tmp_path / "t.feather"
    check_settings(table, {"seed": 0, "provenance": {"git_commit": "c1"}})
    check_settings(table, {"seed": 5, "provenance": {"git_commit": "c2"}})  # no table, no partial row: replaced
    assert sidecar(table) == {"seed": 5, "provenance": {"git_commit": "c2"}}
    ResultWriter(table).partial.write_text('{"uuid": "q1", "prediction"')  # a torn row is no row
    check_settings(table, {"seed": 6})
    assert sidecar(table) == {"seed": 6}


def test_settings_that_are_not_an_object_are_refused_beside_rows(tmp_path):
    table = tmp_path / "t.feather"
    table.with_suffix(".settings.json").write_text("[1, 2]")
    ResultWriter(table).append(rows_of("q1"))
    with pytest.raises(InputError, match="is not a JSON object"):  # issue 37: never rewritten to claim this run's
        check_settings(table, {"seed": 0})
    assert table.with_suffix(".settings.json").read_text() == "[1, 2]"


def test_unreadable_settings_are_refused_only_beside_rows(tmp_path):
    table = tmp_path / "t.feather"
    table.with_suffix(".settings.json").write_text("{oops")
    check_settings(table, {"seed": 0})
    assert sidecar(table) == {"seed": 0}
    table.with_suffix(".settings.json").write_text("{oops")
    ResultWriter(table).append(rows_of("q1"))
    with pytest.raises(InputError) as err:
        check_settings(table, {"seed": 0})
    message = str(err.value)
    assert message.startswith(f"cannot read {table.with_suffix('.settings.json')} (")
    assert message.endswith("); delete the table and it, or use another --output-dir")


def test_non_finite_numbers_are_named_by_their_key():
    assert non_finite({"a": 1.0, "b": {"c": [0.5, float("nan")]}}) == "b.c[1]"
    assert non_finite({"a": [1, {"x": float("inf")}]}) == "a[1].x"
    assert non_finite((1.0, -float("inf"))) == "[1]"
    assert non_finite(float("nan")) == "value"
    assert non_finite({"ok": [1, 2.5, True, "nan", None]}) is None
    assert non_finite({"first": float("nan"), "second": float("inf")}) == "first"


def test_non_finite_settings_are_refused_before_anything_is_written(tmp_path):
    table = tmp_path / "t.feather"
    with pytest.raises(InputError) as err:
        check_settings(table, {"grid": [{"t": 1.0}, {"t": float("inf")}]})
    assert str(err.value) == f"{table}: setting grid[1].t is not a finite number; give a finite value"
    assert not table.with_suffix(".settings.json").exists()


def test_read_settings(tmp_path):
    table = tmp_path / "t.feather"
    assert read_settings(table) is None
    check_settings(table, {"seed": 3, "provenance": {"git_commit": "c"}})
    assert read_settings(table) == {"seed": 3, "provenance": {"git_commit": "c"}}
    table.with_suffix(".settings.json").write_text("{bad")
    assert read_settings(table) is None


# ---------------------------------------------------------------- has_rows

def test_has_rows_exactly_when_a_table_or_a_complete_partial_row_exists(tmp_path):
    table = tmp_path / "t.feather"
    assert not has_rows(table)
    other_rank = ResultWriter(table, rank=3).partial
    other_rank.write_bytes(b'\n{"no_uuid": 1}\n[1, 2]\n{"uuid": "q1"')  # no row with a uuid, a torn last line
    assert not has_rows(table)
    other_rank.write_bytes(b'{"uuid": "q1"}\n')
    assert has_rows(table)  # any rank's partial file counts
    other_rank.unlink()
    table.write_bytes(b"")  # a table file, whatever it holds
    assert has_rows(table)


# ---------------------------------------------------------------- what makes a question complete

def test_row_key_is_uuid_paraphrase_index_and_sample_index():
    assert row_key({"uuid": 7, "paraphrase_index": 2}) == ("7", 2, None)
    assert row_key({"uuid": "q"}) == ("q", -1, None)  # no paraphrase_index: a fused row (-1)
    assert row_key({"uuid": "q", "paraphrase_index": 1.0, "sample_index": 3.0}) == ("q", 1, 3)
    assert row_key({"uuid": "q", "paraphrase_index": np.int64(1), "sample_index": float("nan")}) == ("q", 1, None)
    assert row_key({"uuid": "q", "paraphrase_index": None}) == ("q", None, None)
    assert row_key({"uuid": "q", "paraphrase_index": 1.5}) == ("q", 1.5, None)
    assert row_key({"uuid": "q", "sample_index": "s"}) == ("q", -1, "s")
    assert isinstance(row_key({"uuid": "q", "paraphrase_index": 2.0})[1], int)


def test_row_counts_count_distinct_rows_per_question():
    rows = rows_of("a", 3) + rows_of("a", 2) + rows_of("b", 1) + [{"uuid": "c", "sample_index": s} for s in (0, 1, 1)]
    assert row_counts(rows) == {"a": 3, "b": 1, "c": 2}


def test_done_incomplete_and_drop_incomplete(tmp_path):
    writer = ResultWriter(tmp_path / "t.feather")
    writer.append(rows_of("a", 3) + rows_of("b", 2) + rows_of("c", 4) + rows_of("z", 1))
    expected = {"a": 3, "b": 3, "c": 3}
    assert writer.counts() == {"a": 3, "b": 2, "c": 4, "z": 1}
    assert writer.done_uuids() == {"a", "b", "c", "z"}
    assert writer.done_uuids(expected) == {"a"}  # exactly its expected rows; z is not expected
    assert writer.incomplete(expected) == {"b", "c"}  # too few or too many; z is not expected
    assert writer.incomplete(expected, {"a": 1, "y": 2}) == {"a"}
    assert writer.drop_incomplete(expected) == {"b", "c"}
    assert row_counts(writer.rows()) == {"a": 3, "z": 1}
    before = writer.partial.stat().st_mtime_ns
    assert writer.drop_incomplete(expected) == set()
    assert writer.partial.stat().st_mtime_ns == before  # nothing to drop: nothing written


def test_drop_incomplete_cuts_a_torn_line_and_leaves_other_ranks_alone(tmp_path):
    table = tmp_path / "t.feather"
    mine, other = ResultWriter(table, 0), ResultWriter(table, 1)
    mine.append(rows_of("a", 2))
    other.append(rows_of("b", 1))
    with open(mine.partial, "ab") as f:
        f.write(b'{"uuid": "c", "parap')
    assert mine.drop_incomplete({"a": 2, "b": 2}) == {"b"}
    assert mine.partial.read_bytes().endswith(b"}\n") and len(mine.partial.read_bytes().split(b"\n")) == 3
    assert len(other.read_partial(other.partial)) == 1  # another rank's rows are its own writer's
    assert ResultWriter(tmp_path / "none.feather").drop_incomplete({"a": 1}) == set()


def test_append_starts_a_new_line_after_a_torn_one(tmp_path):
    writer = ResultWriter(tmp_path / "t.feather")
    writer.append(rows_of("a", 1))
    with open(writer.partial, "ab") as f:
        f.write(b'{"uuid": "b", "par')
    writer.append(rows_of("c", 1))
    assert [json.loads(line)["uuid"] for line in writer.partial.read_bytes().splitlines()] == ["a", "c"]


def test_drop_torn_tail_of_a_file_that_is_one_torn_line(tmp_path):
    writer = ResultWriter(tmp_path / "t.feather")
    writer.partial.write_bytes(b'{"uuid": "a"')
    writer.drop_torn_tail()
    assert writer.partial.read_bytes() == b""
    writer.partial.write_bytes(b'{"uuid": "a"}\n' + b"x" * (1 << 17))  # longer than one look-back chunk
    writer.drop_torn_tail()
    assert writer.partial.read_bytes() == b'{"uuid": "a"}\n'
    writer.drop_torn_tail()  # complete: unchanged
    assert writer.partial.read_bytes() == b'{"uuid": "a"}\n'


def test_read_partial_skips_torn_undecodable_and_uuid_less_lines(tmp_path):
    file = tmp_path / "p.jsonl"
    file.write_bytes(b'{"uuid": "a"}\n\xff\xfe\n{"x": 1}\n"text"\n[[[\n{"uuid": "b"}\n{"uuid": "c"')
    assert [row["uuid"] for _, row in ResultWriter.read_partial(file)] == ["a", "b"]
    assert ResultWriter.read_partial(tmp_path / "missing.jsonl") == []
    assert ResultWriter.parse_line(b"[" * 100000) is None  # nested too deeply for json


def test_finish_orders_by_the_dataset_keeps_the_newest_copy_and_extra_questions_after(tmp_path):
    table = tmp_path / "t.feather"
    old, new = ResultWriter(table, 5), ResultWriter(table, 0)
    old.append([{**r, "prediction": "old"} for r in rows_of("b", 2)] + rows_of("x", 1))
    os.utime(old.partial, ns=(10 ** 18, 10 ** 18))
    new.append(rows_of("a", 2) + [{**r, "prediction": "new"} for r in rows_of("b", 2)[::-1]])
    os.utime(new.partial, ns=(2 * 10 ** 18, 2 * 10 ** 18))
    assert new.partial_files() == [old.partial, new.partial]  # oldest first
    df = new.finish(["b", "a"], {"a": 2, "b": 2})
    assert list(zip(df["uuid"], df["paraphrase_index"], df["prediction"])) == [
        ("b", 0, "new"), ("b", 1, "new"), ("a", 0, "a-0"), ("a", 1, "a-1"), ("x", 0, "x-0")]
    assert df["exact"].tolist() == [False, False, True, False, True]  # scored
    assert not old.partial.exists() and not new.partial.exists()
    assert read_table(table)["uuid"].tolist() == ["b", "b", "a", "a", "x"]
    assert table.with_suffix(".jsonl").exists()


def test_finish_sorts_samples_within_a_question(tmp_path):
    writer = ResultWriter(tmp_path / "t.feather")
    writer.append([{"uuid": "a", "paraphrase_index": -1, "sample_index": s, "prediction": "", "answers": []}
                   for s in (2, 0, 1)])
    df = writer.finish(["a"], {"a": 3})
    assert df["sample_index"].tolist() == [0, 1, 2]


def test_finish_gives_fused_rows_paraphrase_index_minus_one(tmp_path):
    writer = ResultWriter(tmp_path / "t.feather")
    writer.append([{"uuid": "a", "prediction": "x", "answers": ["x"]}])
    df = writer.finish(["a"])
    assert df["paraphrase_index"].tolist() == [-1]


def test_finish_refuses_a_missing_question_and_an_incomplete_one(tmp_path):
    writer = ResultWriter(tmp_path / "t.feather")
    writer.append(rows_of("a", 2) + rows_of("b", 1))
    with pytest.raises(ResultsError) as err:
        writer.finish(["a", "b", "c", "d"], {"a": 2, "b": 2})
    assert str(err.value) == (f"{writer.path}: no rows for 2 questions (first: c); 1 questions incomplete (first: b, "
                              f"1 of 2 rows); the partial files stay for a resumed run")
    assert not writer.path.exists() and row_counts(writer.rows()) == {"a": 2}  # b's rows dropped to be redone
    with pytest.raises(ResultsError, match=r"^.*: no rows for 1 questions \(first: b\); the partial"):
        writer.finish(["a", "b"])
    assert len(writer.finish(["a"])) == 2  # without expectations: at least one row each


def test_finish_on_a_lemmaized_table_adds_lemmas_for_new_rows(tmp_path):
    writer = ResultWriter(tmp_path / "t.feather")
    writer.append([{"uuid": "a", "prediction": "Cities", "answers": ["city"]}])
    writer.finish(["a"])
    assert results.lemmaize_table(writer.path) is True
    assert results.lemmaize_table(writer.path) is False  # already has them
    writer.append([{"uuid": "b", "prediction": "Ran", "answers": ["run"]}])
    df = writer.finish(["a", "b"])
    assert df["predict_lemma"].tolist() == [["city"], ["run"]]
    assert df["answer_lemmas"].tolist() == [[["city"]], [["run"]]]


def test_with_lemmas_reads_strings_and_lists_of_answers():
    df = pd.DataFrame({"prediction": ["The Cities", None], "answers": ["cities", np.array(["Runs", "x y"])]})
    out = results.with_lemmas(df)
    assert out["predict_lemma"].tolist() == [["the", "city"], []]
    assert out["answer_lemmas"].tolist() == [[["city"]], [["run"], ["x", "y"]]]
    assert "predict_lemma" not in df.columns


# ---------------------------------------------------------------- the lock

def test_a_live_writer_is_refused_in_one_line_and_the_lock_is_freed_on_release(tmp_path):
    table = tmp_path / "t.feather"
    first = TableLock(table).acquire()
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    assert first.file == tmp_path / "t.rank0.lock" and first.file.read_text() == me
    assert TableLock(table).holder() == me
    with pytest.raises(InputError) as err:
        TableLock(table).acquire()
    assert str(err.value) == (f"{table} is being written by another process ({me}; lock t.rank0.lock); wait for it to "
                              f"finish or use another --output-dir")
    with TableLock(table, rank=1) as other:  # another rank's lock is another file
        assert other.file.name == "t.rank1.lock"
    assert not (tmp_path / "t.rank1.lock").exists()
    first.release()
    assert not first.file.exists() and TableLock(table).holder() is None
    first.release()  # twice: nothing to do
    with TableLock(table):
        pass


def test_a_dead_writers_lock_is_taken_over_and_said(tmp_path, caplog):
    table = tmp_path / "t.feather"
    table.with_name("t.rank0.lock").write_text("pid 4000000 on elsewhere, long gone")
    assert TableLock(table).holder() is None  # nobody holds the flock
    with caplog.at_level(logging.WARNING, logger="results"):
        with TableLock(table) as lock:
            assert lock.file.read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
    assert "t.feather: taking over the lock left by pid 4000000 on elsewhere, long gone, which is no longer running" \
        in caplog.text


def test_a_fresh_lock_says_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="results"):
        with TableLock(tmp_path / "sub" / "t.feather"):
            pass
    assert caplog.text == ""


@pytest.fixture
def live_pid():
    """A live process of ours that any signal may hit (a mutant may turn kill(pid, 0) into a real signal)."""
    import signal
    import time
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    yield pid
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def test_pid_alive_reads_pid_and_host(live_pid):
    host = socket.gethostname()
    assert not TableLock.pid_alive("")
    assert not TableLock.pid_alive("garbage")
    assert not TableLock.pid_alive(f"pid x on {host}")
    assert not TableLock.pid_alive(f"pid 12 on {host} extra")
    assert TableLock.pid_alive("pid 12 on another-machine")  # cannot be checked from here: counts as live
    assert not TableLock.pid_alive(f"pid {os.getpid()} on {host}")  # this very process
    assert TableLock.pid_alive(f"pid {live_pid} on {host}")
    assert not TableLock.pid_alive(f"pid 4000000 on {host}")


def test_without_flock_a_lock_naming_a_live_process_is_refused(tmp_path, monkeypatch, live_pid):
    import errno as errno_module
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno_module.ENOLCK, "No locks available")
    table = tmp_path / "t.feather"
    table.with_name("t.rank0.lock").write_text(f"pid {live_pid} on {socket.gethostname()}")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    assert TableLock(table).holder() is None
    with pytest.raises(InputError, match="is being written by another process"):
        TableLock(table).acquire()
    table.with_name("t.rank0.lock").write_text(f"pid 4000000 on {socket.gethostname()}")
    lock = TableLock(table).acquire()  # the pid says it is free
    assert lock.file.read_text().startswith(f"pid {os.getpid()} ")


# ---------------------------------------------------------------- rows and files

class Letters:
    def decode(self, tokens, skip_special_tokens=False):
        return "".join(chr(t) for t in tokens)


def test_result_row_fields():
    record = Record("q1", ["p0", "p1", "p2"], ["Paris", "paris"])
    row = result_row(record, Letters(), [32, 80, 10, 81], paraphrases=["p1"], prompts=["Q: p1\nA:"], seconds=0.5,
                     method="per_prompt", num_ensemble=3, paraphrase_index=1, prompt_tokens=7)
    assert row == {"uuid": "q1", "paraphrases": ["p1"], "prompts": ["Q: p1\nA:"], "answers": ["Paris", "paris"],
                   "prediction": "P", "generation": " P\nQ", "token_ids": [32, 80, 10, 81], "seconds": 0.5,
                   "new_tokens": 4, "method": "per_prompt", "num_ensemble": 3, "paraphrase_index": 1,
                   "paraphrase_indices": [1], "prompt_tokens": 7}


def test_result_row_of_a_selection_names_the_question_paraphrases_it_used():
    record = Record("q1", ["p3", "p0"], ["x"], indices=[3, 0], sample=2)
    fused = result_row(record, Letters(), [], paraphrases=["p3", "p0"], prompts=["..."], seconds=1.0, method="avg",
                       num_ensemble=2)
    assert fused["paraphrase_index"] == -1 and fused["paraphrase_indices"] == [3, 0] and fused["sample_index"] == 2
    assert fused["prediction"] == "" and fused["new_tokens"] == 0
    one = result_row(record, Letters(), [65], paraphrases=["p0"], prompts=["..."], seconds=1.0, method="per_prompt",
                     num_ensemble=1, paraphrase_index=1)
    assert one["paraphrase_indices"] == [0]
    plain = result_row(Record("q", ["a", "b"], []), Letters(), [65], paraphrases=["a", "b"], prompts=[], seconds=0.0,
                       method="avg", num_ensemble=2)
    assert plain["paraphrase_indices"] == [0, 1] and "sample_index" not in plain
    first = result_row(Record("q", ["a"], [], sample=0), Letters(), [65], paraphrases=["a"], prompts=[], seconds=0.0,
                       method="avg", num_ensemble=1)
    assert first["sample_index"] == 0  # sample 0 is a sample


def test_split_lines_splits_at_newline_bytes_only():
    assert split_lines(b"a\nb\n") == [b"a", b"b"]
    assert split_lines(b"a\nb") == [b"a", b"b"]
    assert split_lines(b"a\xe2\x80\xa8b\r\x0c\n") == [b"a\xe2\x80\xa8b\r\x0c"]
    assert split_lines(b"") == []
    assert split_lines(b"\n\n") == [b"", b""]


def test_jsonl_text_escapes_what_other_readers_end_a_line_at():
    df = pd.DataFrame({"a": ["x\u2028y", "\u2029\x85é"]})
    text = jsonl_text(df)
    assert text == '{"a":"x\\u2028y"}\n{"a":"\\u2029\\u0085é"}\n'
    assert [json.loads(line)["a"] for line in text.splitlines()] == ["x\u2028y", "\u2029\x85é"]


def test_write_and_read_table_give_lists_back(tmp_path):
    path = tmp_path / "t.feather"
    df = pd.DataFrame({"ids": [[1, 2], [3]], "text": ["a", "b"], "n": [1, 2]}, index=[5, 7])
    write_table(df, path)
    back = read_table(path)
    assert back["ids"].tolist() == [[1, 2], [3]] and isinstance(back["ids"][0], list)
    assert back["text"].tolist() == ["a", "b"] and back.index.tolist() == [0, 1]
    assert [json.loads(line)["ids"] for line in path.with_suffix(".jsonl").read_text().splitlines()] == [[1, 2], [3]]
    write_table(pd.DataFrame({"ids": []}), tmp_path / "e.feather")
    assert len(read_table(tmp_path / "e.feather")) == 0


def test_atomic_write_gives_the_umask_mode_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    old = os.umask(0o027)
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text("one"))
    finally:
        os.umask(old)
    assert path.read_text() == "one" and (path.stat().st_mode & 0o777) == 0o640

    def fails(tmp):
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(WriteError) as err:
        atomic_write(path, fails)
    assert str(err.value) == (f"cannot write {path}: No space left on device; what was written before is kept: fix "
                              f"the cause and rerun the same command")
    assert err.value.errno == 28 and err.value.path == path
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert path.read_text() == "one" and sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]


def test_current_umask_reads_the_process_umask():
    old = os.umask(0o037)
    try:
        assert results.current_umask() == 0o037
    finally:
        os.umask(old)


def test_table_file_names_list_every_file_a_table_leads_to():
    names = ["t.feather", "t.jsonl", "t.settings.json", "t.rank7.lock", "t.rank7.partial.jsonl"]
    assert table_file_names(Path("out/t.feather"), 7) == names + [f".{n}.XXXXXXXX.tmp" for n in names]
    assert table_file_names(Path("t.feather"))[3] == "t.rank9999.lock"


def test_check_table_path_measures_the_longest_name(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    longest_extra = len(".t.rank9999.partial.jsonl.XXXXXXXX.tmp") - len("t")
    fits = tmp_path / ("x" * (limit - longest_extra) + ".feather")
    results.check_table_path(fits)
    with pytest.raises(InputError, match="the file name is too long for this file system"):
        results.check_table_path(tmp_path / ("x" * (limit - longest_extra + 1) + ".feather"))
    with pytest.raises(InputError, match="the folder name 'yyyy"):
        results.check_table_path(tmp_path / ("y" * (limit + 1)) / "t.feather")


def test_check_writable_dir(tmp_path):
    results.check_writable_dir(tmp_path / "new" / "deeper")  # can be created
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(InputError) as err:
        results.check_writable_dir(file)
    assert str(err.value) == f"--output-dir {file}: is a file, not a folder"
    with pytest.raises(InputError) as err:
        results.check_writable_dir(file / "sub", "--results-dir")
    assert str(err.value) == f"--results-dir {file / 'sub'}: cannot be created: {file} is a file, not a folder"
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(InputError, match=rf"^--output-dir {loop}/x: {loop} is a symlink loop$"):
        results.check_writable_dir(loop / "x")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"is a dangling symlink \(to .*nowhere\)$"):
        results.check_writable_dir(dangling)
    assert results.existing_ancestor(tmp_path / "a" / "b" / "c") == tmp_path
    assert results.symlink_trouble(tmp_path) is None


def test_provenance_names_code_versions_model_and_device():
    import torch
    model = SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16, config=SimpleNamespace())
    got = results.provenance("tiny-llama", None, model)
    assert got["model"] == "tiny-llama" and got["model_id"] == "tiny-llama" and got["model_revision"] is None
    assert got["device"] == "cpu" and got["gpu"] is None and got["dtype"] == "bfloat16" and got["device_map"] is None
    assert got["torch"] == torch.__version__ and not math.isnan(len(got["python"]))
    assert set(got) == {"git_commit", "git_dirty", "python", "torch", "transformers", "model", "model_id",
                        "model_revision", "device", "device_map", "gpu", "dtype", "lemmatizer", "lemmatizer_version"}
    import scoring  # which lemmas the partial metric used, and their versions
    assert got["lemmatizer"] == scoring.lemmatizer_name() and got["lemmatizer_version"].startswith("spacy 3.")
    assert ("spacy-lookups-data 1." in got["lemmatizer_version"]) == (got["lemmatizer"] == scoring.LOOKUP_NAME)
