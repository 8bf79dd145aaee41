"""The shared sweep (issue 38): `sweep.py --study` encodes the prefix and the paraphrases once per question batch
and encoding, and decodes the variants that read them alike from that one prefill as rows of one batch. Every
variant's table must equal, token for token and within 1e-5 on every log-probability, the table
flex_attention_generate.py writes for that variant alone, on both backends; an interrupted shared sweep must
resume to the uninterrupted tables."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

import flex_attention_generate
import results
import sweep
from fusion import FusionSettings
from methods import fusion_stacks

N = 3
# the grid, with a numeric bias the grid does not have and the default itself
VARIANTS = [FusionSettings(), *sweep.STUDY_GRID, FusionSettings(bias="0.4")]


def write_data(path: Path, questions: int = 5) -> Path:
    """Questions with N paraphrases of different lengths (padding inside every batch), and train rows with N
    paraphrases for the few-shot examples (fused ones too)."""
    rows = [{"uuid": f"t{i}", "paraphrases": [f"shot {i} form {j}{' more' * j}?" for j in range(N)],
             "answers": [f"a{i}"], "split": "train"} for i in range(2)]
    rows += [{"uuid": f"q{i}", "paraphrases": [f"question {i}{' long' * ((i + j) % 3)} form {j}?" for j in range(N)],
              "answers": [f"a{i}"]} for i in range(questions)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def common(data: Path, out: Path, backend: str, *more: str) -> list[str]:
    return ["--dataset", "jsonl", "--data-file", str(data), "--model", "tiny-llama", "--no-progress",
            "--max-new-tokens", "4", "--batch-size", "2", "--attn", backend, "--output-dir", str(out), *more]


def variant_flags(v: FusionSettings) -> list[str]:
    """flex_attention_generate.py's flags for the variant `v`."""
    return ["--positions", v.positions, "--fusion-bias", v.bias, "--fusion-temperature", repr(v.temperature),
            "--fewshot-format", v.fewshot, "--isolation", v.isolation, "--beside", v.beside,
            "--beside-weight", repr(v.beside_weight)]


def run_sweep(data: Path, out: Path, backend: str, variants: list[FusionSettings], monkeypatch) -> int:
    monkeypatch.setitem(sweep.GRIDS, "full", [replace(v, backend=backend) for v in variants])
    monkeypatch.setattr(sweep.subprocess, "call", lambda *a, **k: 0)  # evaluate.py's report is not under test
    return sweep.main(common(data, out, backend, "--study", "--min-n", str(N), "--max-n", str(N)))


def same_table(shared: Path, alone: Path) -> None:
    """Every column but the times equal; floats (and lists of them) within 1e-5."""
    a, b = pd.read_feather(shared), pd.read_feather(alone)
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0, shared.name
    for column in a.columns:
        if column.endswith("seconds"):  # time, not answers
            continue
        for x, y in zip(a[column], b[column]):
            close(x, y, f"{shared.name} {column}")
    settings = [json.loads(p.with_suffix(".settings.json").read_text()) for p in (shared, alone)]
    for s in settings:
        s.pop("provenance", None)
    assert settings[0] == settings[1], shared.name


def close(x, y, where: str) -> None:
    if hasattr(x, "__len__") and not isinstance(x, str):
        assert len(x) == len(y), where
        for u, v in zip(x, y):
            close(u, v, where)
    elif isinstance(x, float) and not isinstance(y, str):
        assert math.isclose(x, y, abs_tol=1e-5) or (math.isnan(x) and math.isnan(y)), (where, x, y)
    else:
        assert x == y, (where, x, y)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_every_variant_of_the_shared_sweep_equals_its_table_alone(tmp_path, monkeypatch, backend):
    data = write_data(tmp_path / "data.jsonl")
    assert run_sweep(data, tmp_path / "shared", backend, VARIANTS, monkeypatch) == 0
    names = {v.table_name(N) for v in VARIANTS}
    assert {p.name for p in (tmp_path / "shared").glob("*.feather")} == names
    for v in VARIANTS:
        out = tmp_path / "alone" / v.table_name(N)
        assert flex_attention_generate.main(common(data, out, backend, "--num_paraphrases", str(N),
                                                   *variant_flags(v))) == 0
        same_table(tmp_path / "shared" / v.table_name(N), out / v.table_name(N))


