"""Attention-level fusion: isolation of paraphrases, N=1 equals plain greedy decoding, flex equals
sdpa, cached decoding equals a full recompute, batch composition, and the mask's picture."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from conftest import FEW_SHOT, QUESTIONS, cached_tiny, generate_reference
from dataset import Dataset, Record
from functools import partial

from decoding import (LanguageModel, StopRule, build_row, decode, encode_prompt, fused_row, greedy, new_cache, pad_left,
                      prefill)
from fusion import FusionSettings
from methods import answer_fused as answer_fused_with_stats
from segment_mask import FLEX_ATTENTION, FUSED_SEGMENT, SegmentMask, build_dense_mask, segment_biases, segment_mask_mod

MAX_NEW = 6


def no_stop() -> StopRule:
    return StopRule(set(), MAX_NEW, first_line_only=False)


def answer_fused(model, tokenizer, dataset, batch, n, stop, weights=None, **settings) -> list[dict]:
    """methods.answer_fused's rows, with the FusionSettings given as keywords."""
    return answer_fused_with_stats(LanguageModel(model, tokenizer), dataset, batch, n, stop, FusionSettings(**settings),
                                   weights)[0]


def fused_prefill(model, rows, backend="sdpa", biases=None, temperature=1.0):
    """Run the fused layout once; return (cache, all logits, padded ids)."""
    ids, pos, seg = pad_left(rows, 0, model.device)
    mask = SegmentMask(seg, MAX_NEW, FusionSettings(backend=backend, temperature=temperature), biases, positions=pos)
    with mask.attention(model):
        logits, cache = prefill(model, ids, pos, mask.prefill(), logits_to_keep=0, cache=new_cache(model, True))
    return cache, logits, ids


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_each_paraphrase_is_encoded_as_if_alone(small_dataset, family, backend):
    """K/V of every paraphrase segment after the fused prefill equal those of prefix + that paraphrase
    run alone (left positions), for a padded batch of two questions, through both backends; Qwen3
    normalises q and k per head, so its keys are checked after the norm; Gemma 3's rows run far past its
    16-token window, so its sliding layers' keys hold only what the window lets through."""
    model, tokenizer = cached_tiny(family)
    records = small_dataset.records[:2]
    parts = [small_dataset.prompt_parts(r, 3) for r in records]
    rows = [fused_row(tokenizer, p) for p in parts]
    cache, _, ids = fused_prefill(model, rows, backend)
    width = ids.shape[1]
    for b, p in enumerate(parts):
        prefix, segments, _ = encode_prompt(tokenizer, p.prefix, p.segments, p.suffix)
        start = width - len(rows[b].input_ids) + len(prefix)  # left padding shifts the row
        for seg in segments:
            alone = DynamicCache()  # every key kept (a sliding layer's own cache keeps only its window)
            with torch.inference_mode():
                model(input_ids=torch.tensor([prefix + seg]), cache=alone)
            for layer, ref in zip(cache.layers, alone.layers):
                got_k = layer.keys[b, :, start:start + len(seg)]
                got_v = layer.values[b, :, start:start + len(seg)]
                assert (got_k - ref.keys[0, :, len(prefix):]).abs().max() <= 1e-5
                assert (got_v - ref.values[0, :, len(prefix):]).abs().max() <= 1e-5
            start += len(seg)


def test_one_paraphrase_equals_plain_greedy_decoding(tiny, small_dataset):
    model, tokenizer = tiny
    record = small_dataset.records[0]
    out = answer_fused(model, tokenizer, small_dataset, [record], 1, no_stop())[0]
    row = fused_row(tokenizer, small_dataset.prompt_parts(record, 1))
    ref = generate_reference(model, tokenizer, row.input_ids, MAX_NEW)
    assert out["generation"] == tokenizer.decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("bias, positions, temperature", [
    ("none", "left", 1.0), ("uniform", "left", 1.0), ("uniform", "right", 1.0), ("none", "right", 0.5),
    ("uniform", "continuous", 2.0)])
