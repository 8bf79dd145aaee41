"""Result files under faults (issue 24): rows survive every line-separator character, a question is done only with
all its expected rows, a write error (ENOSPC) is one WriteError and the rerun gives the uninterrupted table, stale
settings are replaced, bad files and paths are one InputError; a local model's revision is a content hash."""
from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pytest

import models
import results
from constants import InputError
from results import ResultWriter, ResultsError, WriteError, check_settings, read_table

LINE_SEPARATORS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r"]
PROMPTS = 3  # per_prompt: one row per paraphrase asked


def per_prompt_rows(uuid: str, text: str = "question") -> list[dict]:
    """The rows result_row makes for one per_prompt question (hand-made: no model)."""
    paraphrases = [f"{text} {uuid} form {i}?" for i in range(PROMPTS)]
    return [dict(uuid=uuid, paraphrases=[p], prompts=[f"Q: {p}\nA:"], answers=[f"answer {uuid}"],
                 prediction=f"answer {uuid}" if i % 2 == 0 else f"guess {i}", generation=f" answer {uuid}\n",
                 token_ids=[1, 2, i], seconds=0.25, new_tokens=3, method="per_prompt", num_ensemble=1,
                 paraphrase_index=i) for i, p in enumerate(paraphrases)]


UUIDS = [f"q{i:02d}" for i in range(8)]
EXPECTED = {u: PROMPTS for u in UUIDS}


def run(writer: ResultWriter, uuids: list[str], batch: int = 2) -> None:
    """The batch loop: append each batch's rows."""
    for start in range(0, len(uuids), batch):
        writer.append([row for u in uuids[start:start + batch] for row in per_prompt_rows(u)])


def uninterrupted(tmp_path: Path) -> pd.DataFrame:
    writer = ResultWriter(tmp_path / "reference" / "per_prompt.feather")
    run(writer, UUIDS)
    return writer.finish(UUIDS, EXPECTED)


# ---------------------------------------------------------------- line separators


@pytest.mark.parametrize("sep", LINE_SEPARATORS, ids=[f"U+{ord(c):04X}" for c in LINE_SEPARATORS])
def test_every_line_separator_survives_append_rows_and_finish(tmp_path, sep):
    writer = ResultWriter(tmp_path / "t.feather")
    rows = {u: per_prompt_rows(u, text=f"odd{sep}text") for u in ("q1", "q2")}
    rows["q1"][1]["prediction"] = f"two{sep}lines"
    for u in rows:
        writer.append(rows[u])
    assert b"\n" not in writer.partial.read_bytes().replace(b"}\n", b"")  # one row a line, all ASCII
    assert writer.partial.read_bytes().isascii()
    assert len(writer.rows()) == 6 and writer.done_uuids({"q1": 3, "q2": 3}) == {"q1", "q2"}
    df = writer.finish(["q1", "q2"], {"q1": 3, "q2": 3})
    assert len(df) == 6 and df["paraphrases"].map(lambda p: sep in p[0]).all()
    assert read_table(writer.path).loc[1, "prediction"] == f"two{sep}lines"
    copy = writer.path.with_suffix(".jsonl").read_text(encoding="utf-8")
    assert len(copy.splitlines()) == 6  # the readable copy survives splitlines-based readers too
    assert [json.loads(line)["prediction"] for line in copy.split("\n") if line][1] == f"two{sep}lines"


# ---------------------------------------------------------------- completeness


def test_a_question_with_two_of_three_rows_is_not_done_and_is_dropped(tmp_path):
    writer = ResultWriter(tmp_path / "t.feather")
    writer.append(per_prompt_rows("q1") + per_prompt_rows("q2")[:2])
    expected = {"q1": 3, "q2": 3}
    assert writer.done_uuids() == {"q1", "q2"}  # without expectations: any row (the old behaviour)
    assert writer.done_uuids(expected) == {"q1"}
    with pytest.raises(ResultsError, match=r"1 questions incomplete \(first: q2, 2 of 3 rows\)") as err:
        writer.finish(["q1", "q2"], expected)
    assert isinstance(err.value, InputError) and isinstance(err.value, RuntimeError) and "\n" not in str(err.value)
    assert not writer.path.exists() and writer.partial.exists()
    assert {r["uuid"] for r in writer.rows()} == {"q1"} and len(writer.rows()) == 3  # finish dropped q2's rows
    writer.append(per_prompt_rows("q2")[:1])
    assert ResultWriter(writer.path).drop_incomplete(expected) == {"q2"}
    assert {r["uuid"] for r in writer.rows()} == {"q1"} and len(writer.rows()) == 3
    writer.append(per_prompt_rows("q2"))
    assert writer.done_uuids(expected) == {"q1", "q2"}
    assert writer.finish(["q1", "q2"], expected)["paraphrase_index"].tolist() == [0, 1, 2, 0, 1, 2]


