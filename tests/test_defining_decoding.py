"""Defining behaviour of the decode loop's pieces (decoding.py): left padding written out by hand, the shared
prefix length, the stop rule, EOS ids, answer text, statistics, the sampler's temperature and nucleus, and the
loop itself against a full recompute of every sequence at every step (upstream's algorithm, written here) on a
tiny random model: tokens, early stops, the statistics' exact counts and the reused prefix."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from conftest import cached_tiny
from decoding import (DecodeStats, LanguageModel, PrefixCache, Row, Sampler, StopRule, answer_text, decode, eos_ids,
                      greedy, pad_left, shared_prefix_length)
from segment_mask import FUSED_SEGMENT, PAD_SEGMENT, SHOT_ANSWER, SHOT_STRIDE

F = FUSED_SEGMENT


def test_pad_left_pads_before_each_rows_tokens():
    rows = [Row([7, 8, 9], [0, 1, F], [0, 1, 2]), Row([5], [F], [4])]
    ids, pos, seg = pad_left(rows, 99, torch.device("cpu"))
    assert ids.tolist() == [[7, 8, 9], [99, 99, 5]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 4]]
    assert seg.tolist() == [[0, 1, F], [PAD_SEGMENT, PAD_SEGMENT, F]]
    assert seg.dtype == torch.int32 and ids.dtype == torch.int64


def test_pad_left_after_a_shared_prefix_pads_in_the_middle():
    rows = [Row([1, 2, 7, 8, 9], [0, 0, 1, 1, F], [0, 1, 2, 3, 4]), Row([1, 2, 5], [0, 0, F], [0, 1, 2])]
    ids, pos, seg = pad_left(rows, 99, torch.device("cpu"), after=2)
    assert ids.tolist() == [[1, 2, 7, 8, 9], [1, 2, 99, 99, 5]]
    assert pos.tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 0, 2]]
    assert seg.tolist() == [[0, 0, 1, 1, F], [0, 0, PAD_SEGMENT, PAD_SEGMENT, F]]


def test_shared_prefix_length_counts_the_leading_prefix_every_row_shares():
    a = Row([1, 2, 3, 4, 5], [0, 0, 0, 1, F], [0, 1, 2, 3, 4])
    b = Row([1, 2, 3, 6], [0, 0, 0, F], [0, 1, 2, 3])
    assert shared_prefix_length([a, b]) == 3
    # the ids differ at token 2
    assert shared_prefix_length([a, Row([1, 2, 9, 6], [0, 0, 0, F], [0, 1, 2, 3])]) == 2
    # a token that is not the prefix segment in one row ends it
    assert shared_prefix_length([a, Row([1, 2, 3, 6], [0, 0, 1, F], [0, 1, 2, 3])]) == 2
    # positions must be the same in every row
    assert shared_prefix_length([Row([1, 2, 3, 4], [0, 0, 0, F], [0, 1, 5, 6]), Row([1, 2, 3, 4], [0, 0, 0, F],
                                                                                    [0, 1, 2, 6])]) == 2
    # fused few-shot examples (paraphrases E1, E2 at their own positions, answer EA) are shared; the question is not
    e1, e2, ea = SHOT_STRIDE + 1, SHOT_STRIDE + 2, SHOT_STRIDE + SHOT_ANSWER
    fused = Row([1, 7, 8, 9, 2, 5, 6], [0, e1, e2, ea, 1, 2, F], [0, 1, 1, 2, 3, 3, 4])
    assert shared_prefix_length([fused, fused]) == 4
    assert shared_prefix_length([fused, Row([1, 7, 8, 9, 3], [0, e1, e2, ea, F], [0, 1, 1, 2, 3])]) == 4
    assert shared_prefix_length([fused, Row([1, 7, 8, 9, 2], [0, e1, e1, ea, F], [0, 1, 1, 2, 3])]) == 2
    # every row keeps at least one token of its own: identical rows of 4 share 3
    assert shared_prefix_length([b, b]) == 3
    assert shared_prefix_length([Row([1], [0], [0])]) == 0
    # a row that is all prefix up to its last token
    assert shared_prefix_length([Row([1, 2, 3], [0, 0, 0], [0, 1, 2]), a]) == 2


class Letters:
    """A tokenizer stand-in: token t decodes to chr(t); 0 is a special token (dropped when asked)."""
    eos_token_id = 0

    def decode(self, tokens, skip_special_tokens=False):
        return "".join(chr(t) for t in tokens if not (skip_special_tokens and t == 0))


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_stop_rule_stops_at_the_budget_at_eos_and_after_the_first_line():
    tok = Letters()
    rule = StopRule({0, 3}, 5)
    assert not rule.done(ids("Pari"), tok)
    assert rule.done(ids("Paris"), tok)  # 5 tokens: the budget
    assert rule.done(ids("Par") + [3], tok) and rule.done([0], tok)  # EOS
    assert not rule.done([3, 65], tok)  # EOS only counts as the last token
    assert rule.done(ids("A\n"), tok)  # the first line is complete
    assert not rule.done(ids("\n\nA"), tok)  # leading newlines are not an answer yet
    assert rule.done(ids("\nA\n"), tok)
    assert not StopRule(set(), 5, first_line_only=False).done(ids("A\nB"), tok)
    assert StopRule(set(), 3, first_line_only=False).done(ids("A\nB"), tok)


def test_eos_ids_join_the_generation_config_and_the_tokenizer():
    def model(eos):
        return SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))
    tok = SimpleNamespace(eos_token_id=2)
    assert eos_ids(model([5, 6]), tok) == {2, 5, 6}
    assert eos_ids(model(5), tok) == {2, 5}
    assert eos_ids(model(None), tok) == {2}
    assert eos_ids(model(None), SimpleNamespace(eos_token_id=None)) == set()
    assert eos_ids(model(0), SimpleNamespace(eos_token_id=None)) == {0}


def test_answer_text_is_the_first_non_empty_line_stripped_and_the_raw_text():
    assert answer_text(Letters(), ids("\n  Paris \nFrance")) == ("Paris", "\n  Paris \nFrance")
    assert answer_text(Letters(), [0] + ids(" Lyon") + [0]) == ("Lyon", " Lyon")
    assert answer_text(Letters(), ids(" \n ")) == ("", " \n ")
    assert answer_text(Letters(), []) == ("", "")


def test_decode_stats_add_sums_every_field():
    total = DecodeStats(1, 2, 3, 0.5).add(DecodeStats(10, 20, 30, 0.25))
    assert total == DecodeStats(11, 22, 33, 0.75)


def test_greedy_takes_each_questions_first_row():
    logits = torch.tensor([[[0.0, 2.0, 1.0], [9.0, 0.0, 0.0]], [[0.0, 0.0, 1.0], [0.0, 9.0, 0.0]]])
    assert greedy(logits, torch.tensor([0, 1])).tolist() == [1, 2]


def frequencies(sampler: Sampler, probs: list[float], draws: int = 20000) -> list[float]:
    logits = torch.tensor(probs).log().expand(draws, 1, len(probs))
    tokens = sampler(logits, torch.arange(draws))
    return (torch.bincount(tokens, minlength=len(probs)).float() / draws).tolist()


def test_sampler_draws_from_the_softmax_at_temperature_one():
    got = frequencies(Sampler(torch.Generator().manual_seed(0)), [0.5, 0.3, 0.2])
    assert got == pytest.approx([0.5, 0.3, 0.2], abs=0.015)


def test_sampler_temperature_sharpens_the_distribution():
    # T = 0.5 squares the probabilities: (0.25, 0.09, 0.04) / 0.38
    got = frequencies(Sampler(torch.Generator().manual_seed(0), temperature=0.5), [0.5, 0.3, 0.2])
    assert got == pytest.approx([0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38], abs=0.015)


def test_sampler_top_p_keeps_only_the_nucleus():
    # top-p 0.6: token 0 (mass before it 0) and token 1 (0.5 before it) stay; token 2 (0.8 before it) goes
    got = frequencies(Sampler(torch.Generator().manual_seed(0), top_p=0.6), [0.5, 0.3, 0.2])
    assert got[2] == 0.0 and got == pytest.approx([0.625, 0.375, 0.0], abs=0.015)
    # the order is by probability, not by token id
    got = frequencies(Sampler(torch.Generator().manual_seed(0), top_p=0.6), [0.2, 0.3, 0.5])
    assert got[0] == 0.0 and got == pytest.approx([0.0, 0.375, 0.625], abs=0.015)


def test_sampler_is_reproducible_per_seed():
    logits = torch.tensor([0.25] * 4).log().expand(50, 1, 4)
    first = Sampler(torch.Generator().manual_seed(3))(logits, torch.arange(50))
    again = Sampler(torch.Generator().manual_seed(3))(logits, torch.arange(50))
    other = Sampler(torch.Generator().manual_seed(4))(logits, torch.arange(50))
    assert first.tolist() == again.tolist() and first.tolist() != other.tolist()


# ---------------------------------------------------------------- the loop, on a tiny random model

@pytest.fixture(scope="module")
def llama():
    return cached_tiny("llama")


def prompt_rows(tokenizer, texts: list[str]) -> list[Row]:
    """Plain rows as a single prompt is laid out: the first 4 tokens the shared prefix, then the rest."""
    rows = []
    for text in texts:
        tokens = tokenizer(text)["input_ids"]
        rows.append(Row(tokens, [0] * 4 + [1] * (len(tokens) - 5) + [F], list(range(len(tokens)))))
    return rows


@torch.inference_mode()
def full_recompute(model, prompt: list[int], steps: int, stop_at: set[int] = frozenset()) -> list[int]:
    """Greedy decoding that runs the whole sequence through the model at every step."""
    out: list[int] = []
    for _ in range(steps):
        out.append(int(model(torch.tensor([prompt + out])).logits[0, -1].argmax()))
        if out[-1] in stop_at:
            break
    return out


TEXTS = ["Q: who wrote hamlet?\nA:", "Q: the capital of france, please?\nA:", "Q: why?\nA:"]


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_decode_equals_a_full_recompute_and_counts_its_work(llama, reuse_prefix):
    model, tokenizer = llama
    rows = prompt_rows(tokenizer, TEXTS)
    lm = LanguageModel(model, tokenizer, PrefixCache() if reuse_prefix else None)
    start = time.perf_counter()
    outputs, stats = decode(lm, rows, 1, greedy, StopRule(set(), 4, first_line_only=False))
    elapsed = time.perf_counter() - start
    assert outputs == [full_recompute(model, r.input_ids, 4) for r in rows]
    width = max(len(r.input_ids) for r in rows)
    if reuse_prefix:  # the 4 prefix tokens once, then every row's tokens after them (padding included)
        assert stats.prefill_tokens == 4 + 3 * (width - 4)
    else:
        assert stats.prefill_tokens == 3 * width
    assert stats.steps == 3 and stats.decode_tokens == 3 * 3
    assert 0 < stats.seconds <= elapsed  # the decode's own wall time


def test_a_finished_question_leaves_the_batch_and_the_others_go_on(llama):
    model, tokenizer = llama
    rows = prompt_rows(tokenizer, TEXTS)
    free = [full_recompute(model, r.input_ids, 6) for r in rows]
    stop_token = free[1][1]  # question 1 ends at its second token
    expected = [full_recompute(model, r.input_ids, 6, {stop_token}) for r in rows]
    assert len(expected[1]) == 2
    outputs, stats = decode(LanguageModel(model, tokenizer), rows, 1, greedy, StopRule({stop_token}, 6, False))
    assert outputs == expected
    lengths = [len(e) for e in expected]
    # step s runs the questions still decoding after s tokens, one row each, and finished ones kept as ballast
    # while fewer than MIN_ROWS rows would be left
    from decoding import MIN_ROWS
    assert stats.steps == max(lengths) - 1
    present, run = len(rows), 0
    for s in range(1, max(lengths)):
        present = max(sum(1 for n in lengths if n > s), min(MIN_ROWS, present))
        run += present
    assert stats.decode_tokens == run


def test_n_rows_per_question_get_the_chosen_token_together(llama):
    """n = 2: rows 2q and 2q+1 belong to question q; choose sees [Q, n, V] and both rows get its token."""
    model, tokenizer = llama
    rows = prompt_rows(tokenizer, [TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[0]])
    seen = []

    def second_row(logits, live):
        seen.append((tuple(logits.shape[:2]), live.tolist()))
        return logits[:, 1].argmax(-1)  # question q follows its second row
    outputs, stats = decode(LanguageModel(model, tokenizer), rows, 2, second_row, StopRule(set(), 3, False))
    assert seen[0] == ((2, 2), [0, 1])
    assert outputs == [full_recompute(model, rows[1].input_ids, 3), full_recompute(model, rows[3].input_ids, 3)]
    assert stats.decode_tokens == 2 * 2 * 2  # 2 steps, 2 questions, 2 rows each


def test_the_prefix_is_computed_once_and_kept_beside_another_prefix(llama):
    model, tokenizer = llama
    lm = LanguageModel(model, tokenizer)
    rows = prompt_rows(tokenizer, TEXTS[:2])
    stop = StopRule(set(), 2, False)
    first = decode(lm, rows, 1, greedy, stop)
    width = max(len(r.input_ids) for r in rows)
    assert first[1].prefill_tokens == 4 + 2 * (width - 4)
    again = decode(lm, rows, 1, greedy, stop)
    assert again[0] == first[0] and again[1].prefill_tokens == 2 * (width - 4)  # nothing recomputed
    other = prompt_rows(tokenizer, ["A: who wrote hamlet?\nA:", "A: why not?\nA:"])
    third = decode(lm, other, 1, greedy, stop)
    assert third[0] == [full_recompute(model, r.input_ids, 2) for r in other]
    assert third[1].prefill_tokens == 4 + 2 * (max(len(r.input_ids) for r in other) - 4)
    back = decode(lm, rows, 1, greedy, stop)  # the first prefix is still kept: a sweep alternates between them
    assert back[0] == first[0] and back[1].prefill_tokens == 2 * (width - 4)
    from decoding import PREFIX_ENTRIES
    for k in range(PREFIX_ENTRIES):  # more prefixes than are kept: the least recently used goes
        decode(lm, prompt_rows(tokenizer, [f"Z{k}: who wrote it?\nA:", f"Z{k}: why not?\nA:"]), 1, greedy, stop)
    assert len(lm.prefix_cache.entries) == PREFIX_ENTRIES
    assert decode(lm, rows, 1, greedy, stop)[1].prefill_tokens == 4 + 2 * (width - 4)


def test_a_finished_question_takes_all_its_rows_out_of_the_batch(llama):
    """n = 2 rows per question; question 0 stops early: both its rows leave, question 1's rows keep decoding."""
    model, tokenizer = llama
    rows = prompt_rows(tokenizer, [TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[1]])

    def second_row(logits, live):
        return logits[:, 1].argmax(-1)
    free = [full_recompute(model, rows[1].input_ids, 5), full_recompute(model, rows[3].input_ids, 5)]
    stop_token = free[0][1]
    expected = [full_recompute(model, rows[1].input_ids, 5, {stop_token}),
                full_recompute(model, rows[3].input_ids, 5, {stop_token})]
    outputs, stats = decode(LanguageModel(model, tokenizer), rows, 2, second_row, StopRule({stop_token}, 5, False))
    assert outputs == expected and len(expected[0]) == 2
    lengths = [len(e) for e in expected]
    assert stats.decode_tokens == 2 * sum(sum(1 for n in lengths if n > s) for s in range(1, max(lengths)))
