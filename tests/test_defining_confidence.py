"""Defining behaviour of confidence (confidence.py, scoring.upstream_matched / answers_agree): the agreement rule
both ways, a confidence as the share of K samples that agree with the greedy answer, the weights normalised to
sum 1 with the all-zero fallback, the cache's file name and key, which prompts are computed and which are read
back. The decode is replaced by hand-written answers so that every expected confidence is counted by hand."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

import confidence
from confidence import ConfidenceSettings, Confidences, RowSampler, normalised_weights, row_generator, save_entries
from conftest import cached_tiny
from decoding import LanguageModel, StopRule
from constants import InputError
from dataset import Dataset, Record
from scoring import answers_agree, upstream_matched


# ---------------------------------------------------------------- the agreement rule, both ways

def test_agreement_when_the_prediction_contains_the_gold_answer():
    assert upstream_matched(["paris", "france"], ["paris"])
    assert upstream_matched(["in", "paris", "france"], ["paris", "france"])
    assert not upstream_matched(["paris", "france"], ["france", "paris"])  # a window keeps the order


def test_agreement_when_the_gold_answer_contains_the_prediction():
    assert upstream_matched(["paris"], ["paris", "france"])
    assert upstream_matched(["france"], ["in", "paris", "france"])
    assert not upstream_matched(["lyon"], ["paris", "france"])


def test_agreement_of_empty_answers():
    assert upstream_matched([], ["paris"]) and upstream_matched(["paris"], [])
    assert not upstream_matched([], [])


def test_agreement_compares_whole_tokens():
    assert not upstream_matched(["parisian"], ["paris"]) and not upstream_matched(["paris"], ["parisian"])
    assert upstream_matched(["a b"], ["a", "b"])  # tokens joined by spaces, as upstream compares them


def test_answers_agree_lemmatises_both_sides():
    # "Cities" and "city" share the lemma; punctuation and case are dropped; either side may contain the other
    assert answers_agree("Cities", ["city.", "the CITY", "town"]) == [True, True, False]
    assert answers_agree("paris", ["Paris, France", "France"]) == [True, False]
    assert answers_agree("Paris, France", ["France", "Lyon"]) == [True, False]


def test_a_missing_greedy_answer_is_an_empty_one():
    """None (no text) counts as "": it agrees with every non-empty sample, and with no empty one."""
    assert answers_agree(None, ["Paris", "London", ""]) == [True, True, False]
    assert answers_agree(None, ["Paris"]) == [True]
    assert answers_agree("Paris", [None, "Paris"]) == [True, True]


# ---------------------------------------------------------------- weights

def test_normalised_weights_sum_to_one():
    assert normalised_weights([0.25, 0.75]) == ([0.25, 0.75], False)
    assert normalised_weights([0.2, 0.6]) == (pytest.approx([0.25, 0.75]), False)
    assert normalised_weights([0.5]) == ([1.0], False)
    assert normalised_weights([0.0, 0.3, 0.1]) == (pytest.approx([0.0, 0.75, 0.25]), False)


def test_all_zero_confidence_falls_back_to_equal_weights_and_says_so():
    assert normalised_weights([0.0, 0.0, 0.0, 0.0]) == ([0.25] * 4, True)
    assert normalised_weights([0.0]) == ([1.0], True)


# ---------------------------------------------------------------- the cache's name and key

SETTINGS = ConfidenceSettings("org/model", None, "float32", "cpu", 10, 0, 0.7, 0.9, 16)


def test_the_cache_file_names_every_setting():
    assert SETTINGS.cache_file(Path("out")) == Path(
        "out/confidence-cache/org--model-float32-cpu-k10-seed0-t0.7-p0.9-len16.feather")
    revised = ConfidenceSettings("m", "0123456789abcdefghijKLMNOP", "bfloat16", "cuda", 3, 2, 1.0, 1.0, 5)
    assert revised.cache_file(Path("r")) == Path(
        "r/confidence-cache/m-0123456789abcdefghij-bfloat16-cuda-k3-seed2-t1.0-p1.0-len5.feather")


@pytest.mark.parametrize("field", ["model", "revision", "dtype", "device", "samples", "seed", "temperature", "top_p",
                                   "max_new_tokens"])
def test_the_key_changes_with_every_setting(field):
    import dataclasses
    other = {"model": "m2", "revision": "abc", "dtype": "bfloat16", "device": "cuda", "samples": 11, "seed": 1,
             "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 17}[field]
    assert dataclasses.replace(SETTINGS, **{field: other}).key([1, 2, 3]) != SETTINGS.key([1, 2, 3])


def test_the_key_is_the_prompts_token_ids_and_nothing_else():
    assert SETTINGS.key([1, 2, 3]) == ConfidenceSettings(*dataclasses_values(SETTINGS)).key([1, 2, 3])
    assert SETTINGS.key([1, 2, 3]) != SETTINGS.key([1, 2, 4]) != SETTINGS.key([1, 2])
    assert len(SETTINGS.key([1])) == 64 and int(SETTINGS.key([1]), 16) >= 0  # a sha256 hex digest


def dataclasses_values(settings):
    import dataclasses
    return [getattr(settings, f.name) for f in dataclasses.fields(settings)]


def test_every_sample_has_its_own_reproducible_generator():
    def draws(generator):
        import torch
        return torch.rand(5, generator=generator).tolist()
    assert draws(row_generator("k", 0)) == draws(row_generator("k", 0))
    assert draws(row_generator("k", 0)) != draws(row_generator("k", 1))
    assert draws(row_generator("k", 0)) != draws(row_generator("j", 0))


def test_row_sampler_samples_row_j_with_the_generator_of_its_question():
    import torch
    logits = torch.zeros(3, 1, 1000)  # uniform: the draw is the generator's
    samplers = RowSampler([row_generator("a", 0), row_generator("b", 0), row_generator("c", 0)], 1.0, 1.0)
    live = torch.tensor([2, 0])  # live rows are questions 2 and 0
    got = samplers(logits[:2], live).tolist()
    alone = [RowSampler([row_generator(k, 0)], 1.0, 1.0)(logits[:1], torch.tensor([0])).item() for k in ("c", "a")]
    assert got == alone


def test_annotate_adds_each_rows_question_cost():
    conf = Confidences({"a": [1.0], "b": [0.5]}, {"a": 2.0, "b": 3.5})
    assert conf.annotate([{"uuid": "b"}, {"uuid": "a"}, {"uuid": "b"}]) == [
        {"uuid": "b", "confidence_seconds": 3.5}, {"uuid": "a", "confidence_seconds": 2.0},
        {"uuid": "b", "confidence_seconds": 3.5}]


# ---------------------------------------------------------------- confidences, computed or read back

# paraphrase -> (greedy answer, K = 3 samples); agreement counted by hand
ANSWERS = {
    "what is the capital of france?": ("Paris", ["Paris", "paris, France", "London"]),  # 2 of 3
    "which city is france's capital?": ("France", ["Paris", "Lyon", "france"]),         # 1 of 3
    "france's capital is?": ("", ["Paris", "", "Lyon"]),                               # 2 of 3 (empty greedy)
    # only an answer's first line counts: "Marlowe\nor Shakespeare" is Marlowe
    "who wrote hamlet?": ("Shakespeare\nand others", ["shakespeare", "Marlowe\nor Shakespeare", "William Shakespeare"]),
    "hamlet was written by whom?": ("Marlowe", ["Shakespeare", "Bacon", "Kyd"]),        # 0 of 3
}
EXPECTED = {"q1": [2 / 3, 1 / 3], "q2": [2 / 3, 0.0]}


class FakeDecode:
    """The decode replaced by ANSWERS: greedy rows give the paraphrase's greedy answer, the j-th sampled copy of a
    prompt its j-th sample; it records what it was asked."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls, self.lm, self.stop = tokenizer, [], None, None

    def paraphrase(self, row) -> str:
        text = self.tokenizer.decode(row.input_ids, skip_special_tokens=True)
        return next(p for p in ANSWERS if text.endswith(f"Q: {p}\nA:"))

    def __call__(self, lm, rows, n, choose, stop):
        assert lm is self.lm and stop is self.stop and n == 1  # the run's model and stop rule, one row per prompt
        asked = [self.paraphrase(r) for r in rows]
        self.calls.append((choose, asked))
        if choose is confidence.greedy:
            texts = [ANSWERS[p][0] for p in asked]
        else:
            seen: dict[str, int] = {}
            texts = []
            for p in asked:
                texts.append(ANSWERS[p][1][seen.get(p, 0)])
                seen[p] = seen.get(p, 0) + 1
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], None


