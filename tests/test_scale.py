"""Scale-out: an interrupted run resumes to the same table; two processes (gloo, CPU) merge into
the same table as one."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from constants import REPO_DIR
from results import read_table

QUESTIONS = 24


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
    subprocess.run([sys.executable, *command("generate.py", data, tmp_path / "ref", *args)], cwd=REPO_DIR, check=True,
                   capture_output=True, timeout=300)
    out = tmp_path / "run"
    partial = out / "ensemble_avg-3.rank0.partial.jsonl"
    proc = subprocess.Popen([sys.executable, *command("generate.py", data, out, *args)], cwd=REPO_DIR,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if partial.exists() and partial.read_text().count("\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert not (out / "ensemble_avg-3.feather").exists()  # nothing final was written by the killed run
    done_before = partial.read_text().count("\n")
    assert 3 <= done_before < QUESTIONS
    resumed = subprocess.run([sys.executable, *command("generate.py", data, out, *args)], cwd=REPO_DIR,
                             capture_output=True, text=True, timeout=300, check=True)
    assert f"already done" in resumed.stderr
    pd.testing.assert_frame_equal(comparable(out / "ensemble_avg-3.feather"), comparable(tmp_path / "ref" / "ensemble_avg-3.feather"))
    assert not list(out.glob("*.partial.jsonl"))


def test_two_processes_merge_into_the_same_table(tmp_path):
    data = write_data(tmp_path / "data.jsonl")
    args = ["--num_paraphrases", "3", "--max-new-tokens", "6"]
    subprocess.run([sys.executable, *command("flex_attention_generate.py", data, tmp_path / "one", *args)],
                   cwd=REPO_DIR, check=True, capture_output=True, timeout=300)
    accelerate = Path(sys.executable).parent / "accelerate"
    launched = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                               "--mixed_precision", "no", "--dynamo_backend", "no",
                               *command("flex_attention_generate.py", data, tmp_path / "two", *args)],
                              cwd=REPO_DIR, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert "process 1 of 2" in launched.stderr  # really two ranks, each with its shard
    pd.testing.assert_frame_equal(comparable(tmp_path / "two" / "flex_attention-3.feather"),
                                  comparable(tmp_path / "one" / "flex_attention-3.feather"))


def test_resuming_with_other_settings_is_refused(tmp_path):
    data = write_data(tmp_path / "data.jsonl")
    base = command("generate.py", data, tmp_path / "out", "--method", "max", "--num_ensemble", "3", "--limit", "2")
    subprocess.run([sys.executable, *base], cwd=REPO_DIR, check=True, capture_output=True, timeout=300)
    before = (tmp_path / "out" / "ensemble_max-3.feather").read_bytes()
    changed = subprocess.run([sys.executable, *base, "--max-new-tokens", "5"], cwd=REPO_DIR, capture_output=True,
                             text=True, timeout=300)
    assert changed.returncode == 2 and "max_new_tokens: 40 -> 5" in changed.stderr.strip().splitlines()[-1]
    assert (tmp_path / "out" / "ensemble_max-3.feather").read_bytes() == before