def test_the_grid_shares_its_prefills():
    """Most of the grid reads the paraphrases alike: a handful of encodings and stacks, not one per variant;
    variants that differ in positions, isolation or fused few-shot format never share an encoding."""
    stacks = fusion_stacks(VARIANTS)
    encodings = {VARIANTS[i].encoding() for stack in stacks for i in stack}
    # encodings: left, right and continuous positions; left and right with fused few-shot; isolation none.
    # stacks: left's T=1 rows (8 variants), its two temperatures, the singles beside, the prior beside at two
    # weights; right's T=1 and its temperatures; continuous; the two fused few-shot; isolation none
    assert len(encodings) == 6 and len(stacks) == 10
    for stack in stacks:
        assert len({(VARIANTS[i].positions, VARIANTS[i].isolation, VARIANTS[i].fewshot) for i in stack}) == 1
    assert FusionSettings(bias="none").encoding() == FusionSettings(temperature=0.7).encoding()
    assert FusionSettings(fewshot="fused").encoding() != FusionSettings(fewshot="fused", temperature=0.7).encoding()


def test_an_interrupted_shared_sweep_resumes_to_the_uninterrupted_tables(tmp_path, monkeypatch):
    """Ctrl-C after some tables have a batch and others not yet: the rerun finishes each table, and every table
    equals the one of a sweep that was never interrupted."""
    data = write_data(tmp_path / "data.jsonl")
    variants = [FusionSettings(), FusionSettings(bias="none"), FusionSettings(temperature=0.7),
                FusionSettings(positions="right"), FusionSettings(beside="prior", beside_weight=0.5)]
    assert run_sweep(data, tmp_path / "whole", "sdpa", variants, monkeypatch) == 0
    append, calls = results.ResultWriter.append, []

    def interrupted(self, rows):
        calls.append(self.path.name)
        if len(calls) == len(variants) + 2:  # the second batch: two tables written, three not
            raise KeyboardInterrupt
        return append(self, rows)
    monkeypatch.setattr(results.ResultWriter, "append", interrupted)
    assert run_sweep(data, tmp_path / "resumed", "sdpa", variants, monkeypatch) == 130
    monkeypatch.setattr(results.ResultWriter, "append", append)
    assert run_sweep(data, tmp_path / "resumed", "sdpa", variants, monkeypatch) == 0
    for v in variants:
        same_table(tmp_path / "resumed" / v.table_name(N), tmp_path / "whole" / v.table_name(N))


