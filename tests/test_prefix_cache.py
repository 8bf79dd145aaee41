"""The shared prefix (instruction and few-shot examples) is encoded once per run and reused by every
batch: with and without the reuse, identical tokens and logits within 1e-5 (float32) for every method,
on tiny Llama, Qwen2 and Qwen3 models, with padded batches and early stops."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from conftest import FEW_SHOT, QUESTIONS, cached_tiny
from dataset import Dataset, Record
from decoding import LanguageModel, StopRule, decode, fused_row, single_rows
from fusion import FusionSettings
from segment_mask import SegmentMask, segment_biases

MAX_NEW = 5
EXTRA = [Record("q4", ["a much longer question about the history of the roman empire and its fall?", "why did rome fall?",
                       "rome's fall: why?"], ["many reasons"])]


class Recorder:
    """A greedy chooser that keeps every step's logits, so two decodes can be compared number by number."""

    def __init__(self, fuse=None):
        self.logits: list[torch.Tensor] = []
        self.fuse = fuse

    def __call__(self, logits: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        self.logits.append(logits.clone())
        return self.fuse(logits) if self.fuse else logits[:, 0].argmax(-1)


def both_ways(model, tokenizer, run):
    """run(lm) with the prefix reused (one cache over two runs), then computed in every batch: (outputs,
    recorder) of the second reused run and of the fresh one."""
    reused = LanguageModel(model, tokenizer)
    run(reused)
    return run(reused), run(LanguageModel(model, tokenizer, prefix_cache=None))


def assert_same(reused, fresh):
    (out_a, rec_a), (out_b, rec_b) = reused, fresh
    assert out_a == out_b
    assert len(rec_a.logits) == len(rec_b.logits)
    for a, b in zip(rec_a.logits, rec_b.logits):
        assert (a - b).abs().max() <= 1e-5


def rows_of(tokenizer, kind: str):
    ds = Dataset("t", "qa", [*QUESTIONS, *EXTRA], FEW_SHOT)
    parts = [ds.prompt_parts(r, 3) for r in ds.records]
    if kind == "single":
        return [row for p in parts for row in single_rows(tokenizer, p, [0, 1, 2])], 3
    return [fused_row(tokenizer, p, kind) for p in parts], 1


def early_stop(model, tokenizer, rows, n, renderer=None) -> StopRule:
    """A stop rule whose EOS is a token the first question emits at step 2: it stops early, others may not."""
    probe = StopRule(set(), MAX_NEW, first_line_only=False)
    first = decode(LanguageModel(model, tokenizer), rows, n, Recorder(), probe, renderer)[0][0]
    return StopRule({first[1]}, MAX_NEW, first_line_only=False)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("kind, n, fuse", [
    ("single", 1, None),  # per_prompt / origin / confidence sampling / paraphrasing: plain rows
    ("single", 3, lambda l: torch.log_softmax(l, -1).mean(1).argmax(-1)),  # logit avg
    ("single", 3, lambda l: torch.softmax(l, -1).max(1).values.argmax(-1)),  # logit max
])
def test_plain_rows_same_with_and_without_prefix_reuse(family, kind, n, fuse):
    model, tokenizer = cached_tiny(family)
    rows, _ = rows_of(tokenizer, kind)
    stop = early_stop(model, tokenizer, rows, n)

    def run(lm):
        rec = Recorder(fuse)
        return decode(lm, rows, n, rec, stop)[0], rec
    assert_same(*both_ways(model, tokenizer, run))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("positions, backend, temperature", [
    ("left", "sdpa", 1.0), ("right", "sdpa", 0.5), ("continuous", "sdpa", 1.0), ("left", "flex", 1.0)])
def test_fused_rows_same_with_and_without_prefix_reuse(family, positions, backend, temperature):
    model, tokenizer = cached_tiny(family)
    rows, _ = rows_of(tokenizer, positions)
    renderer = partial(SegmentMask, settings=FusionSettings(backend=backend, temperature=temperature),
                       biases=torch.full((len(rows), 3), -math.log(3)))
    stop = early_stop(model, tokenizer, rows, 1, renderer)

    def run(lm):
        rec = Recorder()
        return decode(lm, rows, 1, rec, stop, renderer)[0], rec
    assert_same(*both_ways(model, tokenizer, run))


SHOT_PARAPHRASES = [["what color is the sky?", "the sky is what color?", "which color does the sky have?"],
                    ["how many legs does a cat have?", "a cat has how many legs?"]]  # the second one cycled


def fused_fewshot_rows(tokenizer, positions: str):
    ds = Dataset("t", "qa", [*QUESTIONS, *EXTRA], FEW_SHOT, SHOT_PARAPHRASES)
    return [fused_row(tokenizer, ds.prompt_parts(r, 3, "fused"), positions) for r in ds.records]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("positions, backend, temperature, bias, isolation", [
    ("left", "sdpa", 1.0, "sqrt", "full"), ("right", "sdpa", 0.5, "uniform", "full"),
    ("continuous", "sdpa", 1.0, "none", "none"), ("left", "flex", 1.0, "sqrt", "full"),
    ("right", "flex", 0.5, "uniform", "full")])
def test_fused_fewshot_examples_are_encoded_once_and_change_nothing(family, positions, backend, temperature, bias,
                                                                    isolation):
    """--fewshot-format fused: the examples' paraphrase segments are part of the shared prefix, encoded once under
    the rows' own mask (their bias, 1/T, isolation); with and without the reuse the same tokens and logits."""
    model, tokenizer = cached_tiny(family)
    rows = fused_fewshot_rows(tokenizer, positions)
    settings = FusionSettings(positions=positions, backend=backend, temperature=temperature, bias=bias,
                              fewshot="fused", isolation=isolation)
    biases = None if bias == "none" else torch.tensor([segment_biases(3, bias)] * len(rows))
    renderer = partial(SegmentMask, settings=settings, biases=biases)
    stop = early_stop(model, tokenizer, rows, 1, renderer)

    def run(lm):
        rec = Recorder()
        return decode(lm, rows, 1, rec, stop, renderer)[0], rec
    assert_same(*both_ways(model, tokenizer, run))
    lm = LanguageModel(model, tokenizer)
    _, first = decode(lm, rows, 1, Recorder(), stop, renderer)
    _, again = decode(lm, rows, 1, Recorder(), stop, renderer)
    question = rows[0].segment_ids.index(1)  # the first question token: the same place in every row
    assert len(next(iter(lm.prefix_cache.entries))[0]) == question  # every example, up to the question
    assert first.prefill_tokens - again.prefill_tokens == question


def test_the_examples_prefix_is_not_shared_between_biases():
    """The examples' bias (-log N, or -1/2 log N under sqrt) is in their KV: another bias encodes them again."""
    model, tokenizer = cached_tiny("llama")
    rows = fused_fewshot_rows(tokenizer, "left")
    stop = StopRule(set(), 2, first_line_only=False)
    lm = LanguageModel(model, tokenizer)
    tokens = []
    for bias in ("uniform", "uniform", "sqrt", "sqrt", "uniform"):
        renderer = partial(SegmentMask, settings=FusionSettings(bias=bias, fewshot="fused"),
                           biases=torch.tensor([segment_biases(3, bias)] * len(rows)))
        tokens.append(decode(lm, rows, 1, Recorder(), stop, renderer)[1].prefill_tokens)
    computed, reused = tokens[0], tokens[1]
    assert computed - reused == rows[0].segment_ids.index(1)  # the examples, once
    assert tokens == [computed, reused, computed, reused, reused]  # each bias its own entry, both kept


def test_prefix_is_computed_once_per_run_and_another_format_gets_its_own():
    model, tokenizer = cached_tiny("llama")
    rows, _ = rows_of(tokenizer, "left")
    stop = StopRule(set(), 2, first_line_only=False)
    lm = LanguageModel(model, tokenizer)
    cache = lm.prefix_cache
    fused = partial(SegmentMask, settings=FusionSettings())
    _, first = decode(lm, rows[:2], 1, Recorder(), stop, fused)
    _, second = decode(lm, rows[2:], 1, Recorder(), stop, fused)
    prefix_len = len(next(iter(cache.entries))[0])
    assert prefix_len > 100  # the instruction and both few-shot examples
    assert first.prefill_tokens == prefix_len + 2 * (max(len(r.input_ids) for r in rows[:2]) - prefix_len)
    assert second.prefill_tokens == 2 * (max(len(r.input_ids) for r in rows[2:]) - prefix_len)  # reused
    other = Dataset("t", "qa", QUESTIONS, [("another example?", "yes")])
    decode(lm, [fused_row(tokenizer, other.prompt_parts(QUESTIONS[0], 3))], 1, Recorder(), stop, fused)
    assert len(cache.entries) == 2 and len(list(cache.entries)[-1][0]) != prefix_len  # a new format, built beside


def test_weights_changed_in_place_are_not_served_from_the_prefix_cache():
    """A notebook that edits the model's weights in place (load_state_dict, a fine-tuning step) gets the new
    weights' prefix, not the cached one: the answers equal a fresh model's, and the prefix is recomputed."""
    from models import tiny_model
    model, tokenizer = tiny_model("llama", seed=0)
    other, _ = tiny_model("llama", seed=1)
    rows, _ = rows_of(tokenizer, "single")
    stop = StopRule(set(), 3, first_line_only=False)
    lm = LanguageModel(model, tokenizer)
    before, _ = decode(lm, rows, 1, Recorder(), stop)
    model.load_state_dict(other.state_dict())
    after, stats = decode(lm, rows, 1, Recorder(), stop)
    expected, _ = decode(LanguageModel(other, tokenizer, prefix_cache=None), rows, 1, Recorder(), stop)
    assert after == expected and after != before
    _, reused = decode(lm, rows, 1, Recorder(), stop)
    prefix_len = len(next(iter(lm.prefix_cache.entries))[0])
    assert stats.prefill_tokens == reused.prefill_tokens + prefix_len  # after the change, the prefix ran again
