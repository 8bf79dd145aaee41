"""Hostile inputs and faults through the commands (issue 24's second round): every line-separator character
inside a paraphrase loses no row for any method; Ctrl-C and SIGTERM end in one line with 130/143, keep the
finished questions and the rerun completes the same table; a FlexAttention compile failure is one line
naming the way around it; --no-progress silences transformers' loading bar; validate fails a cache
folder under a file."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import run_main
from constants import REPO_DIR

SEPARATORS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
IN_PROCESS_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # in this process (conftest.run_main), as ENV


def write_data(path, questions: int = 3, separators: bool = False):
    rows = [{"uuid": f"t{i}", "paraphrases": [f"shot {i}?"], "answers": [f"a{i}"], "split": "train"} for i in range(2)]
    for i in range(questions):
        mark = SEPARATORS[i % len(SEPARATORS)] if separators else ""
        rows.append({"uuid": f"q{i}", "paraphrases": [f"question{mark} {i}?", f"asked{SEPARATORS[-1 - i % 9] if separators else ''} {i}?",
                                                      f"once{mark}more {i}?"], "answers": [f"a{i}"]})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO_DIR / script), *args, "--model", "tiny-llama", "--no-progress"]


@pytest.mark.parametrize("script, flags, rows_per_question", [
    ("generate.py", ["--method", "per_prompt"], 3), ("generate.py", ["--method", "origin"], 1),
    ("generate.py", ["--method", "avg", "--num_ensemble", "3"], 1),
    ("generate.py", ["--method", "avg_prob", "--num_ensemble", "3"], 1),
    ("generate.py", ["--method", "max", "--num_ensemble", "3"], 1),
    ("generate.py", ["--method", "weighted_max", "--num_ensemble", "3", "--confidence-samples", "2"], 1),
    ("flex_attention_generate.py", ["--num_paraphrases", "3"], 1),
    ("flex_attention_generate.py", ["--num_paraphrases", "2", "--num_samples", "2"], 2),
])
def test_line_separators_inside_paraphrases_lose_no_row(tmp_path, script, flags, rows_per_question):
    data = write_data(tmp_path / "d.jsonl", questions=9, separators=True)  # raw, not escaped: valid JSON still
    done = run_main(*command(script, "--dataset", "jsonl", "--data-file", str(data), "--max-new-tokens", "2",
                             "--output-dir", str(tmp_path / "out"), *flags)[1:], env=IN_PROCESS_ENV)
    assert done.returncode == 0, done.stderr
    table = pd.read_feather(next((tmp_path / "out").glob("*.feather")))
    assert len(table) == 9 * rows_per_question
    assert table["uuid"].nunique() == 9
    kept = {p for ps in table["paraphrases"] for p in ps}
    assert any(sep in p for p in kept for sep in SEPARATORS)  # the characters reached the rows as data


QUESTIONS = 24


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_says_one_line_keeps_rows_and_resumes(tmp_path, sig, code):
    data = write_data(tmp_path / "d.jsonl", questions=QUESTIONS)
    args = ["--dataset", "jsonl", "--data-file", str(data), "--num_ensemble", "3", "--batch-size", "1",
            "--max-new-tokens", "40", "--output-dir", str(tmp_path / "out")]
    # a shell without job control starts background commands with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: the run is started as from a terminal, where Ctrl-C is delivered
    proc = subprocess.Popen(command("generate.py", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    partial = tmp_path / "out" / "ensemble_avg-3.rank0.partial.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (
            not partial.exists() or partial.read_bytes().count(b"\n") < 2):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == code, err
    assert len(lines) == 1 and lines[0].startswith("interrupted: ") and f"of {QUESTIONS} questions kept" in lines[0], err
    kept = int(lines[0].split()[1])
    assert kept >= 2 and partial.read_bytes().count(b"\n") >= kept
    done = run_main(*command("generate.py", *args)[1:], env=IN_PROCESS_ENV)  # the rerun, and a fresh run beside it
    assert done.returncode == 0 and f"resuming, {kept} of {QUESTIONS}" in done.stderr
    fresh = run_main(*command("generate.py", *args[:-1], str(tmp_path / "fresh"))[1:], env=IN_PROCESS_ENV)
    assert fresh.returncode == 0
    a, b = (pd.read_feather(tmp_path / d / "ensemble_avg-3.feather").drop(columns=["seconds"]) for d in ("out", "fresh"))
    assert a.equals(b)


def test_a_flex_compile_failure_is_one_line(tmp_path, monkeypatch, capsys):
    """Forced: the compiled flex_attention raises as inductor does when it cannot generate the kernel."""
    import runpy

    import segment_mask
    from torch._inductor.exc import CppCompileError

    def failing(compile: bool, backend="inductor"):
        def fn(*args, **kwargs):
            raise CppCompileError(["g++"], "error: 'cur_kvSplitSize2' was not declared in this scope")
        return fn
    monkeypatch.setattr(segment_mask, "flex_function", failing)
    data = write_data(tmp_path / "d.jsonl")
    monkeypatch.setattr(sys, "argv", command("flex_attention_generate.py", "--dataset", "jsonl", "--data-file", str(data),
                                             "--num_paraphrases", "3", "--attn", "flex", "--compile", "on",
                                             "--batch-size", "1", "--output-dir", str(tmp_path / "out"))[1:])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_DIR / "flex_attention_generate.py"), run_name="__main__")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1, err
    assert "compiled FlexAttention failed" in lines[0] and "--compile off" in lines[0] and "--attn sdpa" in lines[0]
    assert not list((tmp_path / "out").glob("*.feather"))


def test_no_progress_hides_the_loading_bar_too(tmp_path):
    from models import tiny_model
    model, tokenizer = tiny_model("llama")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = write_data(tmp_path / "d.jsonl")
    argv = [sys.executable, str(REPO_DIR / "generate.py"), "--dataset", "jsonl", "--data-file", str(data), "--model",
            str(folder), "--max-new-tokens", "2", "--num_ensemble", "3"]
    env = {**IN_PROCESS_ENV, "SELF_ENSEMBLE_CACHE": str(tmp_path / "cache")}
    quiet = run_main(*argv[1:], "--no-progress", "--output-dir", str(tmp_path / "a"), env=env)
    loud = run_main(*argv[1:], "--output-dir", str(tmp_path / "b"), env=env)  # the bar is back once a run is done
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert "Loading weights" in loud.stderr and "Loading weights" not in quiet.stderr
    assert "%|" not in quiet.stderr


def test_validate_fails_a_cache_folder_under_a_file(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    done = run_main("validate_flexattention_env.py", env={**IN_PROCESS_ENV, "SELF_ENSEMBLE_CACHE": str(a_file / "cache")})
    assert done.returncode == 1
    assert any(line.startswith("[fail] disk:") and "SELF_ENSEMBLE_CACHE" in line for line in done.stdout.splitlines())