def test_too_many_rows_and_duplicates(tmp_path):
    writer = ResultWriter(tmp_path / "t.feather")
    writer.append(per_prompt_rows("q1") + per_prompt_rows("q1")[:1])  # a row written twice counts once
    assert writer.done_uuids({"q1": 3}) == {"q1"}
    assert writer.done_uuids({"q1": 2}) == set()
    with pytest.raises(ResultsError, match=r"no rows for 1 questions \(first: q9\)"):
        writer.finish(["q1", "q9"], {"q1": 3, "q9": 3})
    assert len(writer.rows()) == 4  # q1 is complete: kept
    with pytest.raises(ResultsError, match="3 of 2 rows"):
        writer.finish(["q1"], {"q1": 2})
    assert writer.rows() == []  # redone whole by the rerun


def test_rows_with_a_sample_index_are_distinct(tmp_path):
    writer = ResultWriter(tmp_path / "t.feather")
    rows = [{**per_prompt_rows("q1")[0], "paraphrase_index": -1, "sample_index": s} for s in range(4)]
    writer.append(rows[:3])
    assert writer.done_uuids({"q1": 4}) == set()
    writer.append(rows[3:] + rows[:1])
    assert writer.done_uuids({"q1": 4}) == {"q1"}
    assert writer.finish(["q1"], {"q1": 4})["sample_index"].tolist() == [0, 1, 2, 3]
    assert ResultWriter(writer.path).done_uuids({"q1": 4}) == {"q1"}  # counted from the table as well


def test_a_torn_line_from_a_kill_is_redone_to_the_same_table(tmp_path):
    reference = uninterrupted(tmp_path)
    writer = ResultWriter(tmp_path / "out" / "per_prompt.feather")
    run(writer, UUIDS[:3])
    whole = "".join(json.dumps(r) + "\n" for r in per_prompt_rows(UUIDS[3]))
    with open(writer.partial, "a") as f:  # killed after 2 rows and a half of the next batch
        f.write(whole[: whole.index("\n", whole.index("\n") + 1) + 20])
    resumed = ResultWriter(writer.path)
    assert resumed.drop_incomplete(EXPECTED) == {UUIDS[3]}
    done = resumed.done_uuids(EXPECTED)
    assert done == set(UUIDS[:3])
    run(resumed, [u for u in UUIDS if u not in done])
    pd.testing.assert_frame_equal(resumed.finish(UUIDS, EXPECTED), reference)


# ---------------------------------------------------------------- write errors


