"""Hostile model folders and settings (issue 37): a model's own Python code is never run, and an empty
SELF_ENSEMBLE_CACHE is no cache folder in the current directory."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import models
from conftest import run_main
from constants import REPO_DIR, InputError


def test_a_models_own_code_is_never_run(tmp_path):
    """A folder whose config points at its own Python file (auto_map): transformers would ask on stdin and run
    it on a "y"; we never let it. With a model type transformers does not know, the load fails in one line."""
    model, tokenizer = models.tiny_model("llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="evil_model", auto_map={"AutoConfig": "evil.EvilConfig",
                                                    "AutoModelForCausalLM": "evil.EvilModel"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as err:
        models.load_model(str(tmp_path), device="cpu")
    assert "\n" not in str(err.value) and not marker.exists()
    run = run_main("generate.py", "--model", str(tmp_path), "--limit", "1", "--no-progress", "--output-dir",
                   str(tmp_path / "out"), input="y\ny\n")
    assert run.returncode == 2 and not marker.exists(), run.stderr[-2000:]
    assert len(run.stderr.strip().splitlines()) == 1 and "Do you wish to run" not in run.stdout


def test_an_empty_cache_variable_is_the_default_folder(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import constants; print(constants.CACHE_DIR)"], cwd=REPO_DIR,
                         env={"SELF_ENSEMBLE_CACHE": "", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(tmp_path / ".cache" / "self-ensemble")