class Bar:
    """tqdm replaced by a recorder (what the progress bar is asked to show), iterating what it is given."""

    def __init__(self):
        self.calls = []

    def __call__(self, iterable, **kwargs):
        self.calls.append(kwargs)
        return iter(list(iterable))


@pytest.fixture
def fake(monkeypatch):
    _, tokenizer = cached_tiny("llama")
    fake = FakeDecode(tokenizer)
    fake.bar = Bar()
    monkeypatch.setattr(confidence, "decode", fake)
    monkeypatch.setattr(confidence, "tqdm", fake.bar)
    return fake


def run(dataset, folder, records=None, n=2, k=3, **kw):
    model, tokenizer = cached_tiny("llama")
    lm, stop = LanguageModel(model, tokenizer), StopRule(set(), 8)
    if isinstance(confidence.decode, FakeDecode):
        confidence.decode.lm, confidence.decode.stop = lm, stop
    return confidence.confidences(lm, dataset, records or dataset.records[:2], n, k, stop, folder,
                                  model_name="tiny-llama", **kw)


def test_confidence_is_the_share_of_samples_that_agree_with_the_greedy_answer(small_dataset, tmp_path, fake):
    got = run(small_dataset, tmp_path)
    assert got.values == {u: pytest.approx(v) for u, v in EXPECTED.items()}
    assert list(got.values) == ["q1", "q2"] and set(got.seconds) == {"q1", "q2"}
    # one greedy decode and one sampled decode per batch of missing prompts: K copies of each prompt
    assert [len(asked) for _, asked in fake.calls] == [2, 6, 2, 6]
    assert fake.calls[1][1] == ["what is the capital of france?"] * 3 + ["which city is france's capital?"] * 3
    sampler = fake.calls[1][0]
    assert isinstance(sampler, RowSampler) and len(sampler.samplers) == 6
    assert {(s.temperature, s.top_p) for s in sampler.samplers} == {(1.0, 1.0)}