@pytest.mark.parametrize("fail_after", [0, 5, 7, 12])
def test_disk_full_after_k_rows_then_the_rerun_gives_the_uninterrupted_table(tmp_path, monkeypatch, fail_after):
    reference = uninterrupted(tmp_path)
    path = tmp_path / "out" / "per_prompt.feather"
    real_write, written = os.write, [0]

    def full_disk(fd, data):  # the partial file takes fail_after rows, then half a row, then ENOSPC
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(".partial.jsonl"):
            return real_write(fd, data)
        data = bytes(data)
        lines = data.split(b"\n")
        room = fail_after - written[0]
        if room >= len(lines) - 1:
            written[0] += len(lines) - 1
            return real_write(fd, data)
        keep = b"".join(line + b"\n" for line in lines[:room]) + lines[room][:10]
        real_write(fd, keep)
        written[0] = fail_after
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(results.os, "write", full_disk)
    writer = ResultWriter(path)
    with pytest.raises(WriteError) as err:
        run(writer, UUIDS)
    message = str(err.value)
    assert message.startswith(f"cannot write {writer.partial}: No space left on device") and "\n" not in message
    assert isinstance(err.value, InputError) and err.value.errno == errno.ENOSPC
    kept = writer.partial.read_bytes() if writer.partial.exists() else b""
    assert kept.endswith(b"\n") or not kept  # cut back: no half row
    assert len(kept.splitlines()) == (fail_after // (2 * PROMPTS)) * 2 * PROMPTS  # whole batches only
    monkeypatch.undo()
    resumed = ResultWriter(path)  # the rerun
    resumed.drop_incomplete(EXPECTED)
    done = resumed.done_uuids(EXPECTED)
    assert len(done) == fail_after // (2 * PROMPTS) * 2
    run(resumed, [u for u in UUIDS if u not in done])
    table = resumed.finish(UUIDS, EXPECTED)
    pd.testing.assert_frame_equal(table, reference)
    pd.testing.assert_frame_equal(read_table(path), read_table(tmp_path / "reference" / "per_prompt.feather"))


def test_a_failed_table_write_leaves_the_old_table(tmp_path, monkeypatch):
    writer = ResultWriter(tmp_path / "t.feather")
    writer.append(per_prompt_rows("q1"))
    writer.finish(["q1"], {"q1": 3})
    before = writer.path.read_bytes()
    writer.append(per_prompt_rows("q2"))

    def eio(self, *args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(pd.DataFrame, "to_feather", eio)
    with pytest.raises(WriteError, match=rf"cannot write {writer.path}: Input/output error"):
        writer.finish(["q1", "q2"], {"q1": 3, "q2": 3})
    assert writer.path.read_bytes() == before and writer.partial.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert len(ResultWriter(writer.path).finish(["q1", "q2"], {"q1": 3, "q2": 3})) == 6


def test_a_read_only_file_system_is_one_write_error(tmp_path, monkeypatch):
    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(results.os, "open", erofs)
    with pytest.raises(WriteError, match="Read-only file system"):
        ResultWriter(tmp_path / "t.feather").append(per_prompt_rows("q1"))


# ---------------------------------------------------------------- settings


def test_settings_left_by_a_crashed_run_are_stale_and_replaced(tmp_path):
    table = tmp_path / "t.feather"
    check_settings(table, {"seed": 0, "max_new_tokens": 40})  # the run crashed before its first row
    ResultWriter(table).partial.write_text('{"uuid": "q1", "par')  # ... or while writing it
    check_settings(table, {"seed": 0, "max_new_tokens": 5}, write=False)  # another rank: not refused either
    check_settings(table, {"seed": 0, "max_new_tokens": 5})
    assert json.loads(table.with_suffix(".settings.json").read_text())["max_new_tokens"] == 5
    ResultWriter(table).append(per_prompt_rows("q1"))  # now it has rows: a different run is refused
    with pytest.raises(InputError, match=r"max_new_tokens: 5 -> 40"):
        check_settings(table, {"seed": 0, "max_new_tokens": 40})


def test_unreadable_settings_beside_rows_are_one_line(tmp_path):
    table = tmp_path / "t.feather"
    table.with_suffix(".settings.json").write_text("{not json")
    check_settings(table, {"seed": 0})  # beside nothing: replaced
    table.with_suffix(".settings.json").write_text("{not json")
    ResultWriter(table).append(per_prompt_rows("q1"))
    with pytest.raises(InputError, match=r"cannot read .*t.settings.json"):
        check_settings(table, {"seed": 0})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_settings_are_refused(tmp_path, value):
    table = tmp_path / "t.feather"
    with pytest.raises(InputError, match="setting fusion_temperature is not a finite number"):
        check_settings(table, {"seed": 0, "fusion_temperature": value})
    with pytest.raises(InputError, match=r"setting decode\.top_p is not a finite number"):
        check_settings(table, {"seed": 0, "decode": {"top_p": value}})
    assert not table.with_suffix(".settings.json").exists()


# ---------------------------------------------------------------- bad files and paths


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_table_is_one_line_naming_it(tmp_path, damage):
    writer = ResultWriter(tmp_path / "t.feather")
    writer.append(per_prompt_rows("q1"))
    writer.finish(["q1"], {"q1": 3})
    data = writer.path.read_bytes()
    writer.path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a feather file" * 10,
                             "empty": b""}[damage])
    for read in (lambda: read_table(writer.path), ResultWriter(writer.path).rows,
                 lambda: ResultWriter(writer.path).done_uuids({"q1": 3}), lambda: results.lemmaize_table(writer.path)):
        with pytest.raises(InputError) as err:
            read()
        assert str(err.value).startswith(f"cannot read {writer.path}: ") and "\n" not in str(err.value)
        assert str(err.value).endswith("; delete it or use another --output-dir")


