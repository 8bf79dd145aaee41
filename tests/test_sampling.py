"""The sampled parts: decoding.Sampler (seeded, top-p), paraphrase.Paraphraser (upstream's passes, its
cache and the first-line rule), and the confidence-weighted methods end to end on a tiny model."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import FEW_SHOT, QUESTIONS, cached_tiny, run_main
from dataset import Dataset, Record
from decoding import LanguageModel, Sampler, fused_row, pad_left, prefill
from results import read_table
from fusion import FusionSettings
from segment_mask import SegmentMask


def test_sampler_is_reproducible_per_seed_and_differs_across_seeds():
    logits = torch.randn(64, 1, 50, generator=torch.Generator().manual_seed(1))
    draw = lambda seed: Sampler(torch.Generator().manual_seed(seed), temperature=1.5)(logits, None).tolist()
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_top_p_keeps_only_the_nucleus():
    """p = (0.6, 0.3, 0.1): top-p 0.5 keeps the first token only, 0.85 the first two, never the third."""
    logits = torch.log(torch.tensor([[[0.6, 0.3, 0.1]]])).expand(400, 1, 3)
    only = Sampler(torch.Generator().manual_seed(0), top_p=0.5)(logits, None)
    assert set(only.tolist()) == {0}
    two = Sampler(torch.Generator().manual_seed(0), top_p=0.85)(logits, None).tolist()
    assert set(two) == {0, 1} and 0.55 < two.count(0) / len(two) < 0.78  # renormalised: 0.6 / 0.9


@pytest.fixture
def paraphraser(tmp_path, monkeypatch):
    import paraphrase
    monkeypatch.setattr(paraphrase, "CACHE_DIR", tmp_path)
    model, tokenizer = cached_tiny("llama")
    return paraphrase.Paraphraser(LanguageModel(model, tokenizer), "tiny-llama", max_new_tokens=6)


def test_paraphraser_passes_cache_and_growth(paraphraser, monkeypatch):
    records = [Record(r.uuid, [r.paraphrases[0]], r.answers) for r in QUESTIONS]
    two = paraphraser(records, 2)
    assert all(len(r.paraphrases) == 3 and r.paraphrases[0] == q.paraphrases[0] for r, q in zip(two, records))
    assert all("\n" not in p and p for r in two for p in r.paraphrases)  # first line, never empty
    cached = [json.loads(line) for line in paraphraser.cache_file.read_text().splitlines()]
    assert {c["question"] for c in cached} == {r.paraphrases[0] for r in records}
    calls = []
    sample = paraphraser.sample
    monkeypatch.setattr(paraphraser, "sample", lambda qs, i: calls.append(i) or sample(qs, i))
    again = paraphraser(records, 2)
    assert calls == [] and [r.paraphrases for r in again] == [r.paraphrases for r in two]  # read from the cache
    three = paraphraser(records, 3)
    assert calls == [2]  # only the new pass runs; the earlier paraphrases stay as they were
    assert [r.paraphrases[:3] for r in three] == [r.paraphrases for r in two]


def test_paraphraser_cache_is_keyed_by_its_settings(paraphraser):
    import dataclasses
    other = dataclasses.replace(paraphraser, temperature=0.7)
    assert other.cache_file != paraphraser.cache_file
    assert dataclasses.replace(paraphraser, model_name="other").cache_file.parent != paraphraser.cache_file.parent


def test_an_empty_or_multiline_sample_is_handled(paraphraser, monkeypatch):
    from decoding import answer_text
    tokenizer = paraphraser.lm.tokenizer
    assert answer_text(tokenizer, tokenizer("\n  which city?\nmore text")["input_ids"][1:])[0] == "which city?"
    monkeypatch.setattr(paraphraser, "sample", lambda qs, i: [""] * len(qs))
    out = paraphraser([Record("a", ["who is there?"], ["me"])], 1)
    assert out[0].paraphrases == ["who is there?", "who is there?"]  # an empty sample becomes the question


def test_confidence_bias_of_one_paraphrase_is_that_paraphrase_alone():
    """Weights (1, 1e-6, 1e-6) as the confidence bias (log w): the answer reads paraphrase 1 only, so the
    fused row's last logits are those of paraphrase 1's plain prompt. The paraphrases have one length
    (a byte-level tokenizer), so left positions put the answer cue where the plain prompt has it."""
    from segment_mask import segment_biases
    model, tokenizer = cached_tiny("qwen2")
    question = Record("q", ["who wrote hamlet?", "hamlet: by whom??", "author of hamlet?"], ["Shakespeare"])
    ds = Dataset("t", "qa", [question], FEW_SHOT)
    alone = fused_row(tokenizer, ds.prompt_parts(question, 1))
    fused = fused_row(tokenizer, ds.prompt_parts(question, 3))

    def last_logits(row, biases=None):
        ids, pos, seg = pad_left([row], 0, model.device)
        mask = SegmentMask(seg, 0, FusionSettings(), biases)
        with mask.attention(model):
            return prefill(model, ids, pos, mask.prefill())[0][0, -1]
    reference = last_logits(alone)
    confident = torch.tensor([segment_biases(3, "confidence", [1.0, 1e-6, 1e-6])])
    assert (last_logits(fused, confident) - reference).abs().max() <= 1e-3
    uniform = torch.tensor([segment_biases(3, "uniform")])
    assert (last_logits(fused, uniform) - reference).abs().max() > 1e-2  # the other paraphrases do count


@pytest.mark.parametrize("script, flags", [
    ("generate.py", ["--method", "weighted_avg", "--num_ensemble", "3"]),
    ("generate.py", ["--method", "weighted_max", "--num_ensemble", "3"]),
    ("flex_attention_generate.py", ["--num_paraphrases", "3", "--fusion-bias", "confidence"]),
])
def test_weighted_methods_end_to_end(tmp_path, script, flags):
    env = {"SELF_ENSEMBLE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = run_main(script, "--model", "tiny-llama", "--limit", "2", "--max-new-tokens", "2", "--confidence-samples",
                    "2", "--output-dir", str(tmp_path), "--no-progress", *flags, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = read_table(next(p for p in tmp_path.glob("*.feather")))
    assert len(table) == 2 and (table["confidence_seconds"] > 0).all()
    weights = table["weights"].tolist()
    assert all(len(w) == 3 and abs(sum(w) - 1) < 1e-6 for w in weights)
    assert list((tmp_path / "confidence-cache").glob("*.feather"))
