"""Every command the README shows runs, at its defaults: `make demo`'s commands (read from the Makefile),
the report, the sweep, the example and the notebook snippet. The data may be shortened (--limit), the
decode never is."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import follow_environment, run_main
from constants import REPO_DIR

README = (REPO_DIR / "README.md").read_text(encoding="utf-8")
LIMIT = ["--limit", "2"]
pytestmark = pytest.mark.embedded


def demo_commands() -> list[list[str]]:
    """The python commands of `make demo`, as the Makefile runs them (N = 5)."""
    recipe = re.search(r"^demo:.*?\n((?:\t.*\n)+)", (REPO_DIR / "Makefile").read_text(), re.M).group(1)
    lines = [l.strip().replace("$(BIN)/python", sys.executable).replace("$(N)", "5") for l in recipe.splitlines()]
    return [shlex.split(l) for l in lines if l.startswith(sys.executable)]


def readme_commands(prefix: str) -> list[list[str]]:
    """The README's shell lines that start with `prefix`, comments and [optional] parts dropped."""
    lines = re.findall(rf"^{re.escape(prefix)}(.*)$", README, re.M)
    return [shlex.split(re.sub(r"\[.*?\]|#.*$", "", line)) for line in lines]


def run(argv: list[str]) -> str:
    """`python script args` (argv[0] is the interpreter), offline, in this process (conftest.run_main): the
    commands are the README's; `make study` below runs them as processes, through make."""
    assert argv[0] == sys.executable
    done = run_main(*argv[1:], env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, f"{shlex.join(argv[1:])}: {done.stderr[-2000:]}"
    return done.stdout


def test_make_demo_then_the_readme_report(tmp_path):
    commands = demo_commands()
    assert [c[1] for c in commands] == ["generate.py", "generate.py", "flex_attention_generate.py", "evaluate.py"]
    out = tmp_path / "results"
    for command in commands:
        if command[1] == "evaluate.py":
            run([*command[:2], "--results-dir", str(out)])
        else:
            run([*command, *LIMIT, "--output-dir", str(out), "--no-progress"])
    assert (out / "flex_attention-5.feather").exists() and (out / "report.png").exists()
    evaluate = [c for c in readme_commands(".venv/bin/python ") if c[0] == "evaluate.py"]
    assert evaluate, "the README shows evaluate.py"
    for command in evaluate:  # its --results-dir is the demo's folder: here, the one just written
        args = [a if a != "results/webqa_sample/smollm2_135m_it" else str(out) for a in command[1:]]
        run([sys.executable, "evaluate.py", *args, "--output-dir", str(tmp_path / "report")])
    assert (tmp_path / "report" / "questions.csv").exists()


def test_readme_sweep(tmp_path):
    sweeps = [c for c in readme_commands(".venv/bin/python ") if c[0] == "sweep.py"]
    assert sweeps
    for command in sweeps:
        out = run([sys.executable, *command, "--limit", "1", "--no-progress", "--output-dir", str(tmp_path)])
        assert "[17/17]" in out  # per_prompt, then avg, avg_prob, max and fusion for N = 2..5
    assert len(list(tmp_path.glob("*.feather"))) == 17 and (tmp_path / "report.md").exists()


TEMPLATES = ("The capital of {} is [MASK].", "{}'s capital city is [MASK].", "{} has its capital in [MASK].",
             "The capital city of {} is [MASK].", "[MASK] is the capital of {}.")


def mask_facts(path: Path) -> Path:
    """A few facts in the MyriadLAMA dev facts' format (JSONL, [MASK] prompts, the first rows the examples)."""
    facts = [("France", "Paris", "train"), ("Japan", "Tokyo", "train"), ("Italy", "Rome", "train"),
             ("Spain", "Madrid", "test"), ("Peru", "Lima", "test")]
    rows = [{"uuid": f"fact{i}", "paraphrases": [t.format(x) for t in TEMPLATES], "answers": [y], "split": split,
             **({"half": ("choose", "confirm")[i % 2]} if split == "test" else {})}
            for i, (x, y, split) in enumerate(facts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_make_study_runs_the_protocol_on_both_dev_sets(tmp_path):
    """`make study` as the Makefile has it (N = 5, the whole grid): choose halves, the pick, confirm halves, on
    one question per half; a few facts in their format, with their halves, stand in for the MyriadLAMA dev facts."""
    bin_dir = os.path.dirname(sys.executable)
    facts = mask_facts(tmp_path / "facts.jsonl")
    done = subprocess.run(["make", "-s", "-o", "model", "study", f"BIN={bin_dir}", f"STUDY_DIR={tmp_path}",
                           "STUDY_ARGS=--limit 1 --no-progress --max-new-tokens 4", f"MYRIADLAMA_DEV={facts}"],
                          cwd=REPO_DIR, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    for dev_set in ("webqa_dev", "myriadlama_dev"):
        from sweep import STUDY_GRID  # the choose half: the default and every variant of the grid, nothing else
        assert {p.name for p in (tmp_path / dev_set / "choose").glob("*.feather")} == {
            "flex_attention-5.feather", *(v.table_name(5) for v in STUDY_GRID)}
        confirm = tmp_path / dev_set / "confirm"
        assert {p.name for p in confirm.glob("*.feather")} >= {"per_prompt.feather", "ensemble_avg-5.feather",
                                                              "ensemble_self_consistency-5.feather",
                                                              "flex_attention-5.feather"}
        assert len(list(confirm.glob("syncedsample_*-repeat.feather"))) >= 2  # the repeat controls
        assert len(list((confirm / "diversity").glob("flex_attention-*.feather"))) == 5  # each left out
    pick = json.loads((tmp_path / "pick.json").read_text())
    assert pick["rule"] and pick["reason"] and pick["pick"] in pick["candidates"]
    study = (tmp_path / "study.md").read_text()
    assert "confirm halves" in study and "## webqa_dev" in study and "## myriadlama_dev" in study
    assert "Leave-one-out" in study and (tmp_path / "study.pdf").exists()


def test_readme_notebook_snippet_runs(monkeypatch, capsys):
    """As a notebook runs it: in the process that has imported the libraries already (from the repo, offline)."""
    snippet = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(REPO_DIR)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    follow_environment(monkeypatch, "HF_HUB_OFFLINE", "1")
    exec(compile(snippet, "<README snippet>", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out  # an exception above fails the test, as the snippet's exit code did
    assert "prediction" in out and "exact" in out


@pytest.mark.parametrize("target", ["test-fast", "gemma"])
def test_the_other_make_targets_the_readme_names_resolve(target):
    """make test-fast (a selection of this suite: running it here would run its tests twice) and make gemma (what
    .ci/run does first) resolve to their commands, and test-fast's files exist."""
    assert f"`make {target}`" in README
    done = subprocess.run(["make", "-n", target, f"BIN={os.path.dirname(sys.executable)}", "-o", "setup"],
                          cwd=REPO_DIR, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    if target == "test-fast":
        command = next(line for line in done.stdout.splitlines() if "pytest" in line)  # under make: "make[1]: ..."
        patterns = [a for a in shlex.split(command) if a.startswith("tests/")]
        files = [f for pattern in patterns for f in REPO_DIR.glob(pattern)]
        assert len(patterns) >= 4 and len(files) >= 10 and all(f.is_file() for f in files)
    else:
        assert "packaged_model_dir('gemma3_270m')" in done.stdout
