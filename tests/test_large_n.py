"""Large N on MyriadLAMA-shaped data (a fact with up to 50 [MASK] templates, --task mask): attention-level
fusion and logit avg answer at N = 10, 20, 50 on a tiny model, end to end through both commands at N = 50;
a question past the model's context stops the run with one line naming the largest N that fits, for each
position scheme (aligned positions grow with the longest template, continuous ones with N); segment ids,
their characters and the pictures hold up past the 35 paraphrase characters."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import cached_tiny
from constants import InputError
from dataset import Dataset, Record
from decoding import (LanguageModel, Row, StopRule, check_context, fused_row, layout_row, positions_needed, row_parts,
                      single_rows)
from fusion import FusionSettings
from methods import answer_ensemble, answer_fused
from segment_mask import FUSED_SEGMENT, PARAPHRASE_CHARS, PREFIX_SEGMENT, draw_mask, mask_legend, segment_char

MAX_N = 50
MAX_NEW = 3
RELATIONS = ["was born in", "is a citizen of", "died in", "works in the city of", "holds the nationality of"]
FEW_SHOT = [("Dante was born in [MASK].", "Florence"), ("Goethe died in [MASK].", "Weimar")]


def templates(subject: str, count: int = MAX_N, pad: int = 0) -> list[str]:
    """`count` MyriadLAMA-like templates of one fact, of varied lengths (`pad` more characters each)."""
    return [f"{'so, ' * (k % 4)}{subject} {RELATIONS[k % len(RELATIONS)]} [MASK]{' .' * (k // 5)}{'!' * pad}"
            for k in range(count)]


def facts(pad: int = 0) -> list[Record]:
    return [Record(f"P19_{s}", templates(s, pad=pad), ["Ulm"]) for s in ("Einstein", "Kepler")]


def myriadlama_shaped(pad: int = 0) -> Dataset:
    return Dataset("myriadlama-shaped", "mask", facts(pad), FEW_SHOT)


def no_stop() -> StopRule:
    return StopRule(set(), MAX_NEW, first_line_only=False)


@pytest.mark.parametrize("n", [10, 20, 50])
def test_fusion_and_logit_avg_answer_at_large_n(n):
    model, tokenizer = cached_tiny("llama")
    lm, ds = LanguageModel(model, tokenizer), myriadlama_shaped()
    for backend in ("sdpa", "flex") if n == MAX_N else ("sdpa",):
        settings = FusionSettings(backend=backend, record_attention=True)
        fused, _ = answer_fused(lm, ds, ds.records, n, no_stop(), settings)
        for row, record in zip(fused, ds.records):
            assert row["num_ensemble"] == n and row["paraphrases"] == record.paraphrases[:n]
            assert row["new_tokens"] == MAX_NEW and row["decode_tokens"] == MAX_NEW - 1
            share = np.asarray(row["attention_share"])
            assert share.shape == (MAX_NEW, n + 2) and np.abs(share.sum(1) - 1).max() <= 1e-5
    avg, _ = answer_ensemble(lm, ds, ds.records, n, no_stop(), "avg")
    assert [r["decode_tokens"] for r in avg] == [(MAX_NEW - 1) * n] * len(ds.records)


def test_every_template_of_n_50_is_in_the_fused_row():
    _, tokenizer = cached_tiny("llama")
    ds = myriadlama_shaped()
    row = fused_row(tokenizer, ds.prompt_parts(ds.records[0], MAX_N))
    assert sorted(set(row.segment_ids) & set(range(1, MAX_N + 1))) == list(range(1, MAX_N + 1))
    longest = max(row.segment_ids.count(i) for i in range(1, MAX_N + 1))
    shared = row.segment_ids.count(PREFIX_SEGMENT) + row.segment_ids.count(FUSED_SEGMENT)
    assert positions_needed([row], 0) == shared + longest  # left positions: the longest template, not N


def jsonl(path: Path, pad: int = 0) -> Path:
    lines = [{"uuid": f"shot{i}", "paraphrases": [q], "answers": [a], "split": "train"}
             for i, (q, a) in enumerate(FEW_SHOT)]
    lines += [{"uuid": r.uuid, "paraphrases": r.paraphrases, "answers": r.answers} for r in facts(pad)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def command(script: str, data: Path, out: Path, *flags: str) -> list[str]:
    return ["--dataset", "jsonl", "--task", "mask", "--data-file", str(data), "--model", "tiny-llama",
            "--output-dir", str(out), "--max-new-tokens", str(MAX_NEW), "--num_ensemble", str(MAX_N), *flags]


def test_both_commands_run_n_50_end_to_end(tmp_path, capsys):
    import flex_attention_generate
    import generate
    data = jsonl(tmp_path / "facts.jsonl")
    assert flex_attention_generate.main(command("flex", data, tmp_path, "--record-attention")) == 0
    assert generate.main(command("generate", data, tmp_path, "--method", "avg")) == 0
    fused = pd.read_feather(tmp_path / f"flex_attention-{MAX_N}.feather")
    avg = pd.read_feather(tmp_path / f"ensemble_avg-{MAX_N}.feather")
    assert len(fused) == len(avg) == 2 and (fused["num_ensemble"] == MAX_N).all()
    assert all(len(token) == MAX_N + 2 for share in fused["attention_share"] for token in share)


def test_a_question_past_the_context_names_the_largest_n_that_fits(tmp_path, capsys):
    """Continuous positions grow with N: 50 templates of ~45 tokens pass the tiny model's 2048; aligned positions
    grow with the longest template only, so left fits the same question."""
    import flex_attention_generate
    data = jsonl(tmp_path / "facts.jsonl", pad=20)
    code = flex_attention_generate.main(command("flex", data, tmp_path, "--positions", "continuous"))
    err = capsys.readouterr().err
    model, tokenizer = cached_tiny("llama")
    ds = myriadlama_shaped(pad=20)
    fits = [n for n in range(1, MAX_N + 1) if positions_needed(
        [fused_row(tokenizer, ds.prompt_parts(ds.records[0], n), "continuous")], MAX_NEW) <= 2048]
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: question {ds.records[0].uuid}: ")
    assert f"more than the model's context of 2048; the largest N that fits is {max(fits)} " in err
    assert "continuous the positions grow with every paraphrase" in err
    check_context(model, [fused_row(tokenizer, ds.prompt_parts(ds.records[0], MAX_N), "left")], MAX_NEW, "q")


def small_context(limit: int) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(max_position_embeddings=limit))


def long_eighth(tokenizer, positions: str | None) -> tuple[list[Row], int]:
    """Rows (fused, or one per template with positions None) of a fact whose 8th template is far longer than the
    others; and a context that every row with the first 7 templates fits and none with the 8th."""
    record = Record("long", templates("Kepler", 12), ["Weilderstadt"])
    record.paraphrases[7] += " and many more words" * 5
    parts = Dataset("t", "mask", [record], FEW_SHOT).prompt_parts(record, 12)
    def rows_of(n: int) -> list[Row]:
        parts = Dataset("t", "mask", [record], FEW_SHOT).prompt_parts(record, n)
        return single_rows(tokenizer, parts, list(range(n))) if positions is None else [
            fused_row(tokenizer, parts, positions)]
    return rows_of(12), positions_needed(rows_of(7), MAX_NEW)


@pytest.mark.parametrize("positions, why", [
    ("left", "with --positions left or right the positions grow with the longest paraphrase, not with N"),
    ("right", "with --positions left or right the positions grow with the longest paraphrase, not with N"),
    (None, "one row per paraphrase: the positions are its longest prompt's, whatever N")])
def test_aligned_and_logit_level_rows_stop_at_the_long_template(positions, why):
    _, tokenizer = cached_tiny("llama")
    rows, limit = long_eighth(tokenizer, positions)
    with pytest.raises(InputError) as error:
        check_context(small_context(limit), rows, MAX_NEW, "long")
    assert str(error.value) == (f"question long: prompt and answer need {positions_needed(rows, MAX_NEW)} positions, "
                                f"more than the model's context of {limit}; the largest N that fits is 7 ({why}); "
                                f"or lower --max-new-tokens")


def test_no_paraphrase_fits():
    _, tokenizer = cached_tiny("llama")
    row = fused_row(tokenizer, myriadlama_shaped().prompt_parts(facts()[0], 3))
    with pytest.raises(InputError, match=r"the largest N that fits is 0 \(even one paraphrase is too long\)"):
        check_context(small_context(10), [row], MAX_NEW, "q")


@pytest.mark.parametrize("positions", ["left", "right", "continuous"])
@pytest.mark.parametrize("fewshot", ["single", "fused"])
def test_a_row_is_laid_out_again_from_its_parts(positions, fewshot):
    """row_parts inverts layout_row, few-shot blocks included: what the largest-N search rests on."""
    _, tokenizer = cached_tiny("qwen2")
    ds = Dataset("t", "mask", facts(), FEW_SHOT, [[q, q.lower(), q.upper()] for q, _ in FEW_SHOT])
    row = fused_row(tokenizer, ds.prompt_parts(ds.records[0], 20, fewshot), positions)
    assert layout_row(*row_parts(row), positions) == row


def test_segment_characters_and_pictures_past_35_paraphrases(tmp_path):
    import debug_flexattention as dbg
    _, tokenizer = cached_tiny("llama")
    ds = myriadlama_shaped()
    row = fused_row(tokenizer, ds.prompt_parts(ds.records[0], MAX_N))
    assert [segment_char(i) for i in (1, 35, 36, MAX_N)] == ["1", PARAPHRASE_CHARS[-1], "+", "+"]
    picture = draw_mask(row.segment_ids, 80, fold_prefix=True)
    assert "+" in picture and max(len(line) for line in picture.splitlines()[1:]) <= 82
    assert "+ paraphrase 50" in mask_legend(row.segment_ids)
    dbg.save_mask_png(torch.ones(len(row.input_ids), len(row.input_ids)).tril().bool(), row.segment_ids,
                      tmp_path / "mask.png", "50 paraphrases")
    shares = np.random.default_rng(0).dirichlet(np.ones(MAX_N + 2), size=4)
    dbg.save_share_png(shares, [f"{i} 'x'" for i in range(1, 5)], tmp_path / "shares.png", "50 paraphrases")
    assert all((tmp_path / f).read_bytes()[:4] == b"\x89PNG" for f in ("mask.png", "shares.png"))