def test_variants_decoded_together_equal_each_decoded_alone(llama, small_dataset):
    """Below the commands: answer_fusions over a stack (bias none, uniform, sqrt, a number; the rows beside at two
    weights) gives each variant's rows as answer_fused alone, logits included (answer_logprob within 1e-5)."""
    from decoding import LanguageModel
    from methods import answer_fused, answer_fusions
    model, tokenizer = llama
    lm, ds = LanguageModel(model, tokenizer), small_dataset
    variants = [FusionSettings(bias=b) for b in ("none", "uniform", "sqrt", "-1.5")] + [
        FusionSettings(beside="prior", beside_weight=w) for w in (0.5, 1.0)]
    together, _ = answer_fusions(lm, ds, ds.records, N, no_stop(), variants, [None] * len(variants))
    for v, rows in zip(variants, together):
        alone, _ = answer_fused(lm, ds, ds.records, N, no_stop(), v)
        assert [r["token_ids"] for r in rows] == [r["token_ids"] for r in alone], v
        for r, s in zip(rows, alone):
            assert abs(r["answer_logprob"] - s["answer_logprob"]) <= 1e-5, v
    assert len({tuple(round(r["answer_logprob"], 4) for r in rows) for rows in together}) == len(variants)  # differ


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_the_encoding_is_what_the_variant_alone_computes(llama, small_dataset, prefix_cache):
    """The paraphrases encoded under the variant's encoding give the same first-token logits as the whole
    prompt prefilled under the variant's own mask (the encoding leaves out nothing a variant reads), fused
    few-shot examples (read with the bias and 1/T) and the reused prefix included."""
    from decoding import DecodeStats, LanguageModel, PrefixCache, fused_row, prefill_rows
    from methods import decode_stack, fusion_biases
    from segment_mask import SegmentMask
    model, tokenizer = llama
    ds = replace(small_dataset, few_shot_paraphrases=[[q, f"{q} (asked again)", f"tell me: {q}"]
                                                      for q, _ in small_dataset.few_shot])

    def lm() -> LanguageModel:  # each side its own prefix cache
        return LanguageModel(model, tokenizer, PrefixCache() if prefix_cache else None)
    for v in [FusionSettings(bias="uniform"), FusionSettings(temperature=0.7), FusionSettings(isolation="none"),
              FusionSettings(positions="right", bias="2.0"), FusionSettings(fewshot="fused", temperature=0.7),
              FusionSettings(fewshot="fused", bias="uniform"), FusionSettings(fewshot="fused", bias="none")]:
        rows = [fused_row(tokenizer, ds.prompt_parts(r, N, v.fewshot), v.positions) for r in ds.records]
        biases = fusion_biases(v, ds.records, N, None, model.device)

        def own(seg, max_new, positions=None):
            return SegmentMask(seg, max_new, v, biases, model.dtype, positions=positions)
        whole, _ = prefill_rows(lm(), rows, 1, own, 1, DecodeStats())
        seen = []

        def first_logits(logits, live):
            seen.append(logits[:, 0])
            return logits[:, 0].argmax(-1)
        decode_stack(lm(), ds, ds.records, N, no_stop(1), [v], [None], [first_logits], {})
        assert torch.allclose(seen[0], whole[:len(rows)], atol=1e-5), v  # (the rows after: ballast)


def no_stop(max_new: int = 6):
    from decoding import StopRule
    return StopRule(set(), max_new, first_line_only=False)


def test_rows_encoded_at_their_own_width_and_widened_equal_rows_encoded_wide(llama, small_dataset):
    """The rows beside a fused row are encoded at their own width, then given the fused row's padding as K/V of
    zeros (`Encoded.widen`): what follows equals encoding them padded to the wide width, logits within 1e-5."""
    from decoding import DecodeStats, LanguageModel, PrefixCache, encode_rows, prefill_rows, single_rows
    from methods import encoder
    model, tokenizer = llama
    rows = [row for r in small_dataset.records
            for row in single_rows(tokenizer, small_dataset.prompt_parts(r, N), list(range(N)))]
    own, wide = max(len(r.input_ids) for r in rows), max(len(r.input_ids) for r in rows) + 7
    for cached in (False, True):
        lm = LanguageModel(model, tokenizer, PrefixCache() if cached else None)
        shared = 0
        if cached:
            from decoding import shared_prefix_length
            shared = shared_prefix_length(rows)
        plain = encoder(lm, FusionSettings(bias="none"), N)
        cue = own - 4  # a few tokens before every row's end
        narrow = encode_rows(lm, rows, plain, shared, own, DecodeStats(), upto=cue).widen(wide, cue + 7,
                                                                                         tokenizer.pad_token_id)
        direct = encode_rows(lm, rows, plain, shared, wide, DecodeStats(), upto=cue + 7)
        assert torch.equal(narrow.ids, direct.ids) and torch.equal(narrow.segments, direct.segments)
        logits = [prefill_rows(lm, rows, 1, plain, 1, DecodeStats(), e)[0] for e in (narrow, direct)]
        assert torch.allclose(logits[0], logits[1], atol=1e-5)
