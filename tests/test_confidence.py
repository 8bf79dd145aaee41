"""Confidence as upstream defines it, cached under a key of everything it depends on, outside the result tables."""
from __future__ import annotations

import pytest

import confidence
from confidence import confidences
from decoding import LanguageModel, StopRule, eos_ids


def compute(llama, dataset, folder, records=None, n=2, k=3, max_new_tokens=3, **kw):
    model, tokenizer = llama
    kw = {"model_name": "tiny-llama", **kw}
    return confidences(LanguageModel(model, tokenizer), dataset, records or dataset.records, n, k,
                       StopRule(eos_ids(model, tokenizer), max_new_tokens), folder, kw.pop("seed", 0), **kw)


@pytest.fixture
def count_computed(monkeypatch):
    """How many prompts had their confidence computed (not read from the cache)."""
    computed = []
    agreement = confidence.agreement

    def counting(lm, rows, keys, settings, stop):
        computed.extend(keys)
        return agreement(lm, rows, keys, settings, stop)
    monkeypatch.setattr(confidence, "agreement", counting)
    return computed


def test_cached_in_its_own_folder_and_reused(llama, small_dataset, tmp_path, count_computed):
    first = compute(llama, small_dataset, tmp_path)
    assert len(count_computed) == 3 * 2
    files = list(tmp_path.rglob("*"))
    assert [p.relative_to(tmp_path).parts[0] for p in files if p.is_file()] == ["confidence-cache"]
    assert all(0.0 <= c <= 1.0 for values in first.values.values() for c in values)
    assert set(first.seconds) == {r.uuid for r in small_dataset.records} and min(first.seconds.values()) > 0
    again = compute(llama, small_dataset, tmp_path)
    assert len(count_computed) == 6  # nothing recomputed
    assert again == first  # values and the stored seconds
    rows = again.annotate([{"uuid": "q2"}, {"uuid": "q1"}])
    assert [r["confidence_seconds"] for r in rows] == [first.seconds["q2"], first.seconds["q1"]]


@pytest.mark.parametrize("change", [dict(k=4), dict(seed=1), dict(temperature=0.7), dict(top_p=0.9),
                                    dict(max_new_tokens=4), dict(model_name="another-model")])
def test_a_changed_setting_recomputes(llama, small_dataset, tmp_path, count_computed, change):
    compute(llama, small_dataset, tmp_path, records=small_dataset.records[:1])
    assert len(count_computed) == 2
    compute(llama, small_dataset, tmp_path, records=small_dataset.records[:1], **change)
    assert len(count_computed) == 4


def test_another_dtype_recomputes(llama, small_dataset, tmp_path, count_computed):
    """bfloat16 weights give other confidences than float32 ones: the cache keeps them apart."""
    import copy

    import torch
    compute(llama, small_dataset, tmp_path, records=small_dataset.records[:1])
    model, tokenizer = llama
    compute((copy.deepcopy(model).to(torch.bfloat16), tokenizer), small_dataset, tmp_path,
            records=small_dataset.records[:1])
    assert len(count_computed) == 4
    assert len(list((tmp_path / "confidence-cache").glob("*.feather"))) == 2


def test_the_key_is_the_prompt_not_the_uuid(llama, small_dataset, tmp_path, count_computed):
    compute(llama, small_dataset, tmp_path, records=small_dataset.records[:1])
    small_dataset.records[0].paraphrases[1] = "which city is the capital of france?"
    compute(llama, small_dataset, tmp_path, records=small_dataset.records[:1])
    assert len(count_computed) == 3  # only the changed prompt


def test_an_entry_does_not_depend_on_the_prompts_sampled_with_it(llama, small_dataset, tmp_path, count_computed):
    """Each sample has its own generator: N=3 at once gives paraphrases 0-1 what N=2 gave them, so a cache
    filled at N=2 and completed at N=3 holds what a fresh N=3 run computes."""
    grown = compute(llama, small_dataset, tmp_path / "a", n=2, k=5)
    grown = compute(llama, small_dataset, tmp_path / "a", n=3, k=5)
    assert len(count_computed) == 3 * 2 + 3  # only paraphrase 2 was added
    fresh = compute(llama, small_dataset, tmp_path / "b", n=3, k=5)
    assert grown.values == fresh.values


@pytest.mark.parametrize(("greedy", "samples", "expected"), [
    ("Paris", ["Paris", "Paris, France", "the city of paris", "London"], 0.75),  # containment, either way
    ("Paris, France", ["Paris", "France", "Lyon"], 2 / 3),
    ("", ["Paris", "London", "", ""], 0.5),  # an empty greedy answer agrees with every non-empty sample
    ("Paris", ["", "London"], 0.5),  # and an empty sample with any greedy answer (upstream's is_matched_str)
])
def test_agreement_is_upstreams(llama, small_dataset, tmp_path, monkeypatch, greedy, samples, expected):
    model, tokenizer = llama
    k = len(samples)

    def fake_decode(lm, rows, n, choose, stop):
        texts = [greedy or "\n"] * len(rows) if choose is confidence.greedy else samples * (len(rows) // k)
        return [tokenizer(t or "\n", add_special_tokens=False)["input_ids"] for t in texts], None
    monkeypatch.setattr(confidence, "decode", fake_decode)
    result = compute(llama, small_dataset, tmp_path, records=small_dataset.records[:1], k=k)
    assert result.values["q1"] == [pytest.approx(expected)] * 2
