"""Every mistake a user can make ends the same way: exit code 2, exactly one line on stderr that names the
problem, and nothing created or changed under the output folder or the caches. One table, one command a case.

Each case is its own process running the script with its command line. To keep the table fast on a small
machine, those processes are forked from one interpreter that has imported the scripts' libraries (torch,
transformers) once; BAD_INPUT_SUBPROCESS=1 starts every case as a fresh `python script ...` instead. A case with
its own environment gets it in its child, set also where the libraries keep what they read of it at import
(conftest.follow_environment: HF_HUB_OFFLINE, SELF_ENSEMBLE_CACHE); the good runs that make the tables the cases
resume run in this process (conftest.run_main)."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from conftest import run_main
from constants import REPO_DIR
from results import TableLock

TINY = ["--model", "tiny-llama", "--no-progress", "--max-new-tokens", "2"]


def jsonl(path: Path, rows: list, raw: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw if raw is not None else "".join(
        (r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode())
    return path


def shots() -> list[dict]:
    return [{"uuid": f"t{i}", "paraphrases": [f"shot {i}?"], "answers": [f"a{i}"], "split": "train"} for i in range(5)]


def question(i: int, **change) -> dict:
    return {"uuid": f"q{i}", "paraphrases": [f"question {i}?", f"asked again {i}?", f"once more, {i}?"],
            "answers": [f"a{i}"], **change}


# Runs the scripts named on stdin (one JSON case a line), each in a child forked from this preloaded process.
FORK_SERVER = r"""
import json, os, runpy, sys, traceback
sys.path.insert(0, os.getcwd())
import evaluate, flex_attention_generate, generate  # noqa: F401 - the heavy imports, once
print("ready", flush=True)
for line in sys.stdin:
    case = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if case["env"]:  # what the libraries read from it at import, set where they keep it (conftest)
                sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
                import pytest
                from conftest import follow_environment
                for name, value in case["env"].items():
                    os.environ[name] = value
                    follow_environment(pytest.MonkeyPatch(), name, value)
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            sys.argv = [case["script"], *case["args"]]
            try:
                runpy.run_path(case["script"], run_name="__main__")
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
                if not isinstance(exit.code, (int, type(None))):
                    print(exit.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


class Commands:
    """Runs `python script args` as a fresh process, or as a child forked from a preloaded one."""

    def __init__(self, env: dict, scratch: Path, fresh: bool):
        self.env, self.scratch, self.fresh, self.count = env, scratch, fresh, itertools.count()
        self.server = None
        if not fresh:
            self.server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], cwd=REPO_DIR, env=env, text=True,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert self.server.stdout.readline().strip() == "ready"

    def run(self, script: str, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
        if self.fresh:
            return subprocess.run([sys.executable, script, *args], cwd=REPO_DIR, env={**self.env, **(extra_env or {})},
                                  capture_output=True, text=True, timeout=300)
        i = next(self.count)
        files = {name: str(self.scratch / f"{i}.{name}") for name in ("stdout", "stderr")}
        self.server.stdin.write(json.dumps({"script": script, "args": list(args), "env": extra_env or {}, **files})
                                + "\n")
        self.server.stdin.flush()
        code = int(self.server.stdout.readline())
        read = {name: Path(path).read_text(errors="replace") for name, path in files.items()}
        return subprocess.CompletedProcess([script, *args], code, read["stdout"], read["stderr"])

    def close(self) -> None:
        if self.server:
            self.server.stdin.close()
            self.server.wait(timeout=60)


def snapshot(*folders: Path) -> dict:
    """Every file and folder under `folders`, with a hash of each file's bytes and its mode."""
    seen = {}
    for folder in folders:
        if folder.is_file():
            seen[str(folder)] = hashlib.sha256(folder.read_bytes()).hexdigest()
        elif folder.is_dir():
            for p in sorted(folder.rglob("*")):
                seen[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir", p.stat().st_mode)
    return seen


def test_every_bad_input_is_one_line_and_exit_code_2(tmp_path):
    cache, hf = tmp_path / "cache", tmp_path / "hf"
    env = {**os.environ, "SELF_ENSEMBLE_CACHE": str(cache), "HF_HOME": str(hf), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HF_HUB_OFFLINE", None)
    good = jsonl(tmp_path / "good.jsonl", [*shots(), question(1), question(2)])
    out = tmp_path / "out"  # never created by a failing case

    # ---- made by runs that succeed (in this process, conftest.run_main): tables to resume with other settings, data
    # or while locked
    done = tmp_path / "done"
    made = [("generate.py", "--dataset", "jsonl", "--data-file", str(good), "--method", "avg", "--num_ensemble", "3",
             *TINY, "--output-dir", str(done)),
            ("flex_attention_generate.py", "--dataset", "jsonl", "--data-file", str(good), "--num_paraphrases", "3",
             "--attn", "sdpa", *TINY, "--output-dir", str(done)),
            ("generate.py", "--dataset", "jsonl", "--data-file", str(good), "--method", "weighted_avg", "--num_ensemble",
             "3", "--confidence-samples", "2", *TINY, "--output-dir", str(tmp_path / "weighted"))]
    for script, *args in made:
        proc = run_main(script, *args, env={"SELF_ENSEMBLE_CACHE": str(cache)})
        assert proc.returncode == 0, proc.stderr[-2000:]
    avg_run = list(made[0][1:])
    flex_run = list(made[1][1:])
    edited = jsonl(tmp_path / "edited.jsonl", [*shots(), question(1), question(2, answers=["b2"])])
    a_file = jsonl(tmp_path / "a_file.txt", ["not a folder"])
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root writes anywhere a mode forbids: take a folder the kernel refuses
        read_only = Path("/proc/1")
    bad = tmp_path / "bad"
    no_tables = tmp_path / "no_tables"
    no_tables.mkdir()
    (no_tables / "notes.txt").write_text("nothing to see\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "avg.feather").write_bytes(b"not a feather file")
    columns = tmp_path / "columns"
    columns.mkdir()
    pd.DataFrame({"uuid": ["q1"], "prediction": ["a"]}).to_feather(columns / "origin.feather")

    names = itertools.count()
    # ---- damaged files left by a crash or by hand: a result table on rerun, a confidence cache entry, 0 rows
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for suffix in (".feather", ".settings.json"):
        (corrupt / f"ensemble_avg-3{suffix}").write_bytes((done / f"ensemble_avg-3{suffix}").read_bytes())
    (corrupt / "ensemble_avg-3.feather").write_bytes((done / "ensemble_avg-3.feather").read_bytes()[:100])
    conf_cache = tmp_path / "conf_cache"
    (conf_cache / "confidence-cache").mkdir(parents=True)
    for entry in (tmp_path / "weighted" / "confidence-cache").glob("*.feather"):
        (conf_cache / "confidence-cache" / entry.name).write_bytes(b"ARROW1 torn")
    zero = tmp_path / "zero"
    zero.mkdir()
    pd.read_feather(done / "ensemble_avg-3.feather").iloc[:0].reset_index(drop=True).to_feather(zero / "avg.feather")
    weighted_run = ["--dataset", "jsonl", "--data-file", str(good), "--method", "weighted_avg", "--num_ensemble", "3",
                    "--confidence-samples", "2"]

    def data(*rows, raw: bytes | None = None) -> str:
        return str(jsonl(bad / f"data{next(names)}.jsonl", list(rows), raw))

    G, F, E, S = "generate.py", "flex_attention_generate.py", "evaluate.py", "sweep.py"
    # (script, arguments, what stderr must name, extra environment)
    cases = [
        # the data
        (G, ["--dataset", "jsonl", "--data-file", str(bad / "missing.jsonl")], "data file not found", None),
        (G, ["--dataset", "jsonl"], "--dataset jsonl needs --data-file", None),
        (G, ["--dataset", "jsonl", "--data-file", data()], "no records", None),
        (G, ["--dataset", "jsonl", "--data-file", data(*shots(), '{"uuid": "q1", "paraphrases": [')], ":6: malformed JSON", None),
        (G, ["--dataset", "jsonl", "--data-file", data(*shots(), "[1, 2]")], ":6: expected a JSON object", None),
        (G, ["--dataset", "jsonl", "--data-file", data(*shots(), {"paraphrases": ["q?"], "answers": ["a"]})], "missing 'uuid'", None),
        (G, ["--dataset", "jsonl", "--data-file", data(*shots(), question(1, paraphrases=[]))], "'paraphrases' must be", None),
        (G, ["--dataset", "jsonl", "--data-file", data(*shots(), question(1, paraphrases=["q?", 3]))], "'paraphrases' must be", None),
        (G, ["--dataset", "jsonl", "--data-file", data(*shots(), question(1, answers="a1"))], "'answers' must be a list", None),
        (G, ["--dataset", "jsonl", "--data-file", data(*shots(), question(1, answers=[])), "--num_ensemble", "3"], "has no gold answer", None),
        (G, ["--dataset", "jsonl", "--data-file", data(*shots(), question(1), question(1))], "duplicate uuid 'q1'", None),
        (G, ["--dataset", "jsonl", "--data-file", data(*[question(i) for i in range(5)])], "no questions left", None),
        (G, ["--dataset", "jsonl", "--data-file", data(raw=b'{"uuid": "q1", "paraphrases": ["caf\xe9?"]}\n')], "not UTF-8", None),
        (G, ["--dataset", "jsonl", "--data-file", str(good), "--num_ensemble", "5"], "fewer than the 5 asked for", None),
        (G, ["--dataset", "jsonl", "--data-file", str(good), "--num_ensemble", "3", "--model", "tiny-llama",
             "--max-new-tokens", "5000"], "more than the model's context", None),
        (G, ["--dataset", "myriadlama"], "myriadlama", {"HF_HUB_OFFLINE": "1"}),
        # the flags
        (G, ["--dataset", "nope"], "invalid choice: 'nope'", None),
        (G, ["--dtype", "float8"], "--dtype: invalid choice", None),
        (G, ["--seed", "abc"], "--seed: invalid int value", None),
        (G, ["--batch-size", "0"], "--batch-size must be at least 1", None),
        (G, ["--limit", "0"], "--limit must be at least 1", None),
        (G, ["--num_ensemble", "0"], "--num-ensemble) must be at least 1", None),
        (F, ["--num_ensemble", "0"], "--num-ensemble) must be at least 1", None),
        (G, ["--paraphrase-top-p", "1.5"], "--paraphrase-top-p in (0, 1]", None),
        (G, ["--device-map", "foo"], "--device-map 'foo'", None),
        (G, ["--model", "llama9000"], "not a model key", None),
        (G, ["--model", str(tmp_path)], "without config.json", None),
        (G, ["--model", "nobody/not-a-model-xyz"], "not in the hub cache", {"HF_HUB_OFFLINE": "1"}),
        (F, ["--attn", "sdpa", "--compile", "on"], "--compile on applies to --attn flex only", None),
        (F, ["--positions", "diagonal"], "--positions: invalid choice", None),
        (F, ["--fusion-bias", "confidence", "--confidence-samples", "0"], "--confidence-samples must be at least 1", None),
        # numbers, uuids, placeholders, few-shot counts, selections (issue 24, second round)
        (F, ["--fusion-temperature", "nan"], "expected a finite number, got 'nan'", None),
        (F, ["--fusion-temperature", "0"], "--fusion-temperature must be", None),
        (F, ["--fusion-bias", "sideways"], "--fusion-bias 'sideways'", None),
        (F, ["--fusion-bias", "inf"], "a numeric bias must be finite", None),
        (G, ["--paraphrase-temperature", "inf"], "expected a finite number", None),
        (G, ["--seed", str(2 ** 63)], "--seed must be in [0, 2^63 - 1]", None),
        (G, ["--num-fewshot", "-1"], "--num-fewshot must be 0 or more", None),
        (G, ["--dataset", "jsonl", "--data-file", data(*shots(), question(1, uuid=True))], "'uuid' must be a non-blank", None),
        (G, ["--dataset", "jsonl", "--data-file", data(*shots(), question(1, uuid=[1, 2]))], "'uuid' must be a non-blank", None),
        (G, ["--dataset", "jsonl", "--data-file", data(*shots(), question(1, uuid="   "))], "'uuid' must be a non-blank", None),
        (G, ["--dataset", "jsonl", "--data-file", data(raw=b'{"uuid": "q1", "paraphrases": ["\\ud800?"], "answers": ["a"]}\n')],
         "lone surrogate", None),
        (G, ["--dataset", "jsonl", "--data-file", data(raw=b"[" * 100000 + b"\n")], "nested too deeply", None),
        (G, ["--dataset", "jsonl", "--task", "mask", "--data-file", str(good)], "no [MASK] placeholder", None),
        (G, ["--output-dir", ""], "--output-dir ''", None),
        (G, ["--output-dir", str(tmp_path / ("x" * 300))], "longer than this file system's limit", None),
        (G, ["--dataset", "jsonl", "--data-file", str(good)], "SELF_ENSEMBLE_CACHE",
         {"SELF_ENSEMBLE_CACHE": str(a_file / "cache")}),
        (G, [*avg_run[:-1], str(corrupt)], "cannot read", None),
        (G, [*avg_run[:-1], str(corrupt), "--lemmaize"], "cannot read", None),
        (G, [*weighted_run, *TINY, "--output-dir", str(conf_cache)], "cannot read", None),
        (E, ["--results-dir", str(zero)], "no rows", None),
        (G, ["--method", "per_prompt", "--num_samples", "2"], "--num_samples chooses the paraphrases", None),
        (G, ["--repeat_paras"], "need --num_samples", None),
        (G, ["--dataset", "jsonl", "--data-file", str(good), "--num_manual", "1", "--num_auto", "1", "--num_samples", "2"],
         "need to know which paraphrases are manual", None),
        (S, ["--limit", "0"], "--limit must be at least 1", None),
        (S, ["--max-n", "abc"], "--max-n: invalid int value", None),
        (S, ["--dataset", "jsonl", "--data-file", str(good), "--max-n", "4"], "fewer than the 4 asked for", None),
        # the output folder
        (G, ["--output-dir", str(a_file)], "is a file, not a folder", None),
        (G, ["--output-dir", str(a_file / "below")], f"cannot be created: {a_file} is a file", None),
        (G, ["--output-dir", str(read_only / "results")], "is not writable by this user|read-only", None),
        # a table made before: resumed with other settings, other data, or while another process writes it
        (G, [*avg_run, "--max-new-tokens", "3"], "max_new_tokens: 2 -> 3", None),
        (G, [*[edited if a == str(good) else a for a in map(str, avg_run)]], "made with other settings (data: 'sha256:", None),
        (F, [*flex_run, "--attn", "flex"], "attn: 'sdpa' -> 'flex'", None),
        (G, avg_run, "is being written by another process (pid", "lock"),
        # the report
        (E, ["--results-dir", str(bad / "nowhere")], "results dir not found", None),
        (E, ["--results-dir", str(a_file)], "is a file, not a folder", None),
        (E, ["--results-dir", str(no_tables)], "no result tables", None),
        (E, ["--results-dir", str(broken)], "cannot read", None),
        (E, ["--results-dir", str(columns)], "missing columns answers, seconds", None),
        (E, ["--results-dir", str(done), "--output-dir", str(a_file)], "is a file, not a folder", None),
        (E, ["--results-dir", str(done), "--output-dir", str(a_file / "below")], "cannot be created", None),
        (E, ["--results-dir", str(done), "--output-dir", str(read_only / "report")], "not writable|read-only", None),
    ]
    if not torch.cuda.is_available():
        cases.append((G, ["--device", "cuda"], "no CUDA GPU", None))
    assert len(cases) >= 30

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    commands = Commands(env, scratch, fresh=os.environ.get("BAD_INPUT_SUBPROCESS") == "1")
    failures, start = [], time.perf_counter()
    for script, args, expected, extra in cases:
        args = [str(a) for a in args]
        if script != E and "--output-dir" not in args:
            args += ["--output-dir", str(out)]
        if script != E and "--model" not in args:
            args += TINY
        watched = [out, cache, hf, done, a_file, tmp_path / "read_only", no_tables, broken, columns, bad, corrupt,
                   conf_cache, zero]
        before = snapshot(*watched)
        lock = TableLock(done / "ensemble_avg-3.feather").acquire() if extra == "lock" else None
        try:
            proc = commands.run(script, *args, extra_env=extra if isinstance(extra, dict) else None)
        finally:
            if lock:
                lock.release()
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        problems = []
        if proc.returncode != 2:
            problems.append(f"exit code {proc.returncode}")
        if len(lines) != 1:
            problems.append(f"{len(lines)} lines on stderr")
        elif not re.search(re.escape(expected) if "|" not in expected else expected, lines[0]):
            problems.append(f"stderr does not name {expected!r}")
        if snapshot(*watched) != before:
            problems.append("files created or changed")
        if problems:
            failures.append(f"{script} {' '.join(args)}: {'; '.join(problems)}\n    {proc.stderr[-600:]}")
    seconds = time.perf_counter() - start
    commands.close()
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
    print(f"{len(cases)} bad inputs, each one line and exit code 2, in {seconds:.0f} s")
