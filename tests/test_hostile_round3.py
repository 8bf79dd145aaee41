"""Issue 37's third round, the classes not in test_hostile_data.py / test_hostile_models.py: stale or mixed rows
at exit 0 (the data hashed as read, rows without usable settings, a run reading its own table, numeric flags past
the model's dtype, evaluate.py's duplicated rows and mixed question sets), planted lock and partial files, escape
codes in error lines, --model DIR/.., the sampled-selection hang, Ctrl-C while the modules load, corrupt caches,
wrong-typed partial rows, answer_table's arguments, a closed stdout and the flags named as typed."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import evaluate
import flex_attention_generate
import generate
import runner
from constants import REPO_DIR, InputError
from dataset import Record, load_dataset_by_name
from results import ResultWriter, TableLock, check_settings, write_table
from runner import RunConfig, answer_table
from selection import Selection, synced_samples

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def write_data(path: Path, questions: int = 3, paraphrases: int = 3, uuid=lambda i: f"q{i}") -> Path:
    rows = [{"uuid": f"t{i}", "paraphrases": [f"shot {i}?"], "answers": [f"a{i}"], "split": "train"} for i in range(2)]
    rows += [{"uuid": uuid(i), "paraphrases": [f"question {i} form {j}?" for j in range(paraphrases)],
              "answers": [f"a{i}"]} for i in range(questions)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def flags(data: Path, out: Path, *more: str) -> list[str]:
    return ["--dataset", "jsonl", "--data-file", str(data), "--model", "tiny-llama", "--no-progress",
            "--max-new-tokens", "2", "--output-dir", str(out), *more]


def one_error(capsys, code: int, want: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and want in err, err
    return err


def no_model(monkeypatch):
    """The model must not load: every check here runs before it."""
    monkeypatch.setattr(runner, "load_lm", lambda config: pytest.fail("the model loaded"))
    monkeypatch.setattr(generate, "load_lm", lambda config: pytest.fail("the model loaded"))


# ---------------------------------------------------------------- 1a: the data hashed as it was read

@pytest.mark.parametrize("edit", [lambda text: text.replace("a1", "b1"), lambda text: text + "\n",
                                  lambda text: ""])
def test_a_data_file_edited_while_the_model_loads_keeps_the_hash_of_what_was_read(tmp_path, monkeypatch, edit):
    data = write_data(tmp_path / "d.jsonl")
    read = hashlib.sha256(data.read_bytes()).hexdigest()
    real = runner.load_lm

    def load_and_edit(config):
        data.write_text(edit(data.read_text()))  # `sed -i` while the weights load
        return real(config)
    monkeypatch.setattr(generate, "load_lm", load_and_edit)
    assert generate.main(flags(data, tmp_path / "out", "--method", "origin")) == 0
    settings = json.loads((tmp_path / "out" / "origin.settings.json").read_text())
    assert settings["data"] == f"sha256:{read}"
    if data.read_text():  # the rerun reads the edited file: refused, never resumed into the old rows
        assert generate.main(flags(data, tmp_path / "out", "--method", "origin")) == 2


def test_output_settings_take_the_hash_from_the_dataset_not_the_disk(tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    config = RunConfig(dataset="jsonl", data_file=str(data), model="tiny-llama", device="cpu")
    dataset = runner.read_data(config, 3)
    data.write_text(data.read_text().replace("a0", "zz"))
    assert runner.output_settings(config, dataset)["data"] == f"sha256:{dataset.source_sha256}"
    assert dataset.source_sha256 != hashlib.sha256(data.read_bytes()).hexdigest()


def test_another_loader_is_hashed_around_its_read_and_an_edit_during_it_refused(tmp_path, monkeypatch):
    from constants import MYRIADLAMA_FIXTURE_FILE
    data = tmp_path / "lama.jsonl"
    shutil.copy(MYRIADLAMA_FIXTURE_FILE, data)
    config = RunConfig(dataset="myriadlama", data_file=str(data), model="tiny-llama", device="cpu")
    dataset = runner.read_data(config, 1)
    assert dataset.source_sha256 == hashlib.sha256(data.read_bytes()).hexdigest()
    real = runner.load_dataset_by_name

    def read_then_edit(*args, **kwargs):
        out = real(*args, **kwargs)
        data.write_bytes(data.read_bytes() + b"\n")
        return out
    monkeypatch.setattr(runner, "load_dataset_by_name", read_then_edit)
    with pytest.raises(InputError, match="changed while it was read"):
        runner.read_data(config, 1)


# ---------------------------------------------------------------- 1b: rows without usable settings

def made_table(tmp_path) -> tuple[Path, Path]:
    data = write_data(tmp_path / "d.jsonl")
    assert generate.main(flags(data, tmp_path / "out", "--method", "origin", "--max-new-tokens", "6")) == 0
    return data, tmp_path / "out" / "origin.feather"


@pytest.mark.parametrize("damage, want", [
    (lambda s: s.unlink(), "no settings file"),
    (lambda s: s.write_text("[1, 2]"), "not a JSON object"),
    (lambda s: s.write_text('"max_new_tokens: 2"'), "not a JSON object"),
    (lambda s: s.write_text("null"), "not a JSON object"),
])
def test_rows_without_usable_settings_are_never_resumed_under_other_flags(tmp_path, capsys, damage, want):
    data, table = made_table(tmp_path)
    damage(table.with_suffix(".settings.json"))
    before = table.read_bytes()
    capsys.readouterr()
    err = one_error(capsys, generate.main(flags(data, tmp_path / "out", "--method", "origin")), want)
    assert "start afresh" in err and table.read_bytes() == before


def test_a_table_copied_without_its_settings_or_only_partial_rows_are_refused(tmp_path, capsys):
    data, table = made_table(tmp_path)
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    shutil.copy(table, elsewhere / table.name)
    capsys.readouterr()
    one_error(capsys, generate.main(flags(data, elsewhere, "--method", "origin")), "no settings file")
    partial_only = tmp_path / "partial"
    partial_only.mkdir()
    ResultWriter(partial_only / "origin.feather").append([{"uuid": "q0", "paraphrase_index": -1}])
    one_error(capsys, generate.main(flags(data, partial_only, "--method", "origin")), "no settings file")
    assert not (partial_only / "origin.settings.json").exists()


def test_stale_settings_beside_no_row_are_still_replaced(tmp_path):
    path = tmp_path / "t.feather"
    path.with_suffix(".settings.json").write_text("[1]")
    check_settings(path, {"max_new_tokens": 2})
    assert json.loads(path.with_suffix(".settings.json").read_text()) == {"max_new_tokens": 2}


# ---------------------------------------------------------------- 1c: a run reading its own output

@pytest.mark.parametrize("name", ["origin.jsonl", "origin.feather", "origin.rank3.partial.jsonl",
                                  "ensemble_avg-2.jsonl"])
@pytest.mark.parametrize("how", ["absolute", "relative", "symlink"])
def test_the_data_file_is_never_the_runs_own_table(tmp_path, capsys, monkeypatch, name, how):
    data, table = made_table(tmp_path)
    out = tmp_path / "out"
    target = out / name
    if not target.exists():  # another table of the folder: its jsonl copy and settings
        shutil.copy(data, target)
        target.with_suffix(".settings.json").write_text("{}")
    given = {"absolute": str(target), "relative": os.path.relpath(target, tmp_path / "sub"),
             "symlink": str(tmp_path / "link.jsonl")}[how]
    (tmp_path / "sub").mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path / "sub")
    if how == "symlink":
        os.symlink(target, given)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    one_error(capsys, generate.main(flags(Path(given), out, "--method", "origin")), "result table of the output")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_data_file_beside_the_tables_that_is_no_table_is_read(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    data = write_data(out / "mine.jsonl")
    assert generate.main(flags(data, out, "--method", "origin")) == 0


# ---------------------------------------------------------------- 1d: numeric flags past the model's dtype

@pytest.mark.parametrize("script, extra, want", [
    ("flex", ["--fusion-bias", "1e300"], "--fusion-bias"),
    ("flex", ["--fusion-bias=-1e39"], "--fusion-bias"),
    ("flex", ["--beside", "singles", "--beside-weight", "1e308"], "--beside-weight"),
    ("flex", ["--fusion-temperature", "1e-300"], "--fusion-temperature"),
    ("flex", ["--fusion-temperature", "1e30"], "--fusion-temperature"),
    ("flex", ["--fusion-bias", "1000", "--dtype", "float16"], "float16"),
    ("flex", ["--fusion-temperature", "0.001", "--dtype", "float16"], "float16"),
    ("flex", ["--paraphrase-temperature", "1e-45"], "--paraphrase-temperature"),
    ("flex", ["--paraphrase-top-p", "1e-300"], "--paraphrase-top-p"),
    ("generate", ["--method", "self_consistency", "--sc-temperature", "1e-300"], "--sc-temperature"),
    ("generate", ["--method", "self_consistency", "--sc-temperature", "1e300"], "--sc-temperature"),
    ("generate", ["--method", "self_consistency", "--sc-top-p", "1e-300"], "--sc-top-p"),
])
def test_numeric_flags_are_bounded_by_the_models_dtype(tmp_path, capsys, monkeypatch, script, extra, want):
    no_model(monkeypatch)
    data = write_data(tmp_path / "d.jsonl")
    main = flex_attention_generate.main if script == "flex" else generate.main
    one_error(capsys, main(flags(data, tmp_path / "out", "--device", "cpu", *extra)), want)
    assert not (tmp_path / "out").exists()


def test_values_within_the_bounds_still_pass_the_check():
    import argparse

    from cli import check_magnitudes
    check_magnitudes(argparse.Namespace(device="cpu", dtype="float32", fusion_bias="-2.3", beside_weight=1e10,
                                        fusion_temperature=1e-10, sc_top_p=1e-30, paraphrase_temperature=1.5))
    check_magnitudes(argparse.Namespace(device="cpu", dtype="float16", fusion_bias="sqrt", fusion_temperature=0.01))


# ---------------------------------------------------------------- 1e: evaluate.py's duplicated rows and mixed sets

def result_rows(method: str, n: int, uuids: list[str], paraphrase_index: list[int], prediction: str = "x"):
    rows = len(uuids)
    return pd.DataFrame({"uuid": uuids, "paraphrases": [["p"]] * rows, "answers": [["a"]] * rows,
                         "prediction": [prediction] * rows, "generation": [prediction] * rows,
                         "seconds": [1.0] * rows, "new_tokens": [1] * rows, "method": method, "num_ensemble": n,
                         "paraphrase_index": paraphrase_index})


def test_evaluate_counts_duplicated_rows_once_and_says_so(tmp_path, capsys):
    pp = result_rows("per_prompt", 4, ["q1"] * 4 + ["q2"] * 4, [0, 1, 2, 3] * 2)
    pd.concat([pp, pp]).reset_index(drop=True).to_feather(tmp_path / "per_prompt.feather")
    avg = result_rows("avg", 4, ["q1", "q2"], [-1, -1])
    pd.concat([avg, avg.iloc[:1]]).reset_index(drop=True).to_feather(tmp_path / "ensemble_avg-4.feather")
    report, _, _ = evaluate.build_report(tmp_path)
    err = capsys.readouterr().err
    assert set(report["N"]) == {4} and set(report["questions"]) == {2}
    assert "per_prompt.feather: 8 duplicated rows" in err and "ensemble_avg-4.feather: 1 duplicated" in err


def test_evaluate_refuses_copies_that_disagree(tmp_path):
    avg = result_rows("avg", 2, ["q1", "q2"], [-1, -1])
    pd.concat([avg, result_rows("avg", 2, ["q1"], [-1], "other")]).reset_index(drop=True).to_feather(
        tmp_path / "ensemble_avg-2.feather")
    with pytest.raises(InputError, match="different answers"):
        evaluate.build_report(tmp_path)


@pytest.mark.parametrize("second, settings", [
    (["q1", "q3"], None), (["q1"], None),
    (["q1", "q2"], ({"dataset": "jsonl", "data": "sha256:aa"}, {"dataset": "jsonl", "data": "sha256:bb"})),
])
def test_evaluate_warns_when_tables_cover_other_questions_or_data(tmp_path, capsys, second, settings):
    result_rows("avg", 2, ["q1", "q2"], [-1, -1]).to_feather(tmp_path / "ensemble_avg-2.feather")
    result_rows("max", 2, second, [-1] * len(second)).to_feather(tmp_path / "ensemble_max-2.feather")
    for name, kept in zip(("ensemble_avg-2", "ensemble_max-2"), settings or ()):
        (tmp_path / f"{name}.settings.json").write_text(json.dumps(kept))
    evaluate.build_report(tmp_path)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "not comparable" in line]
    assert len(warnings) == 1
    assert ("datasets" if settings else "question sets") in warnings[0]


def test_evaluate_says_nothing_when_the_tables_agree(tmp_path, capsys):
    for method in ("avg", "max"):
        result_rows(method, 2, ["q1", "q2"], [-1, -1]).to_feather(tmp_path / f"ensemble_{method}-2.feather")
    evaluate.build_report(tmp_path)
    assert "warning" not in capsys.readouterr().err


# ---------------------------------------------------------------- 2: planted lock and partial files, escapes, --model DIR/..

def plant(path: Path, kind: str, outside: Path) -> None:
    if kind == "symlink":
        os.symlink(outside, path)
    elif kind == "dangling symlink":
        os.symlink(outside.parent / "nowhere", path)
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "hard link":
        os.link(outside, path)
    elif kind == "folder":
        path.mkdir()


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "FIFO", "hard link", "folder"])
@pytest.mark.parametrize("which", ["lock", "partial"])
def test_a_planted_lock_or_partial_file_is_refused_never_followed_or_waited_on(tmp_path, capsys, kind, which):
    data = write_data(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    name = "origin.rank0.lock" if which == "lock" else "origin.rank0.partial.jsonl"
    plant(out / name, kind, outside)
    start = time.monotonic()
    err = one_error(capsys, generate.main(flags(data, out, "--method", "origin")), "not a file this program wrote")
    assert time.monotonic() - start < 60 and name in err
    assert outside.read_text() == "keep me\n" and not (out / "origin.feather").exists()


def test_a_garbage_lock_is_summarised_never_echoed(tmp_path, caplog):
    table = tmp_path / "t.feather"
    lock = TableLock(table)
    lock.file.write_bytes(b"\x1b]0;owned\x07\x1b[2J" + b"A" * 300)
    with caplog.at_level("WARNING"), lock:
        pass
    text = caplog.text
    assert "\x1b" not in text and "\\x1b]0;owned\\x07" in text and "A" * 100 not in text and "(314 bytes)" in text


@pytest.mark.parametrize("uuid", ["\x1b[31mred", "bell\x07", "\x9b2J", "right\u202eleft"])
def test_escape_codes_in_a_uuid_never_reach_the_terminal(tmp_path, capsys, monkeypatch, uuid):
    no_model(monkeypatch)
    data = write_data(tmp_path / "d.jsonl", uuid=lambda i: uuid)  # the same uuid twice: an error naming it
    code = generate.main(flags(data, tmp_path / "out", "--method", "origin"))
    err = one_error(capsys, code, "duplicate uuid")
    assert all(ch.isprintable() for ch in err)


def test_log_lines_are_escaped_too():
    import io
    import logging

    from cli import PrintableFormatter
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PrintableFormatter("%(message)s"))
    handler.emit(logging.LogRecord("x", logging.WARNING, __file__, 1, "uuid %s here", ("\x1b[2J",), None))
    assert stream.getvalue() == "uuid \\x1b[2J here\n"


@pytest.mark.parametrize("suffix", ["..", ".", "../.", "sub/../.."])
def test_a_model_folder_path_never_moves_the_output_out_of_its_folder(tmp_path, suffix):
    (tmp_path / "models" / "mine" / "sub").mkdir(parents=True)
    given = tmp_path / "models" / "mine" / suffix
    out = RunConfig(dataset="jsonl", model=str(given)).out_dir()
    assert out.parent == REPO_DIR / "results" / "jsonl" and out.name == given.resolve().name


def test_a_model_folder_without_a_name_needs_an_output_dir():
    with pytest.raises(InputError, match="--output-dir"):
        RunConfig(dataset="jsonl", model="/").out_dir()
    assert RunConfig(dataset="jsonl", model="/", output_dir="x").out_dir() == Path("x")


# ---------------------------------------------------------------- 3: more selections than exist

@pytest.mark.parametrize("count, n, samples", [(20, 6, 30_000_000), (11, 7, 2_000_000), (100, 4, 10 ** 9)])
def test_more_samples_than_distinct_selections_is_one_line_naming_the_number(count, n, samples):
    import math
    with pytest.raises(InputError, match=f"{math.perm(count, n):,}"):
        synced_samples("u", count, n, samples)
    with pytest.raises(InputError, match=f"{math.perm(count, n):,}"):
        Selection(samples).check(Record("u", [f"p{i}" for i in range(count)], ["a"]), n)


def test_small_counts_keep_upstreams_min():
    assert len(synced_samples("u", 4, 2, 100)) == 12


def test_the_hang_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    no_model(monkeypatch)
    data = write_data(tmp_path / "d.jsonl", paraphrases=20)
    monkeypatch.setattr(runner, "load_lm", lambda config: pytest.fail("the model loaded"))
    code = flex_attention_generate.main(flags(data, tmp_path / "out", "--num_paraphrases", "6", "--num_samples",
                                              "30000000"))
    one_error(capsys, code, "27,907,200")


@pytest.mark.parametrize("manual, auto", [("9", "1"), ("1", "9")])
def test_a_mix_larger_than_the_data_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, manual, auto):
    no_model(monkeypatch)
    rows = [{"uuid": f"q{i}", "paraphrases": [f"p{j} {i}?" for j in range(4)], "answers": ["a"], "num_manual": 2}
            for i in range(7)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = generate.main(flags(data, tmp_path / "out", "--method", "avg", "--num_manual", manual, "--num_auto", auto,
                               "--num_samples", "2"))
    one_error(capsys, code, f"--num_manual {manual}")


# ---------------------------------------------------------------- 4: tracebacks

INTERRUPT_IMPORT = """
import runpy, sys
script, module = sys.argv[1:3]
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
sys.argv = [script, "--help"]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("script", ["generate.py", "flex_attention_generate.py", "sweep.py", "evaluate.py",
                                    "example_flexattention.py", "debug_flexattention.py"])