def test_a_progress_bar_for_two_questions_or_more_never_left_behind(small_dataset, tmp_path, fake):
    run(small_dataset, tmp_path / "a")
    run(small_dataset, tmp_path / "b", records=small_dataset.records[:1])
    run(small_dataset, tmp_path / "c", progress=False)
    expected = dict(desc="confidence: 3 samples per paraphrase", unit="q", leave=False)
    assert fake.bar.calls == [{**expected, "disable": False}, {**expected, "disable": True},
                              {**expected, "disable": True}]


def test_the_cache_keeps_each_prompts_answers_and_cost(small_dataset, tmp_path, fake):
    import time
    start = time.perf_counter()
    got = run(small_dataset, tmp_path)
    elapsed = time.perf_counter() - start
    files = list((tmp_path / "confidence-cache").glob("*.feather"))
    assert [f.name for f in files] == ["tiny-llama-float32-cpu-k3-seed0-t1.0-p1.0-len8.feather"]
    table = pd.read_feather(files[0])
    assert len(table) == 4 and table["key"].is_unique
    first = table[table["uuid"] == "q1"].sort_values("paraphrase_index")
    assert first["paraphrase_index"].tolist() == [0, 1]
    assert first["paraphrase"].tolist() == ["what is the capital of france?", "which city is france's capital?"]
    assert first["greedy"].tolist() == ["Paris", "France"]
    assert [list(s) for s in first["samples"]] == [["Paris", "paris, France", "London"], ["Paris", "Lyon", "france"]]
    assert first["confidence"].tolist() == pytest.approx([2 / 3, 1 / 3])
    second = table[table["uuid"] == "q2"]
    assert second["greedy"].tolist() == ["Shakespeare", "Marlowe"]  # the answer's first line
    assert list(second["samples"].iloc[0]) == ["shakespeare", "Marlowe", "William Shakespeare"]
    # a question's cost is the sum of its prompts' seconds
    for uuid in ("q1", "q2"):
        assert got.seconds[uuid] == pytest.approx(table[table["uuid"] == uuid]["seconds"].sum())
        assert got.seconds[uuid] > 0
    assert 0 < sum(got.seconds.values()) <= elapsed  # the prompts' shares of the time it took