def test_flex_and_sdpa_agree(small_dataset, bias, positions, temperature):
    """The same mask (and score changes) rendered as a BlockMask with a score_mod (FlexAttention) and
    as a dense mask (SDPA, or written-out scores with a temperature), on one model."""
    for family in ("llama", "qwen2", "qwen3", "gemma3"):
        model, tokenizer = cached_tiny(family)
        rows = [fused_row(tokenizer, small_dataset.prompt_parts(r, 3), positions) for r in small_dataset.records]
        biases = torch.full((3, 3), -math.log(3)) if bias == "uniform" else None
        _, dense_logits, _ = fused_prefill(model, rows, "sdpa", biases, temperature)
        kwargs = dict(positions=positions, bias=bias, temperature=temperature)
        sdpa_out = answer_fused(model, tokenizer, small_dataset, small_dataset.records, 3, no_stop(),
                                backend="sdpa", **kwargs)
        _, flex_logits, _ = fused_prefill(model, rows, "flex", biases, temperature)
        flex_out = answer_fused(model, tokenizer, small_dataset, small_dataset.records, 3, no_stop(),
                                backend="flex", **kwargs)
        assert model.config._attn_implementation == "sdpa"  # flex was scoped to its own decode
        assert (flex_logits - dense_logits).abs().max() <= 1e-4
        assert [r["generation"] for r in flex_out] == [r["generation"] for r in sdpa_out]


@pytest.mark.parametrize("positions, temperature", [("left", 1.0), ("right", 1.0), ("continuous", 1.0), ("right", 0.5)])
def test_cached_decoding_equals_full_recompute(tiny, small_dataset, positions, temperature):
    """Each step re-run on the whole sequence with the mask extended to the generated tokens."""
    model, tokenizer = tiny
    record = small_dataset.records[1]
    row = fused_row(tokenizer, small_dataset.prompt_parts(record, 3), positions)
    biases = torch.full((1, 3), -math.log(3))
    settings = FusionSettings(temperature=temperature)
    cached, _ = decode(LanguageModel(model, tokenizer), [row], 1, greedy, no_stop(),
                       partial(SegmentMask, settings=settings, biases=biases))
    generated: list[int] = []
    next_pos = max(row.position_ids) + 1
    for _ in range(MAX_NEW):
        ids = torch.tensor([row.input_ids + generated])
        pos = torch.tensor([row.position_ids + list(range(next_pos, next_pos + len(generated)))])
        seg = torch.tensor([row.segment_ids + [FUSED_SEGMENT] * len(generated)])
        mask = SegmentMask(seg, 0, settings, biases, positions=pos)
        with torch.inference_mode(), mask.attention(model):
            logits = model(input_ids=ids, position_ids=pos, **mask.prefill()).logits[0, -1]
        generated.append(logits.argmax().item())
    assert cached[0] == generated


@pytest.mark.parametrize("positions", ["left", "right"])
def test_identical_copies_equal_the_single_prompt(tiny, positions):
    """With the -log N bias, N copies of one paraphrase fused are that paraphrase alone: same logits
    (1e-4) at every step, same tokens. Without the bias they are not: the question would get N times
    the attention weight of the instruction; nor with the default sqrt bias (sqrt N times)."""
    model, tokenizer = tiny
    question = "who painted the mona lisa?"
    copies = Dataset("t", "qa", [Record("c", [question] * 4, ["Leonardo"])], [("2+2?", "4")])
    single_row = fused_row(tokenizer, copies.prompt_parts(copies.records[0], 1), positions)
    fused = fused_row(tokenizer, copies.prompt_parts(copies.records[0], 4), positions)
    _, alone, _ = fused_prefill(model, [single_row])
    _, biased, _ = fused_prefill(model, [fused], "sdpa", torch.full((1, 4), -math.log(4)))
    _, unbiased, _ = fused_prefill(model, [fused], "sdpa")
    sqrt = torch.tensor([segment_biases(4, FusionSettings().bias)])
    _, default, _ = fused_prefill(model, [fused], "sdpa", sqrt)
    assert (biased[0, -1] - alone[0, -1]).abs().max() <= 1e-4
    assert (unbiased[0, -1] - alone[0, -1]).abs().max() > 1e-3
    assert (default[0, -1] - alone[0, -1]).abs().max() > 1e-3  # the default (sqrt) breaks it: --fusion-bias uniform
    out = answer_fused(model, tokenizer, copies, copies.records, 4, no_stop(), positions=positions,
                       bias="uniform")[0]
    assert out["token_ids"] == generate_reference(model, tokenizer, single_row.input_ids, MAX_NEW)