@pytest.mark.parametrize("module", ["torch", "transformers"])
def test_ctrl_c_while_the_modules_load_is_one_line(script, module):
    done = subprocess.run([sys.executable, "-c", INTERRUPT_IMPORT, str(REPO_DIR / script), module],
                          capture_output=True, text=True, env=ENV, timeout=120, cwd=REPO_DIR)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == ["interrupted while the modules were loading; nothing was read or "
                                                "written"]


def paraphraser(tmp_path, monkeypatch):
    import paraphrase
    from conftest import cached_tiny
    from decoding import LanguageModel
    monkeypatch.setattr(paraphrase, "CACHE_DIR", tmp_path)
    p = paraphrase.Paraphraser(LanguageModel(*cached_tiny("llama")), "tiny-llama")
    p.cache_file.parent.mkdir(parents=True, exist_ok=True)
    return p


@pytest.mark.parametrize("text", ["{not json\n", "[1, 2]\n", '{"question": "q"}\n', '{"question": 3, "paraphrases": []}\n',
                                  '{"question": "q", "paraphrases": "abc"}\n', '{"question": "q", "paraphrases": [1]}\n'])
def test_a_corrupt_or_wrong_schema_paraphrase_cache_is_one_line(tmp_path, monkeypatch, text):
    p = paraphraser(tmp_path, monkeypatch)
    p.cache_file.write_text('{"question": "ok", "paraphrases": ["fine"]}\n' + text)
    with pytest.raises(InputError, match="not a paraphrase cache.*delete it"):
        p.load_cache()
    p.cache_file.write_bytes(b"\xff\xfe")
    with pytest.raises(InputError, match="not UTF-8"):
        p.load_cache()