def test_each_sample_of_each_prompt_has_its_own_generator_whatever_it_is_sampled_with(small_dataset, tmp_path, fake):
    def seeds(call):
        return [s.generator.initial_seed() for s in call[0].samplers]
    run(small_dataset, tmp_path / "a")
    together = seeds(fake.calls[1])
    assert len(set(together)) == 6  # 2 prompts x 3 samples
    run(small_dataset, tmp_path / "b", records=small_dataset.records[:1], n=1)
    assert seeds(fake.calls[-1]) == together[:3]  # prompt 0 alone draws what it drew beside prompt 1


def test_cached_prompts_are_read_back_and_only_missing_ones_computed(small_dataset, tmp_path, fake):
    first = run(small_dataset, tmp_path)
    again = run(small_dataset, tmp_path)
    assert again == first and len(fake.calls) == 4  # nothing decoded
    grown = run(small_dataset, tmp_path, records=small_dataset.records[:1], n=3)
    assert len(fake.calls) == 6 and fake.calls[4][1] == ["france's capital is?"]  # only paraphrase 2 of q1
    assert grown.values == {"q1": pytest.approx([2 / 3, 1 / 3, 2 / 3])}
    assert len(pd.read_feather(next((tmp_path / "confidence-cache").glob("*.feather")))) == 5


def test_a_changed_setting_is_another_cache(small_dataset, tmp_path, fake):
    run(small_dataset, tmp_path)
    run(small_dataset, tmp_path, seed=1, temperature=0.5, top_p=0.8)
    assert len(fake.calls) == 8
    names = sorted(f.name for f in (tmp_path / "confidence-cache").glob("*.feather"))
    assert names == ["tiny-llama-float32-cpu-k3-seed0-t1.0-p1.0-len8.feather",
                     "tiny-llama-float32-cpu-k3-seed1-t0.5-p0.8-len8.feather"]
    assert {(s.temperature, s.top_p) for s in fake.calls[-1][0].samplers} == {(0.5, 0.8)}


def test_the_weights_revision_is_part_of_the_cache(small_dataset, tmp_path, fake, monkeypatch):
    model, _ = cached_tiny("llama")
    run(small_dataset, tmp_path)
    monkeypatch.setattr(model.config, "_commit_hash", "0123456789abcdef0123456789", raising=False)
    run(small_dataset, tmp_path)
    assert len(fake.calls) == 8
    assert sorted(f.name for f in (tmp_path / "confidence-cache").glob("*.feather")) == [
        "tiny-llama-0123456789abcdef0123-float32-cpu-k3-seed0-t1.0-p1.0-len8.feather",
        "tiny-llama-float32-cpu-k3-seed0-t1.0-p1.0-len8.feather"]


def test_save_entries_merges_with_what_is_there_and_keeps_the_newest_copy(tmp_path):
    path = tmp_path / "c" / "cache.feather"
    save_entries(path, [{"key": "a", "confidence": 0.1, "seconds": 1.0}, {"key": "b", "confidence": 0.2, "seconds": 1.0}])
    save_entries(path, [{"key": "b", "confidence": 0.9, "seconds": 2.0}, {"key": "c", "confidence": 0.3, "seconds": 1.0}])
    table = pd.read_feather(path)
    assert dict(zip(table["key"], table["confidence"])) == {"a": 0.1, "b": 0.9, "c": 0.3}
    assert table.index.tolist() == [0, 1, 2]
    assert confidence.cached_entries(tmp_path / "missing.feather") == {}
    assert confidence.cached_entries(path)["b"] == {"key": "b", "confidence": 0.9, "seconds": 2.0}


# ---------------------------------------------------------------- the agreement bias's weights