def test_batch_composition_changes_nothing(tiny, small_dataset):
    model, tokenizer = tiny
    records = small_dataset.records
    for bias, positions in (("none", "left"), ("uniform", "right")):
        kwargs = dict(bias=bias, positions=positions)
        together = answer_fused(model, tokenizer, small_dataset, records, 3, no_stop(), **kwargs)
        alone = [answer_fused(model, tokenizer, small_dataset, [r], 3, no_stop(), **kwargs)[0] for r in records]
        assert [r["generation"] for r in together] == [r["generation"] for r in alone]


def test_qwen3_one_paraphrase_equals_plain_greedy_decoding():
    """Qwen3 (q/k norms) through the same hooks: N=1 equals the plain prompt's greedy tokens."""
    model, tokenizer = cached_tiny("qwen3")
    ds = Dataset("t", "qa", [Record("a", ["who is there?"], ["me"])], [])
    out = answer_fused(model, tokenizer, ds, ds.records, 1, no_stop())[0]
    row = fused_row(tokenizer, ds.prompt_parts(ds.records[0], 1))
    ref = generate_reference(model, tokenizer, row.input_ids, MAX_NEW)
    assert out["generation"] == tokenizer.decode(ref, skip_special_tokens=True)


# The picture: one pad, prefix P (2 tokens), paraphrases 1 (2), 2 (3) and 3 (2), fused suffix S (2).
# Row = query, column = key; '#' may attend. Written by hand from the rules, not by the code.
PICTURE = """
#...........
.#..........
.##.........
.###........
.####.......
.##..#......
.##..##.....
.##..###....
.##.....#...
.##.....##..
.##########.
.###########
"""


def test_mask_picture_matches_the_block_pattern():
    row = build_row([7, 7], [[7, 7], [7, 7, 7], [7, 7]], [7, 7])
    longer = build_row([7] * 3, [[7, 7], [7, 7, 7], [7, 7]], [7, 7])
    ids, pos, seg = pad_left([row, longer], 0, torch.device("cpu"))
    dense = build_dense_mask(segment_mask_mod(seg, torch.tensor(0)), 2, 12, 12, "cpu", torch.float32)
    drawn = "\n".join("".join("#" if v == 0 else "." for v in r) for r in dense[0, 0].tolist())
    assert drawn == PICTURE.strip()
    assert pos[0].tolist() == [0, 0, 1, 2, 3, 2, 3, 4, 2, 3, 5, 6]  # aligned: every paraphrase starts at 2
    continuous = build_row([7, 7], [[7, 7], [7, 7, 7], [7, 7]], [7, 7], "continuous")
    assert continuous.position_ids == list(range(11))


def test_flex_refuses_to_run_without_its_block_mask_and_is_scoped(small_dataset):
    """Under our flex implementation a plain 2D mask is refused (never attend without the intended
    mask); the switch into flex lasts one decode, so plain prompts after it run on sdpa."""
    from decoding import PaddingMask, single_rows
    from segment_mask import attention_implementation
    model, tokenizer = cached_tiny("llama")
    rows = single_rows(tokenizer, small_dataset.prompt_parts(small_dataset.records[0], 3), [0, 1, 2])
    plain, _ = decode(LanguageModel(model, tokenizer), rows, 1, greedy, no_stop())
    ids, pos, seg = pad_left(rows, 0, model.device)
    with attention_implementation(model, FLEX_ATTENTION), pytest.raises(RuntimeError, match="needs a BlockMask"):
        prefill(model, ids, pos, PaddingMask(seg, 0).prefill())
    assert model.config._attn_implementation == "sdpa"
    answer_fused(model, tokenizer, small_dataset, small_dataset.records[:1], 3, no_stop(), backend="flex")
    assert model.config._attn_implementation == "sdpa"
    assert decode(LanguageModel(model, tokenizer), rows, 1, greedy, no_stop())[0] == plain


# ---------------------------------------------------------------- few-shot examples shown as paraphrases too

SHOT_PARAPHRASES = [["what color is the sky?", "the sky is which color?", "which colour has the sky?"],
                    ["how many legs does a cat have?", "a cat has how many legs?"]]


def fused_fewshot_dataset(records=None) -> Dataset:
    return Dataset("t", "qa", records or [Record(r.uuid, list(r.paraphrases), list(r.answers)) for r in QUESTIONS],
                   [(s[0], a) for s, (_, a) in zip(SHOT_PARAPHRASES, FEW_SHOT)], SHOT_PARAPHRASES)


