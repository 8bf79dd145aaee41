"""The debug tool decodes exactly what flex_attention_generate.py decodes for the same flags: the same
token ids, question by question, for the default and for every fusion variant a user can step through."""
from __future__ import annotations

import json
import re
import runpy
import sys

import pandas as pd
import pytest

from constants import REPO_DIR

VARIANTS = {
    "default": ([], "flex_attention-3.feather"),
    "no bias": (["--fusion-bias", "none"], "flex_attention-3-bias_none.feather"),
    "temperature": (["--fusion-temperature", "0.7"], "flex_attention-3-t0.7.feather"),
    "right": (["--positions", "right"], "flex_attention-3-right.feather"),
    "fused few-shot": (["--fewshot-format", "fused"], "flex_attention-3-fewshot_fused.feather"),
    "confidence": (["--fusion-bias", "confidence", "--confidence-samples", "2"],
                   "flex_attention-3-bias_confidence.feather"),
    "agreement": (["--fusion-bias", "agreement"], "flex_attention-3-bias_agreement.feather"),
    "shares": (["--fusion-bias", "shares"], "flex_attention-3-bias_shares.feather"),
    "beside singles": (["--beside", "singles"], "flex_attention-3-beside_singles_w0.5.feather"),
    "beside prior": (["--beside", "prior", "--beside-weight", "1"], "flex_attention-3-beside_prior_w1.feather"),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two few-shot rows with paraphrases of their own (the fused format shows them) and three questions."""
    rows = [{"uuid": "s1", "paraphrases": ["what color is the sky?", "the sky is which colour?"], "answers": ["blue"],
             "split": "train"},
            {"uuid": "s2", "paraphrases": ["how many legs has a cat?", "a cat's legs: how many?"], "answers": ["four"],
             "split": "train"}]
    rows += [{"uuid": f"q{i}", "paraphrases": [f"question {i} about paris?", f"asked another way {i}?",
                                                f"and a third time, {i}?"], "answers": ["x"]} for i in range(3)]
    path = tmp_path_factory.mktemp("parity") / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(script: str, args: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [str(REPO_DIR / script), *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_DIR / script), run_name="__main__")
    out = capsys.readouterr()
    assert exit_info.value.code == 0, out.err
    return out.out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_debug_tool_decodes_what_the_command_decodes(variant, data, tmp_path, monkeypatch, capsys):
    flags, table = VARIANTS[variant]
    common = ["--dataset", "jsonl", "--data-file", str(data), "--model", "tiny-llama", "--num-paraphrases", "3",
              "--no-progress", *flags]
    run("flex_attention_generate.py", [*common, "--output-dir", str(tmp_path / "run")], monkeypatch, capsys)
    written = pd.read_feather(tmp_path / "run" / table)
    out = run("debug_flexattention.py", [*common, "--max-samples", "3", "--output-dir", str(tmp_path / "debug")],
              monkeypatch, capsys)
    debugged = [json.loads(ids) for ids in re.findall(r"^token ids: (\[.*\])$", out, re.M)]
    assert len(debugged) == 3
    assert debugged == [list(t) for t in written["token_ids"]]
    assert "decoding as flex_attention_generate.py does:" in out and f"fusion bias {written['fusion_bias'][0]}" in out
