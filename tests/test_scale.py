"""Scale-out: an interrupted run resumes to the same table; two processes (gloo, CPU) merge into
the same table as one. The killed run, the live lock holder and the two ranks are processes; the runs beside
them (references, reruns) run in this process (conftest.run_main)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from conftest import run_main
from constants import REPO_DIR
from results import read_table

QUESTIONS = 24
# one thread per process (the machine may be busy) and no GPU, so ranks meet over gloo on any machine
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the in-process runs beside the processes: the same thread count


def write_data(path: Path) -> Path:
    rows = [{"uuid": f"t{i}", "paraphrases": [f"shot {i}?"], "answers": [f"a{i}"], "split": "train"} for i in range(5)]
    rows += [{"uuid": f"q{i:02d}", "paraphrases": [f"question {i}?", f"asked again {i}?", f"once more, {i}?"],
              "answers": [f"a{i}"]} for i in range(QUESTIONS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def command(script: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [script, "--dataset", "jsonl", "--data-file", str(data), "--model", "tiny-llama", "--output-dir", str(out),
            "--batch-size", "1", "--max-new-tokens", "40", "--no-progress", *extra]


def comparable(path: Path) -> pd.DataFrame:
    return read_table(path).drop(columns=["seconds"])


def test_killed_run_resumes_to_the_same_table(tmp_path):
    data = write_data(tmp_path / "data.jsonl")
    args = ["--method", "avg", "--num_ensemble", "3"]
    assert run_main(*command("generate.py", data, tmp_path / "ref", *args), env=ONE_THREAD).returncode == 0  # the reference
    out = tmp_path / "run"
    partial = out / "ensemble_avg-3.rank0.partial.jsonl"
    proc = subprocess.Popen([sys.executable, *command("generate.py", data, out, *args)], cwd=REPO_DIR, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 540
    while time.time() < deadline and proc.poll() is None:
        if partial.exists() and partial.read_text().count("\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert not (out / "ensemble_avg-3.feather").exists()  # nothing final was written by the killed run
    assert f"pid {proc.pid} " in (out / "ensemble_avg-3.rank0.lock").read_text()  # left by the killed run
    done_before = partial.read_text().count("\n")
    assert 3 <= done_before < QUESTIONS
    resumed = run_main(*command("generate.py", data, out, *args), env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert f"already done" in resumed.stderr and f"taking over the lock left by pid {proc.pid}" in resumed.stderr
    pd.testing.assert_frame_equal(comparable(out / "ensemble_avg-3.feather"), comparable(tmp_path / "ref" / "ensemble_avg-3.feather"))
    assert not list(out.glob("*.partial.jsonl")) and not list(out.glob("*.lock"))
    settings = json.loads((out / "ensemble_avg-3.settings.json").read_text())
    assert settings["dtype"] == "float32" and settings["device"] == "cpu"  # resolved, not "auto"
    assert settings["data"].startswith("sha256:") and "data_file" not in settings


def test_a_live_writer_is_waited_for_and_a_dead_one_taken_over(tmp_path):
    """Another live process writing the same table: refused in one line, nothing written. Once that process
    is killed (its lock file stays behind), the same command takes the lock over and runs."""
    data = write_data(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    table = out / "ensemble_max-3.feather"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from results import TableLock; "
                               f"TableLock(__import__('pathlib').Path({str(table)!r})).acquire(); print('locked', flush=True); "
                               "time.sleep(300)"], cwd=REPO_DIR, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = command("generate.py", data, out, "--method", "max", "--num_ensemble", "3", "--limit", "2",
                       "--max-new-tokens", "2")
        refused = run_main(*args)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
        assert f"is being written by another process (pid {holder.pid} on" in refused.stderr
        assert sorted(p.name for p in out.iterdir()) == ["ensemble_max-3.rank0.lock"]
    finally:
        holder.kill()
        holder.wait(timeout=30)
    taken = run_main(*args)
    assert taken.returncode == 0, taken.stderr
    assert f"taking over the lock left by pid {holder.pid}" in taken.stderr
    assert read_table(table)["uuid"].tolist() == ["q00", "q01"] and not list(out.glob("*.lock"))


def test_tables_are_readable_as_the_umask_says(tmp_path):
    from results import ResultWriter, check_settings
    for umask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            path = tmp_path / f"u{umask:o}" / "t.feather"
            check_settings(path, {"seed": 0})
            writer = ResultWriter(path)
            writer.append(rows_for("q1"))
            writer.finish(["q1"])
        finally:
            os.umask(old)
        assert {p.name: p.stat().st_mode & 0o777 for p in path.parent.iterdir()} == {
            "t.feather": mode, "t.jsonl": mode, "t.settings.json": mode}


def test_two_processes_merge_into_the_same_table(tmp_path):
    data = write_data(tmp_path / "data.jsonl")
    args = ["--num_paraphrases", "3", "--max-new-tokens", "6"]
    assert run_main(*command("flex_attention_generate.py", data, tmp_path / "one", *args), env=ONE_THREAD).returncode == 0
    accelerate = Path(sys.executable).parent / "accelerate"
    launched = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                               "--mixed_precision", "no", "--dynamo_backend", "no",
                               *command("flex_attention_generate.py", data, tmp_path / "two", *args)],
                              cwd=REPO_DIR, env=ENV, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert "process 1 of 2" in launched.stderr  # really two ranks, each with its shard
    pd.testing.assert_frame_equal(comparable(tmp_path / "two" / "flex_attention-3.feather"),
                                  comparable(tmp_path / "one" / "flex_attention-3.feather"))


def test_resuming_with_other_settings_is_refused(tmp_path):
    data = write_data(tmp_path / "data.jsonl")
    base = command("generate.py", data, tmp_path / "out", "--method", "max", "--num_ensemble", "3", "--limit", "2")
    assert run_main(*base, env=ONE_THREAD).returncode == 0
    before = (tmp_path / "out" / "ensemble_max-3.feather").read_bytes()
    changed = run_main(*base, "--max-new-tokens", "5")
    assert changed.returncode == 2 and "max_new_tokens: 40 -> 5" in changed.stderr.strip().splitlines()[-1]
    assert (tmp_path / "out" / "ensemble_max-3.feather").read_bytes() == before


def rows_for(*uuids: str) -> list[dict]:
    return [dict(uuid=u, paraphrases=["p"], prompts=["q"], answers=["a"], prediction="a", generation="a", seconds=0.1,
                 new_tokens=1, method="avg", num_ensemble=1, paraphrase_index=-1) for u in uuids]


def test_a_torn_last_line_loses_no_question(tmp_path):
    from results import ResultWriter
    writer = ResultWriter(tmp_path / "t.feather")
    writer.append(rows_for("q1"))
    with open(writer.partial, "a") as f:
        f.write('{"uuid": "q2", "paraphr')  # killed mid-write
    writer.append(rows_for("q2", "q3"))
    assert [r["uuid"] for r in writer.rows()] == ["q1", "q2", "q3"]
    assert writer.finish(["q1", "q2", "q3"])["uuid"].tolist() == ["q1", "q2", "q3"]


def test_finish_keeps_earlier_rows_and_refuses_to_drop_questions(tmp_path):
    from results import ResultWriter
    writer = ResultWriter(tmp_path / "t.feather")
    writer.append(rows_for("q1", "q2", "q3"))
    assert writer.finish(["q1", "q2", "q3"])["uuid"].tolist() == ["q1", "q2", "q3"]
    # a later run with --limit 1 keeps what the longer run answered
    assert ResultWriter(tmp_path / "t.feather").finish(["q1"])["uuid"].tolist() == ["q1", "q2", "q3"]
    other = ResultWriter(tmp_path / "u.feather")
    other.append(rows_for("q1"))
    try:
        other.finish(["q1", "q2"])
        raise AssertionError("a table missing a question was written")
    except RuntimeError as err:
        assert "no rows for 1 questions" in str(err) and other.partial.exists()