@pytest.mark.parametrize("table", [
    pd.DataFrame({"uuid": ["q"]}), pd.DataFrame({"key": ["k"], "confidence": ["high"], "seconds": [1.0]}),
    pd.DataFrame({"key": ["k"], "confidence": [3.0], "seconds": [1.0]}),
    pd.DataFrame({"key": [1], "confidence": [0.5], "seconds": [1.0]}),
    pd.DataFrame({"key": ["k"], "confidence": [0.5], "seconds": [None]}),
])
def test_a_wrong_schema_confidence_cache_is_one_line(tmp_path, table):
    from confidence import cached_entries
    path = tmp_path / "cache.feather"
    table.to_feather(path)
    with pytest.raises(InputError, match="not a confidence cache.*delete it"):
        cached_entries(path)
    path.write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot read"):
        cached_entries(path)


def test_a_table_without_its_uuid_column_is_one_line(tmp_path):
    path = tmp_path / "t.feather"
    write_table(pd.DataFrame({"prediction": ["x"], "paraphrase_index": [-1]}), path)
    with pytest.raises(InputError, match="no uuid column"):
        ResultWriter(path).done_uuids({"q": 1})


@pytest.mark.parametrize("row", [{"uuid": ["q"]}, {"uuid": True}, {"uuid": 1.5}, {"uuid": "q", "paraphrase_index": "0"},
                                 {"uuid": "q", "paraphrase_index": [0]}, {"uuid": "q", "sample_index": {"a": 1}}])