class VotesDecode:
    """decode replaced: each plain prompt's greedy answer is the text given for its paraphrase."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        self.tokenizer, self.answers, self.calls = tokenizer, answers, 0

    def __call__(self, lm, rows, n, choose, stop):
        assert n == 1 and choose is confidence.greedy  # one greedy row per prompt
        self.calls += 1
        texts = []
        for row in rows:
            text = self.tokenizer.decode(row.input_ids, skip_special_tokens=True)
            texts.append(next(a for p, a in self.answers.items() if text.endswith(f"Q: {p}\nA:")))
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], None


def test_agreement_counts_the_single_answers_that_agree_with_each_paraphrases_own(monkeypatch):
    """Votes by upstream's rule (either normalised answer contains the other): 'Paris' and 'paris, france' agree,
    'London' stands alone, an empty answer gets no vote and gives none; one decode of all N prompts per batch."""
    _, tokenizer = cached_tiny("llama")
    paraphrases = ["where is the louvre?", "the louvre is in?", "louvre city?", "which city has the louvre?"]
    answers = dict(zip(paraphrases, ["Paris", "paris, france", "London", "\n"]))
    dataset = Dataset("t", "qa", [Record("q", paraphrases, ["Paris"]), Record("r", paraphrases[::-1], ["Paris"])], [])
    fake = VotesDecode(tokenizer, answers)
    monkeypatch.setattr(confidence, "decode", fake)
    model, _ = cached_tiny("llama")
    lm = LanguageModel(model, tokenizer)
    start = time.perf_counter()
    got = confidence.agreements(lm, dataset, dataset.records, 4, StopRule(set(), 8))
    elapsed = time.perf_counter() - start
    assert got.values == {"q": [2.0, 2.0, 1.0, 0.0], "r": [0.0, 1.0, 2.0, 2.0]} and fake.calls == 1
    assert set(got.seconds) == {"q", "r"} and 0 < got.seconds["q"] == got.seconds["r"] <= elapsed / 2
    assert confidence.normalised_weights(got.values["q"]) == ([0.4, 0.4, 0.2, 0.0], False)
    three = confidence.agreements(lm, dataset, dataset.records[:1], 3, StopRule(set(), 8))
    assert three.values == {"q": [2.0, 2.0, 1.0]}  # only the first N paraphrases vote


def test_bias_weights_asks_the_rule_the_bias_names(monkeypatch, small_dataset, tmp_path):
    """agreement: the N single answers' votes; confidence: the sampled confidences (with the run's K, seed and
    cache folder); any other bias: none."""
    model, tokenizer = cached_tiny("llama")
    lm, stop = LanguageModel(model, tokenizer), StopRule(set(), 8)
    calls = []
    monkeypatch.setattr(confidence, "agreements", lambda *a: calls.append(("agreement", a)) or "votes")
    monkeypatch.setattr(confidence, "confidences",
                        lambda *a, **kw: calls.append(("confidence", a, kw)) or "sampled")
    records = small_dataset.records[:2]
    assert confidence.bias_weights(lm, small_dataset, records, 3, "agreement", stop, 4, tmp_path, 7, "m") == "votes"
    assert calls.pop() == ("agreement", (lm, small_dataset, records, 3, stop))
    assert confidence.bias_weights(lm, small_dataset, records, 3, "confidence", stop, 4, tmp_path, 7, "m",
                                   progress=False) == "sampled"
    assert calls.pop() == ("confidence", (lm, small_dataset, records, 3, 4, stop, tmp_path, 7),
                           dict(model_name="m", progress=False))
    for bias in ("uniform", "none", "shares", "-1.5"):
        assert confidence.bias_weights(lm, small_dataset, records, 3, bias, stop, 4, tmp_path, 7, "m") is None
    assert calls == []


def test_check_cache_reads_the_runs_cache_file_and_names_a_broken_one(tmp_path):
    model, tokenizer = cached_tiny("llama")
    lm, stop = LanguageModel(model, tokenizer), StopRule(set(), 8)
    confidence.check_cache(lm, 3, stop, tmp_path, 0, "tiny-llama")  # no cache yet: nothing to read
    path = confidence.confidence_settings(lm, 3, stop, 0, "tiny-llama").cache_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a table")
    with pytest.raises(InputError, match=f"cannot read {path}"):
        confidence.check_cache(lm, 3, stop, tmp_path, 0, "tiny-llama")
    confidence.check_cache(lm, 4, stop, tmp_path, 0, "tiny-llama")  # another K: another file, fine