def test_an_output_path_past_the_file_name_limit_is_refused_before_writing(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    results.check_table_path(tmp_path / "out" / "per_prompt.feather")
    fits = tmp_path / ("x" * (limit - len(".feather")) + ".feather")  # the table fits, its partial file would not
    with pytest.raises(InputError, match=r"the file name is too long for this file system \(\d+ bytes.*limit is "
                                         rf"{limit}\)"):
        results.check_table_path(fits)
    with pytest.raises(InputError, match="folder name"):
        results.check_table_path(tmp_path / ("d" * (limit + 1)) / "t.feather")
    longest = max(len(n) for n in results.table_file_names(Path("a.feather")))
    results.check_table_path(tmp_path / ("y" * (limit - longest + 1) + ".feather"))  # exactly at the limit
    assert list(tmp_path.iterdir()) == []


def test_a_symlink_loop_is_named_as_one(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for folder in (loop, loop / "sub"):
        with pytest.raises(InputError, match=rf"--output-dir {folder}: {loop} is a symlink loop"):
            results.check_writable_dir(folder)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match="is a dangling symlink"):
        results.check_writable_dir(tmp_path / "dangling" / "x")
    results.check_writable_dir(tmp_path / "new" / "folder")


# ---------------------------------------------------------------- models


def saved_model(folder: Path) -> Path:
    model, tokenizer = models.tiny_model("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_revision_is_a_content_hash_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    folder = saved_model(tmp_path / "model")
    weights = folder / "model.safetensors"
    first = models.folder_revision(folder)
    assert first.startswith("files:")
    cache = json.loads((tmp_path / "cache" / "revisions.json").read_text())
    assert cache[str(weights.absolute())]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()

    hashed = []
    real = models.file_sha256
    monkeypatch.setattr(models, "file_sha256", lambda file: hashed.append(file.name) or real(file))
    assert models.folder_revision(folder) == first and hashed == []  # nothing read again

    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # other weights, the same size
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a re-save's new mtime
    assert weights.stat().st_size == stat.st_size
    second = models.folder_revision(folder)
    assert second != first and hashed == ["model.safetensors"]
    (tmp_path / "cache" / "revisions.json").write_text("{broken")  # an unreadable cache is ignored
    assert models.folder_revision(folder) == second
    (folder / "README.md").write_text("# notes")  # documentation: the revision stays
    assert models.folder_revision(folder) == second
    revisions = {second}
    for name, edit in (("tokenizer.json", lambda t: t.replace('"<s>"', '"<bos>"', 1)),  # what the prompt reads
                       ("generation_config.json", lambda t: t.replace('"eos_token_id": 2', '"eos_token_id": 1')),
                       ("tokenizer_config.json", lambda t: t.replace("}", ', "chat_template": "{{ 1 }}"}', 1))):
        text = (folder / name).read_text()
        assert edit(text) != text, name
        (folder / name).write_text(edit(text))
        revisions.add(models.folder_revision(folder))
    assert len(revisions) == 4  # every file that decides the output moves the revision


def test_revision_without_a_writable_cache_still_works(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "file" / "cache")
    folder = saved_model(tmp_path / "model")
    assert models.folder_revision(folder) == models.folder_revision(folder)


def test_the_loaded_model_gets_the_content_revision(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    folder = saved_model(tmp_path / "model")
    loaded, _ = models.load_model(str(folder), device="cpu")
    assert models.model_revision(loaded) == models.folder_revision(folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_safetensors_file_is_one_line(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    folder = saved_model(tmp_path / "model")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64)
    with pytest.raises(InputError) as err:
        models.load_model(str(folder), device="cpu")
    assert str(err.value).startswith(f"--model {str(folder)!r}: cannot load {folder} (")
    assert "\n" not in str(err.value)


def test_a_cache_folder_under_a_file_names_the_variable(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("SELF_ENSEMBLE_CACHE", str(tmp_path / "file" / "x"))
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "file" / "x")
    with pytest.raises(InputError, match=r"SELF_ENSEMBLE_CACHE\) cannot be created: .*file is a file; set "
                                         r"SELF_ENSEMBLE_CACHE"):
        models.check_cache_dir()
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "file")
    with pytest.raises(InputError, match="is a file"):
        models.check_cache_dir()
    models.check_cache_dir(tmp_path / "fresh" / "cache")
    assert not (tmp_path / "fresh").exists()
