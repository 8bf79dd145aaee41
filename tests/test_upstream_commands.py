"""Issue 16: every command of upstream's README and quick start runs here, offline, with upstream's flags and
meaning (exit code 0); then the upstream flags this tree added (--indexs, --lemmaize, --max-tokens, -v,
--verbose, download_resources.sh --list/--dataset-only/--spacy, --device cuda:0) and each table's provenance.

Upstream is github.com/GuoYibo233/self-ensemble. The commands are copied from its README.md (at its newest
commit, the src/ scripts' README) and its quick start (archived/docs/QUICKSTART.md), the flags its older
top-level README adds (commit f26ac93), and the research scripts that used the flags this tree reproduces
(archived/scripts/ensemble.sh, diversity.sh, lemmaize_ensemble.sh). Upstream's scripts have other names here:
src/generate_original.py, src/generate_baseline.py, baseline_generate.py -> generate.py (--method all: origin
then per_prompt); src/generate_flex_attention.py, src/generate_myriadlama.py -> flex_attention_generate.py;
tools/X -> X.

Each command is run with its own arguments and a few appended (argparse: the last value wins), only these:
  --model tiny-llama   upstream's llama3.2_3b_it is gated on the Hugging Face hub and 6 GB: it cannot load offline
  --limit 1            (or --max-samples 1) one question: the whole datasets take hours on a CPU
  --max-new-tokens 2   where upstream did not choose a small value itself
  --data-file data/myriadlama_fixture.jsonl   MyriadLAMA is on the hub only; the fixture is its local copy
  --output-dir TMP, --no-progress             results go to the test's folder
--dataset webqa needs nothing: offline it reads the bundled WebQuestions copy, and the model paraphrases it.
download_resources.sh downloads: offline it must fail fast with one line and exit code 1 (checked as such).

Not run, and why (NOT_RUN lists them): upstream's interactive menu (src/run_interactive.py: no such tool here),
its environment setup (conda, pip) and spaCy's own downloader (python -m spacy download: see --spacy).

Runs are in this process (runpy, the scripts' real entry point: torch is imported once), the shell script as a
subprocess. HF_HUB_OFFLINE=1 and a private cache (paraphrases) for the whole module.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from constants import REPO_DIR

FIXTURE = str(REPO_DIR / "data" / "myriadlama_fixture.jsonl")
TINY = ["--model", "tiny-llama", "--no-progress"]


def gen(*extra: str) -> list[str]:
    """The overrides of a generator command: tiny model, one question, two new tokens."""
    return [*TINY, "--limit", "1", "--max-new-tokens", "2", *extra]


# (where upstream wrote it, the command as upstream wrote it, our script, the overrides, expected exit code,
#  files it must leave under the output folder)
DOWNLOAD_OFFLINE = 1  # download_resources.sh offline: one line on stderr, exit code 1 (nothing to download from)
COMMANDS = [
    ("README.md", "python src/generate_original.py --method avg --dataset webqa --model llama3.2_3b_it "
                  "--num_ensemble 6",
     "generate.py", gen(), 0, ["ensemble_avg-6.feather"]),
    ("README.md", "python src/generate_flex_attention.py --dataset webqa --model llama3.2_3b_it --num_paraphrases 5",
     "flex_attention_generate.py", gen(), 0, ["flex_attention-5.feather"]),
    ("README.md", "python src/generate_myriadlama.py --dataset myriadlama --model llama3.2_3b_it --num_paraphrases 5",
     "flex_attention_generate.py", gen("--data-file", FIXTURE), 0, ["flex_attention-5.feather"]),
    ("README.md", "python src/generate_baseline.py --method all --dataset webqa --model llama3.2_3b_it",
     "generate.py", gen(), 0, ["origin.feather", "per_prompt.feather"]),
    ("README.md", "python src/generate_original.py --help", "generate.py", [], 0, []),
    ("QUICKSTART.md", "python3 tools/validate_flexattention_env.py --test-flex-attention",
     "validate_flexattention_env.py", [], 0, []),
    ("QUICKSTART.md", "bash tools/download_resources.sh --dataset webqa --model llama3.2_3b_it",
     "download_resources.sh", [], DOWNLOAD_OFFLINE, []),
    ("QUICKSTART.md", "python3 tools/debug_flexattention.py --dataset webqa --model llama3.2_3b_it --max-samples 1 "
                      "--max-tokens 5 --verbose", "debug_flexattention.py", TINY, 0, ["mask-01-*.png"]),
    ("QUICKSTART.md", "python3 flex_attention_generate.py --dataset webqa --model llama3.2_3b_it --num_paraphrases 5",
     "flex_attention_generate.py", gen(), 0, ["flex_attention-5.feather"]),
    ("QUICKSTART.md", "python3 tools/debug_flexattention.py --dataset webqa --model llama3.2_3b_it --max-samples 1 "
                      "--verbose", "debug_flexattention.py", [*TINY, "--max-new-tokens", "2"], 0, ["mask-01-*.png"]),
    ("QUICKSTART.md", "python3 tools/debug_flexattention.py --dataset webqa --model llama3.2_3b_it --indexs 0,1,2 "
                      "--max-samples 1", "debug_flexattention.py", [*TINY, "--max-new-tokens", "2"], 0,
     ["mask-01-*.png"]),
    ("QUICKSTART.md", "python3 tools/validate_flexattention_env.py", "validate_flexattention_env.py", [], 0, []),
    ("QUICKSTART.md", "python3 tools/validate_flexattention_env.py --test-flex-attention --verbose",
     "validate_flexattention_env.py", [], 0, []),
    ("QUICKSTART.md", "bash tools/download_resources.sh --list", "download_resources.sh", [], 0, []),
    ("QUICKSTART.md", "bash tools/download_resources.sh --dataset-only webqa", "download_resources.sh", [],
     DOWNLOAD_OFFLINE, []),
    ("QUICKSTART.md", "bash tools/download_resources.sh --spacy", "download_resources.sh", [], DOWNLOAD_OFFLINE, []),
    ("QUICKSTART.md", "python3 flex_attention_generate.py --dataset webqa --model llama3.2_3b_it --indexs 0,1,2,3,4",
     "flex_attention_generate.py", gen(), 0, ["diversity/flex_attention-0,1,2,3,4.feather"]),
    ("QUICKSTART.md", "python3 flex_attention_generate.py --dataset webqa --model llama3.2_3b_it --num_paraphrases 5 "
                      "--lemmaize", "flex_attention_generate.py", gen(), 0, ["flex_attention-5.feather"]),
    ("QUICKSTART.md", "python3 flex_attention_generate.py --dataset webqa --model llama3.2_3b_it --device cpu",
     "flex_attention_generate.py", gen(), 0, ["flex_attention-5.feather"]),
    # the top-level README before upstream moved its scripts to src/ (commit f26ac93): flags the above lack
    ("README.md@f26ac93", "python3 flex_attention_generate.py --dataset webqa --model llama3.2_3b_it "
                          "--num_paraphrases 5 --max_samples 100", "flex_attention_generate.py", gen(), 0,
     ["flex_attention-5.feather"]),
    ("README.md@f26ac93", "python3 baseline_generate.py --method origin --dataset webqa --model llama3.2_3b_it",
     "generate.py", gen(), 0, ["origin.feather"]),
    ("scripts/ensemble.sh", "python3 ../src/generate_original.py --model llama3.2_3b_it --dataset webqa "
                            "--num_ensemble 2 --method max", "generate.py", gen(), 0, ["ensemble_max-2.feather"]),
    ("scripts/ensemble.sh", "python3 ../src/generate_original.py --model llama3.2_3b_it --dataset webqa "
                            "--num_ensemble 2 --method weighted_avg", "generate.py", gen(), 0,
     ["ensemble_weighted_avg-2.feather"]),
    ("scripts/diversity.sh", "python3 ../src/generate_original.py --model llama3.2_3b_it --dataset webqa "
                             "--indexs 0,1 --method weighted_avg", "generate.py", gen(), 0,
     ["diversity/ensemble_weighted_avg-0,1.feather"]),
    ("scripts/lemmaize_ensemble.sh", "python3 ../src/generate_original.py --model llama3.2_3b_it --dataset webqa "
                                     "--num_ensemble 2 --lemmaize --method max", "generate.py", gen(), 0,
     ["ensemble_max-2.feather"]),
]
NOT_RUN = {
    "python src/run_interactive.py": "upstream's interactive menu that builds one of the commands above; no such tool",
    "conda env create -f environment_linux.yml (and the other setup lines)": "setup: make setup here",
    "python3 -m spacy download en_core_web_lg": "spaCy's downloader (network); download_resources.sh --spacy wraps it",
}
# A --lemmaize command rewrites the table the same command without --lemmaize made: that one runs first.
LEMMAIZE_NEEDS = {"--num_paraphrases 5 --lemmaize": "flex_attention_generate.py", "--num_ensemble 2 --lemmaize":
                  "generate.py"}


def our_args(upstream: str) -> list[str]:
    """Upstream's arguments, as written (everything after the script)."""
    words = upstream.split()
    script = next(i for i, w in enumerate(words) if w.endswith((".py", ".sh")))
    return words[script + 1:]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One output folder and one paraphrase cache for the module (WebQA's paraphrases are made once), offline."""
    import datasets
    import huggingface_hub

    import paraphrase
    root = tmp_path_factory.mktemp("upstream")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        # the libraries read it at import, which happened before: without these they retry the hub for ~20 s
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(paraphrase, "CACHE_DIR", root / "cache")
        yield root


def output_folder(workspace: Path, upstream: str) -> Path:
    """results/<dataset>, as upstream kept one folder per dataset (and model)."""
    words = upstream.split()
    return workspace / "out" / (words[words.index("--dataset") + 1] if "--dataset" in words else "none")


def run_script(script: str, args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """A Python script as __main__ in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(REPO_DIR / script), *args])
    monkeypatch.chdir(REPO_DIR)
    try:
        runpy.run_path(str(REPO_DIR / script), run_name="__main__")
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def run_shell(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    """download_resources.sh offline: the hub and GitHub unreachable at once (a closed local port)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9", "SPACY_MODELS_URL":
           "http://127.0.0.1:9", "SELF_ENSEMBLE_CACHE": str(cache)}
    return subprocess.run([str(REPO_DIR / "download_resources.sh"), *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=REPO_DIR)


def stub_compile_on_cpu(monkeypatch) -> None:
    """validate --test-flex-attention: on a CPU its compiled-flex check spends ~20 s compiling to end in a
    warning; a compile that fails at once ends in the same warning (test_tools checks that branch)."""
    import torch
    if torch.cuda.is_available():
        return
    real = torch.compile

    def failing(*a, **k):
        if "backend" in k:  # eager flex_attention compiles itself with backend="eager"
            return real(*a, **k)
        raise RuntimeError("compile skipped by the test")
    monkeypatch.setattr(torch, "compile", failing)


def run_command(source: str, upstream: str, script: str, extra: list[str], out: Path, monkeypatch, capsys):
    args = our_args(upstream)
    if script == "download_resources.sh":
        done = run_shell(args, out / "download-cache")
        return done.returncode, done.stdout, done.stderr
    if script == "validate_flexattention_env.py":
        stub_compile_on_cpu(monkeypatch)
    output = ["--output-dir", str(out)] if extra else []
    return run_script(script, [*args, *extra, *output], monkeypatch, capsys)


@pytest.mark.parametrize("source, upstream, script, extra, expected, files", COMMANDS,
                         ids=[f"{c[0]}:{i}" for i, c in enumerate(COMMANDS)])
def test_upstream_command_runs_offline(source, upstream, script, extra, expected, files, workspace, monkeypatch,
                                       capsys):
    out = output_folder(workspace, upstream)
    for needle, prerequisite in LEMMAIZE_NEEDS.items():
        if needle in upstream:  # the table it rewrites: the same command without --lemmaize
            first = upstream.replace(" --lemmaize", "")
            code, stdout, stderr = run_command(source, first, prerequisite, extra, out, monkeypatch, capsys)
            assert code == 0, stdout + stderr
    code, stdout, stderr = run_command(source, upstream, script, extra, out, monkeypatch, capsys)
    assert code == expected, f"{upstream}\n{stdout}\n{stderr}"
    for pattern in files:
        assert list(out.glob(pattern)), f"{upstream}: no {pattern} in {sorted(p.name for p in out.rglob('*'))}"
    if expected == DOWNLOAD_OFFLINE and script == "download_resources.sh":
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("download_resources.sh: "), stderr
    if "--lemmaize" in upstream:
        table = pd.read_feather(next(out.glob(files[0])))
        assert {"predict_lemma", "answer_lemmas"} <= set(table.columns)
    if "--help" in upstream:
        assert "usage:" in stdout and "--indexs" in stdout and "--lemmaize" in stdout
    if "validate_flexattention_env.py" in upstream:
        assert "[pass] python:" in stdout and ("environment:" in stdout) == ("--verbose" in upstream)


# ---------------------------------------------------------------- --indexs: upstream's diversity runs

def write_questions(path: Path, count: int = 2) -> Path:
    rows = [{"uuid": "s1", "paraphrases": ["what color is the sky?"], "answers": ["blue"], "split": "train"}]
    rows += [{"uuid": f"q{i}", "paraphrases": [f"capital of country {i}?", f"country {i}'s capital?",
                                               f"which city is the capital of country {i}?"], "answers": [f"city {i}"]}
             for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def jsonl_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "jsonl", "--data-file", str(data), *TINY, "--max-new-tokens", "3", "--output-dir", str(out),
            *extra]


def test_indexs_fuses_the_chosen_paraphrases(tmp_path, monkeypatch, capsys):
    """--indexs 2,0: exactly paraphrases 2 and 0 in that order, N = 2, in upstream's diversity/ file; and
    --indexs 0,1,2 gives the same answers as the first 3 paraphrases (--num_paraphrases 3)."""
    data, out = write_questions(tmp_path / "q.jsonl"), tmp_path / "out"
    code, stdout, stderr = run_script("generate.py", jsonl_args(data, out, "--method", "avg", "--indexs", "2,0"),
                                      monkeypatch, capsys)
    assert code == 0, stdout + stderr
    table = pd.read_feather(out / "diversity" / "ensemble_avg-2,0.feather")
    assert [list(p) for p in table["paraphrases"]] == [["which city is the capital of country 0?",
                                                        "capital of country 0?"],
                                                       ["which city is the capital of country 1?",
                                                        "capital of country 1?"]]
    assert set(table["num_ensemble"]) == {2}
    assert json.loads((out / "diversity" / "ensemble_avg-2,0.settings.json").read_text())["indexs"] == "2,0"
    for args in (["--indexs", "0,1,2"], ["--num_paraphrases", "3"]):
        assert run_script("flex_attention_generate.py", jsonl_args(data, out, *args), monkeypatch, capsys)[0] == 0
    chosen = pd.read_feather(out / "diversity" / "flex_attention-0,1,2.feather")
    first = pd.read_feather(out / "flex_attention-3.feather")
    assert chosen["token_ids"].map(list).tolist() == first["token_ids"].map(list).tolist()
    assert not (out / "flex_attention-3.feather").samefile(out / "diversity" / "flex_attention-0,1,2.feather")


@pytest.mark.parametrize("args, message", [
    (["--indexs", "0,5"], "--indexs 0,5: "),
    (["--indexs", "0,x"], "comma-separated paraphrase indices"),
    (["--indexs", "1,1"], "names a paraphrase twice"),
    (["--indexs", "0,1", "--num_ensemble", "3"], "chooses 2 paraphrases but N (--num_ensemble / --num_paraphrases) is 3"),
    (["--indexs", "0,1", "--method", "per_prompt"], "--method per_prompt is no ensemble"),
])
def test_indexs_mistakes_are_one_line(args, message, tmp_path, monkeypatch, capsys):
    data, out = write_questions(tmp_path / "q.jsonl"), tmp_path / "out"
    code, stdout, stderr = run_script("generate.py", jsonl_args(data, out, *args), monkeypatch, capsys)
    assert code == 2 and stderr.count("\n") == 1 and message in stderr, stderr
    assert not out.exists()


# ---------------------------------------------------------------- --lemmaize

def test_lemmaize_adds_upstreams_columns_and_nothing_else(tmp_path, monkeypatch, capsys):
    import scoring
    from results import read_table

    data, out = write_questions(tmp_path / "q.jsonl", 3), tmp_path / "out"
    args = jsonl_args(data, out, "--method", "max", "--num_ensemble", "2", "--limit", "2")
    code, stdout, stderr = run_script("generate.py", [*args, "--lemmaize"], monkeypatch, capsys)
    assert code == 2 and "run the same command without --lemmaize first" in stderr and not out.exists()
    assert run_script("generate.py", args, monkeypatch, capsys)[0] == 0
    table = out / "ensemble_max-2.feather"
    before = read_table(table)
    code, stdout, _ = run_script("generate.py", [*args, "--lemmaize"], monkeypatch, capsys)
    assert code == 0 and "lemma columns added" in stdout
    after = read_table(table)
    pd.testing.assert_frame_equal(after.drop(columns=["predict_lemma", "answer_lemmas"]), before)
    assert after["predict_lemma"].tolist() == [scoring.lemmas(p) for p in before["prediction"]]
    assert [[list(a) for a in row] for row in after["answer_lemmas"]] == [
        [scoring.lemmas(a) for a in answers] for answers in before["answers"]]
    assert "predict_lemma" in json.loads(table.with_suffix(".jsonl").read_text().splitlines()[0])
    digest = hashlib.sha256(table.read_bytes()).hexdigest()
    code, stdout, _ = run_script("generate.py", [*args, "--lemmaize"], monkeypatch, capsys)
    assert code == 0 and "already there" in stdout and hashlib.sha256(table.read_bytes()).hexdigest() == digest
    # a lemmaized table resumed with more questions: the new rows get their lemmas too
    assert run_script("generate.py", [*args, "--limit", "3"], monkeypatch, capsys)[0] == 0
    grown = read_table(table)
    assert len(grown) == 3 and grown["predict_lemma"].tolist() == [scoring.lemmas(p) for p in grown["prediction"]]


# ---------------------------------------------------------------- the other upstream spellings

def test_debug_max_tokens_and_v_are_upstreams_spellings(tmp_path, monkeypatch, capsys):
    data = write_questions(tmp_path / "q.jsonl")
    code, stdout, stderr = run_script("debug_flexattention.py", [
        "--dataset", "jsonl", "--data-file", str(data), *TINY, "--max-samples", "1", "--num-paraphrases", "2",
        "--max-tokens", "3", "-v", "--output-dir", str(tmp_path / "d")], monkeypatch, capsys)
    assert code == 0, stdout + stderr
    steps = re.findall(r"^\s+step\s+\d+: .*\| top-", stdout, re.M)
    assert 1 <= len(steps) <= 3  # --max-tokens 3 (the default is 16)
    assert "layer" in stdout  # -v: every layer's isolation diff


def test_validate_verbose(monkeypatch, capsys):
    code, stdout, _ = run_script("validate_flexattention_env.py", ["-v", "--json"], monkeypatch, capsys)
    checks = json.loads(stdout)
    assert isinstance(checks, list) and all(c["seconds"] >= 0 for c in checks)
    assert code == (1 if any(c["status"] == "fail" for c in checks) else 0)


def test_device_cuda_0(tmp_path, monkeypatch, capsys):
    """--device cuda:0 is accepted: it runs where a GPU is, and without one says so in one line (exit code 2)."""
    import torch
    data = write_questions(tmp_path / "q.jsonl")
    code, stdout, stderr = run_script("generate.py", jsonl_args(data, tmp_path / "out", "--device", "cuda:0",
                                                                "--num_ensemble", "2"), monkeypatch, capsys)
    if torch.cuda.is_available():
        assert code == 0, stdout + stderr
    else:
        assert code == 2 and stderr.count("\n") == 1 and "--device cuda:0: no CUDA GPU is visible" in stderr


def test_download_list_and_spacy_offline(tmp_path):
    listed = run_shell(["--list"], tmp_path / "cache")
    assert listed.returncode == 0, listed.stderr
    for name in ("webqa", "stanfordnlp/web_questions", "myriadlama", "iszhaoxin/MyriadLAMA", "llama3.2_3b_it",
                 "smollm2_135m_it", "tiny-llama", "en_core_web_sm"):
        assert name in listed.stdout, name
    assert not (tmp_path / "cache").exists()  # --list creates and downloads nothing
    spacy = run_shell(["--spacy"], tmp_path / "cache")
    if "installed already" in spacy.stdout:
        assert spacy.returncode == 0
    else:
        assert spacy.returncode == 1 and spacy.stderr.count("\n") == 1
        assert "needs the network" in spacy.stderr and "-m spacy download en_core_web_sm" in spacy.stderr
    only = run_shell(["--dataset-only"], tmp_path / "cache")
    assert only.returncode == 2 and "--dataset-only needs a value" in only.stderr


# ---------------------------------------------------------------- provenance

def test_provenance_is_kept_and_never_blocks_a_resume(tmp_path, monkeypatch, capsys):
    """The settings file keeps the run's provenance; a resume by another commit is allowed and recorded in
    resumed_with; a changed setting is still refused; report.md lists each table's provenance."""
    import torch
    import transformers

    data, out = write_questions(tmp_path / "q.jsonl", 3), tmp_path / "out"
    args = jsonl_args(data, out, "--method", "avg", "--num_ensemble", "2", "--limit", "1")
    assert run_script("generate.py", args, monkeypatch, capsys)[0] == 0
    sidecar = out / "ensemble_avg-2.settings.json"
    kept = json.loads(sidecar.read_text())
    prov = kept["provenance"]
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", prov["git_commit"]) and prov["git_dirty"] in (True, False, None)
    assert (prov["torch"], prov["transformers"]) == (torch.__version__, transformers.__version__)
    assert (prov["model"], prov["device"], prov["dtype"]) == ("tiny-llama", "cpu", "float32")
    assert "model_revision" in prov
    kept["provenance"] = {**prov, "git_commit": "0" * 40, "git_dirty": False, "torch": "1.0"}  # an older checkout
    sidecar.write_text(json.dumps(kept))
    code, stdout, stderr = run_script("generate.py", [*args, "--limit", "2"], monkeypatch, capsys)
    assert code == 0, stdout + stderr
    resumed = json.loads(sidecar.read_text())
    assert resumed["provenance"]["git_commit"] == "0" * 40 and resumed["resumed_with"] == [prov]
    assert len(pd.read_feather(out / "ensemble_avg-2.feather")) == 2
    code, _, stderr = run_script("generate.py", [*args, "--seed", "1"], monkeypatch, capsys)
    assert code == 2 and "seed: 0 -> 1" in stderr
    assert run_script("evaluate.py", ["--results-dir", str(out)], monkeypatch, capsys)[0] == 0
    report = (out / "report.md").read_text()
    section = report[report.index("## Provenance"):]
    row = next(line for line in section.splitlines() if line.startswith("| ensemble_avg-2.feather"))
    assert "| 000000000000 |" in row and "| 1.0 |" in row and "tiny-llama" in row and "| cpu | float32 |" in row
    assert row.rstrip(" |").endswith(prov["git_commit"][:12] + (" (dirty)" if prov["git_dirty"] else ""))


def test_git_state_unknown_without_git(monkeypatch, tmp_path):
    import results
    results.git_state.cache_clear()
    try:
        monkeypatch.setenv("PATH", str(tmp_path))  # no git program
        assert results.git_state() == ("unknown", None)
        results.git_state.cache_clear()
        monkeypatch.undo()
        monkeypatch.setattr(results, "REPO_DIR", tmp_path)  # a copy of the project outside any checkout
        assert results.git_state() == ("unknown", None)
    finally:
        results.git_state.cache_clear()


def test_check_settings_keeps_provenance_apart(tmp_path):
    from constants import InputError
    from results import ResultWriter, check_settings

    table = tmp_path / "t.feather"
    check_settings(table, {"seed": 0, "provenance": {"git_commit": "a"}})
    ResultWriter(table).append([{"uuid": "q1"}])  # rows exist: the settings are a table's, not a crashed run's
    check_settings(table, {"seed": 0, "provenance": {"git_commit": "b"}})
    check_settings(table, {"seed": 0, "provenance": {"git_commit": "b"}})  # recorded once
    check_settings(table, {"seed": 0, "provenance": {"git_commit": "a"}})  # the creator's: nothing to add
    kept = json.loads(table.with_suffix(".settings.json").read_text())
    assert kept == {"seed": 0, "provenance": {"git_commit": "a"}, "resumed_with": [{"git_commit": "b"}]}
    with pytest.raises(InputError, match="seed: 0 -> 1"):
        check_settings(table, {"seed": 1, "provenance": {"git_commit": "a"}})