# Instruction P, one example (paraphrase a of 2 tokens, b of 1, answer A of 2), the question (paraphrase
# 1 of 1 token, 2 of 2) and the cue S. Written by hand from the rules: each example paraphrase sees P and
# itself, the example's answer sees its paraphrases, everything later sees the whole example, and the
# question's paraphrases stay isolated from each other.
PICTURE_FEWSHOT = """
#.........
##........
###.......
#..#......
#####.....
######....
#######...
######.#..
######.##.
##########"""


def test_fused_fewshot_mask_picture():
    from decoding import layout_row
    from segment_mask import allowed_matrix
    row = layout_row([[7], [7, 7], [7]], [[[7, 7], [7]], [[7], [7, 7]]])
    drawn = "\n".join("".join("#" if v else "." for v in r) for r in allowed_matrix(row.segment_ids).tolist())
    assert drawn == PICTURE_FEWSHOT.strip()
    assert row.position_ids == [0, 1, 2, 1, 3, 4, 5, 5, 6, 7]  # left: each block's paraphrases start together


def test_fused_fewshot_tokens_are_the_plain_prompts_and_one_paraphrase_is_greedy(tiny):
    model, tokenizer = tiny
    ds = fused_fewshot_dataset()
    record = ds.records[0]
    parts = ds.prompt_parts(record, 3, "fused")
    from decoding import single_rows
    for i, row in enumerate(single_rows(tokenizer, parts, [0, 1, 2])):
        assert row.input_ids == tokenizer(parts.full(i))["input_ids"]
    assert "Q: the sky is which color?\nA: blue" in parts.full(1)  # example 1 shown as its paraphrase 1
    # N=1 in the fused format is the single format's plain prompt
    out = answer_fused(model, tokenizer, ds, [record], 1, no_stop(), fewshot="fused")[0]
    single = single_rows(tokenizer, ds.prompt_parts(record, 1), [0])[0]
    assert out["token_ids"] == generate_reference(model, tokenizer, single.input_ids, MAX_NEW)


def test_fused_fewshot_identical_copies_equal_the_single_prompt(tiny):
    """Question and examples each given as N identical copies, with the -log N bias: the single prompt."""
    model, tokenizer = tiny
    copies = Dataset("t", "qa", [Record("c", ["who painted the mona lisa?"] * 3, ["Leonardo"])],
                     [("what color is the sky?", "blue"), ("2+2?", "4")], [["what color is the sky?"], ["2+2?"]])
    single_row = fused_row(tokenizer, copies.prompt_parts(copies.records[0], 1))
    fused = fused_row(tokenizer, copies.prompt_parts(copies.records[0], 3, "fused"))
    _, alone, _ = fused_prefill(model, [single_row])
    ids, pos, seg = pad_left([fused], 0, model.device)
    mask = SegmentMask(seg, MAX_NEW, FusionSettings(bias="uniform"), torch.full((1, 3), -math.log(3)),  # examples too
                       positions=pos)
    with mask.attention(model):
        biased, _ = prefill(model, ids, pos, mask.prefill(), cache=new_cache(model, True))
    assert (biased[0, -1] - alone[0, -1]).abs().max() <= 1e-4
    out = answer_fused(model, tokenizer, copies, copies.records, 3, no_stop(), bias="uniform",
                       fewshot="fused")[0]
    assert out["token_ids"] == generate_reference(model, tokenizer, single_row.input_ids, MAX_NEW)


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
@pytest.mark.parametrize("positions", ["left", "right"])
def test_fused_fewshot_flex_equals_sdpa_and_batches_change_nothing(positions, family):
    model, tokenizer = cached_tiny(family)
    ds = fused_fewshot_dataset()
    kwargs = dict(positions=positions, bias="uniform", fewshot="fused")
    sdpa = answer_fused(model, tokenizer, ds, ds.records, 3, no_stop(), backend="sdpa", **kwargs)
    flex = answer_fused(model, tokenizer, ds, ds.records, 3, no_stop(), backend="flex", **kwargs)
    alone = [answer_fused(model, tokenizer, ds, [r], 3, no_stop(), **kwargs)[0] for r in ds.records]
    assert [r["token_ids"] for r in sdpa] == [r["token_ids"] for r in flex] == [r["token_ids"] for r in alone]