def test_a_partial_row_of_wrong_types_is_one_line(tmp_path, row):
    path = tmp_path / "t.feather"
    writer = ResultWriter(path)
    writer.partial.write_text(json.dumps({"uuid": "fine", "paraphrase_index": -1}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(InputError, match=r"partial.jsonl:2: .*delete"):
        writer.done_uuids({"q": 1})


@pytest.mark.parametrize("value", ["-3", "0", "100000"])
def test_example_max_new_tokens_is_bounded(capsys, value):
    import example_flexattention
    one_error(capsys, example_flexattention.main(["--max-new-tokens", value]), "--max-new-tokens")


QUESTION = Record("q", ["what is it?", "what is that?"], ["a"])


@pytest.mark.parametrize("args, kwargs, want", [
    (([], "avg"), {}, "non-empty list"), (("what?", "avg"), {}, "non-empty list"),
    ((QUESTION, "avg"), {}, "non-empty list"), (([QUESTION], "sideways"), {}, "method 'sideways'"),
    (([QUESTION], "weighted_avg"), {}, "method 'weighted_avg'"), (([QUESTION], "avg", -1), {}, "n must"),
    (([QUESTION], "avg", 0), {}, "n must"), (([QUESTION], "avg", 2.0), {}, "n must"),
    (([QUESTION], "avg", 2), {"max_new_tokens": 0}, "max_new_tokens"),
    (([QUESTION], "avg", 2), {"batch_size": 0}, "batch_size"),
    (([Record("q", "what is it?", ["a"])], "avg", 2), {}, "paraphrases must be a non-empty list"),
    (([{"uuid": "q"}], "avg", 2), {}, "not a dataset.Record"),
    (([QUESTION], "avg", 3), {}, "fewer than the 3"),
])
def test_answer_table_refuses_what_it_cannot_answer(args, kwargs, want):
    with pytest.raises(InputError, match=want):
        answer_table(None, *args, **kwargs)


# ---------------------------------------------------------------- 5: messages and exit codes

@pytest.mark.parametrize("script, extra, stdout", [
    ("generate.py", ["--method", "all"], "closed"), ("flex_attention_generate.py", ["--num_paraphrases", "3"], "closed"),
    ("generate.py", ["--method", "all"], "full"),
])
def test_a_closed_or_full_stdout_never_fails_a_finished_run(tmp_path, script, extra, stdout):
    data = write_data(tmp_path / "d.jsonl")
    full = open("/dev/full", "w") if stdout == "full" else None
    run = subprocess.Popen([sys.executable, str(REPO_DIR / script), *flags(data, tmp_path / "out", *extra)],
                           stdout=full or subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=tmp_path)
    if full is None:
        run.stdout.close()  # the reader is gone before the first line (| head -n 0)
    err = run.stderr.read().decode()
    assert run.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert ("stdout is full" in err) == (stdout == "full")
    tables = sorted(p.name for p in (tmp_path / "out").glob("*.feather"))
    assert tables == (["origin.feather", "per_prompt.feather"] if script == "generate.py" else
                      ["flex_attention-3.feather"])
    assert all(len(pd.read_feather(p)) >= 3 for p in (tmp_path / "out").glob("*.feather"))


def test_a_mismatched_model_config_is_one_line(tmp_path):
    from conftest import cached_tiny, run_main
    model, tokenizer = cached_tiny("llama")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    data = write_data(tmp_path / "d.jsonl")
    args = flags(data, tmp_path / "out", "--method", "origin")
    args[args.index("tiny-llama")] = str(folder)
    done = run_main("generate.py", *args, env={"HF_HUB_OFFLINE": "1"})  # transformers' own lines count too
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("value", ["0", "-1"])
def test_sweep_names_the_samples_flag_as_typed(tmp_path, capsys, value):
    import sweep
    data = write_data(tmp_path / "d.jsonl")
    err = one_error(capsys, sweep.main(flags(data, tmp_path / "out", "--samples", value, "--dry-run")), "--samples")
    assert "--num_samples" not in err and "--num-samples" not in err
