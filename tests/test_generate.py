"""Logit-level self-ensemble: fusion rules on hand-made logits, and the decoding invariants
(equal to transformers' generate, N copies of one prompt, batch composition, cache vs recompute)."""
from __future__ import annotations

import torch

from conftest import generate_reference
from confidence import normalised_weights
from dataset import Dataset, Record
from decoding import LanguageModel, StopRule, decode, greedy, single_rows
from methods import answer_ensemble, answer_per_prompt, fuse_logits

MAX_NEW = 8


def no_stop(model, tokenizer) -> StopRule:
    """Stops only at max_new_tokens, so every method decodes the same number of steps."""
    return StopRule(set(), MAX_NEW, first_line_only=False)


def test_fusion_rules_on_hand_made_logits():
    # two paraphrases, three tokens. Row 0 is confident in token 0, row 1 mildly prefers token 1.
    logits = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 1.0, 0.9]]]).log_softmax(-1)
    assert fuse_logits(logits, "max").item() == 0  # the highest single probability wins
    mixed = torch.tensor([[[2.0, 1.9, -9.0], [-9.0, 1.9, 2.0]]])
    # avg of log-probs favours the token both rows like (1); max picks a row's favourite (0 or 2)
    assert fuse_logits(mixed, "avg").item() == 1
    assert fuse_logits(mixed, "max").item() in (0, 2)
    weights = torch.tensor([[0.0, 1.0]])
    assert fuse_logits(mixed, "weighted_avg", weights).item() == 2  # all weight on row 1
    assert fuse_logits(mixed, "weighted_max", torch.tensor([[0.9, 0.1]])).item() == 0
    assert fuse_logits(mixed, "weighted_max", torch.tensor([[0.1, 0.9]])).item() == 2


def test_zero_confidence_falls_back_to_equal_weights_and_says_so():
    assert normalised_weights([0.0, 0.0, 0.0]) == ([1 / 3] * 3, True)
    weights, fallback = normalised_weights([0.2, 0.6])
    assert not fallback and abs(weights[1] - 0.75) < 1e-9


def test_per_prompt_equals_transformers_generate(tiny, small_dataset):
    model, tokenizer = tiny
    parts = [small_dataset.prompt_parts(r, 3) for r in small_dataset.records]
    rows = [row for p in parts for row in single_rows(tokenizer, p, [0, 1, 2])]
    ours, _ = decode(LanguageModel(model, tokenizer), rows, 1, greedy, no_stop(model, tokenizer))
    for row, tokens in zip(rows, ours):
        assert tokens == generate_reference(model, tokenizer, row.input_ids, MAX_NEW)


def test_avg_and_max_of_copies_equal_the_single_prompt(tiny):
    model, tokenizer = tiny
    question = "who painted the mona lisa?"
    copies = Dataset("t", "qa", [Record("c", [question] * 4, ["Leonardo"])], [("2+2?", "4")])
    stop = no_stop(model, tokenizer)
    alone = answer_per_prompt(LanguageModel(model, tokenizer), copies, copies.records, 1, stop, "origin")[0][0]
    for method in ("avg", "max"):
        fused = answer_ensemble(LanguageModel(model, tokenizer), copies, copies.records, 4, stop, method)[0][0]
        assert fused["generation"] == alone["generation"] and fused["new_tokens"] == MAX_NEW


def test_batch_composition_changes_nothing(tiny, small_dataset):
    model, tokenizer = tiny
    stop = no_stop(model, tokenizer)
    records = small_dataset.records
    for method in ("avg", "max"):
        together = answer_ensemble(LanguageModel(model, tokenizer), small_dataset, records, 3, stop, method)[0]
        alone = [answer_ensemble(LanguageModel(model, tokenizer), small_dataset, [r], 3, stop, method)[0][0] for r in records]
        assert [r["generation"] for r in together] == [r["generation"] for r in alone]


def test_finished_question_is_dropped_without_touching_others(llama, small_dataset):
    """A question that stops early (small max budget via EOS) must not change the others' tokens."""
    model, tokenizer = llama
    stop = no_stop(model, tokenizer)
    rows = [row for r in small_dataset.records for row in single_rows(tokenizer, small_dataset.prompt_parts(r, 3), [0])]
    full, _ = decode(LanguageModel(model, tokenizer), rows, 1, greedy, stop)
    # make question 0's second token an EOS: it finishes after two steps, the others must be unchanged
    early = StopRule({full[0][1]}, MAX_NEW, first_line_only=False)
    cut, stats = decode(LanguageModel(model, tokenizer), rows, 1, greedy, early)
    assert cut[0] == full[0][:full[0].index(full[0][1]) + 1]
    for q in (1, 2):
        stop_at = next((i for i, t in enumerate(full[q]) if t == full[0][1]), len(full[q]) - 1)
        assert cut[q] == full[q][:stop_at + 1]


def test_cached_decoding_equals_full_recompute(tiny, small_dataset):
    """Upstream's algorithm: re-run every paraphrase's whole sequence each step, fuse, append."""
    model, tokenizer = tiny
    record = small_dataset.records[0]
    rows = single_rows(tokenizer, small_dataset.prompt_parts(record, 3), [0, 1, 2])
    ours = answer_ensemble(LanguageModel(model, tokenizer), small_dataset, [record], 3, no_stop(model, tokenizer), "avg")[0][0]
    generated: list[int] = []
    with torch.inference_mode():
        for _ in range(MAX_NEW):
            step_logits = [model(torch.tensor([row.input_ids + generated])).logits[0, -1] for row in rows]
            generated.append(fuse_logits(torch.stack(step_logits)[None], "avg").item())
    assert ours["generation"] == tokenizer.decode(generated, skip_special_tokens=True)


def test_stop_rule_first_line_and_eos(llama):
    _, tokenizer = llama
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    word = tokenizer("Paris", add_special_tokens=False)["input_ids"]
    rule = StopRule({tokenizer.eos_token_id}, 50)
    assert not rule.done(newline, tokenizer)  # a leading newline is not an answer yet
    assert rule.done(newline + word + newline, tokenizer)
    assert rule.done(word + [tokenizer.eos_token_id], tokenizer)
    assert StopRule(set(), 3).done([5, 6, 7], tokenizer)
