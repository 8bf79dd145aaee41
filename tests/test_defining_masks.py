"""Defining behaviour of attention-level fusion's mask (segment_mask.py): each rule of the one mask_mod on a
small hand-drawn picture where that rule decides some cells (causal, key_not_padding, key_in_prefix,
same_segment, fused_query, earlier_block, example_answer, self_token, and the --isolation none ablation), the
pictures the tools print, the score changes (bias, 1/T) written out cell by cell, the renderer's prefill and
decode-step rows, the attention shares and the attention functions against attention computed by hand."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

import segment_mask as sm
from conftest import cached_tiny
from fusion import FusionSettings
from segment_mask import (DENSE_ATTENTION, FLEX_ATTENTION, FUSED_SEGMENT, PAD_SEGMENT, RECORDING, SHOT_ANSWER,
                          SHOT_STRIDE, AttentionShares, SegmentMask, allowed_matrix, draw_mask, mask_legend)

F, PAD = FUSED_SEGMENT, PAD_SEGMENT
E1, E2, EA = SHOT_STRIDE + 1, SHOT_STRIDE + 2, SHOT_STRIDE + SHOT_ANSWER           # few-shot example 1
G1, G2, GA = 2 * SHOT_STRIDE + 1, 2 * SHOT_STRIDE + 2, 2 * SHOT_STRIDE + SHOT_ANSWER  # few-shot example 2


def char(seg: int) -> str:
    """The test's own legend: _ pad, P prefix, S suffix, A an example's answer, else the paraphrase's number."""
    return {PAD: "_", 0: "P", F: "S"}.get(seg, "A" if seg % SHOT_STRIDE == SHOT_ANSWER else str(seg % SHOT_STRIDE))


def picture(segments: list[int], isolation: str = "full", positions: list[int] | None = None,
            window: int | None = None) -> list[str]:
    allowed = allowed_matrix(segments, isolation, positions, window).tolist()
    return ["".join(char(segments[k]) if allowed[q][k] else "." for k in range(len(segments)))
            for q in range(len(segments))]


def drawn(text: str) -> list[str]:
    return text.split()


# ---------------------------------------------------------------- one picture per rule

def test_rule_causal_a_token_never_sees_a_later_one():
    # without `causal` the first prefix token would see the second (key_in_prefix) and nothing else would change
    # there; every row here sees exactly the keys at or before it
    assert picture([0, 0, F, F]) == drawn("""
        P...
        PP..
        PPS.
        PPSS""")


def test_rule_key_not_padding_nobody_sees_padding():
    # without it every token would see the pad key (a pad is in no block: earlier_block holds for it)
    assert picture([PAD, 0, F]) == drawn("""
        _..
        .P.
        .PS""")


def test_rule_key_in_prefix_every_token_sees_the_prefix():
    # without it paraphrase 1 would not see P (same block, other segment); S sees it anyway (fused_query)
    assert picture([0, 1, F]) == drawn("""
        P..
        P1.
        P1S""")


def test_rule_same_segment_a_paraphrase_sees_itself():
    # without it the second token of paraphrase 1 would not see the first
    assert picture([0, 1, 1, F]) == drawn("""
        P...
        P1..
        P11.
        P11S""")


def test_rule_same_segment_isolates_paraphrases_from_each_other():
    assert picture([0, 1, 2, 2, 3, F]) == drawn("""
        P.....
        P1....
        P.2...
        P.22..
        P...3.
        P1223S""")


def test_rule_fused_query_the_suffix_sees_every_paraphrase():
    # without it S would see only P and itself
    assert picture([0, 1, 2, F]) == drawn("""
        P...
        P1..
        P.2.
        P12S""")


def test_rule_self_token_padding_sees_itself():
    # without it a pad row would be all masked (softmax of -inf everywhere: NaN)
    assert picture([PAD, PAD, 0]) == drawn("""
        _..
        ._.
        ..P""")


def test_rules_earlier_block_and_example_answer_on_a_fused_few_shot_row():
    # example 1's paraphrases (1, 2) are isolated; its answer A sees both (example_answer); the question's
    # paraphrases see the whole example (earlier_block) but not each other; S sees everything
    assert picture([0, E1, E2, EA, 1, 2, F]) == drawn("""
        P......
        P1.....
        P.2....
        P12A...
        P12A1..
        P12A.2.
        P12A12S""")


def test_rule_earlier_block_on_two_fused_examples():
    # example 2 reads all of example 1; its answer reads its own paraphrases (example_answer) and example 1
    assert picture([0, E1, E2, EA, G1, G2, GA, 1, 2, F]) == drawn("""
        P.........
        P1........
        P.2.......
        P12A......
        P12A1.....
        P12A.2....
        P12A12A...
        P12A12A1..
        P12A12A.2.
        P12A12A12S""")


def test_a_sliding_layer_keeps_the_rule_within_the_window_of_positions():
    # the docstring's third picture: left positions (paraphrases restart at 2, the suffix at 5), W = 3
    seg, pos = [PAD, 0, 0, 1, 1, 2, 2, 2, 3, 3, F, F], [0, 0, 1, 2, 3, 2, 3, 4, 2, 3, 5, 6]
    assert picture(seg, positions=pos, window=3) == drawn("""
        _...........
        .P..........
        .PP.........
        .PP1........
        ..P11.......
        .PP..2......
        ..P..22.....
        .....222....
        .PP.....3...
        ..P.....33..
        ....1.22.3S.
        .......2..SS""")
    assert sm.draw_mask(seg, positions=pos, window=3).split("\n")[1:] == [
        f"{sm.segment_char(s)} {row}" for s, row in zip(seg, picture(seg, positions=pos, window=3))]


def test_isolation_none_lets_paraphrases_see_the_earlier_ones_of_their_block():
    # the docstring's second picture
    assert picture([PAD, 0, 0, 1, 1, 2, 2, 2, 3, 3, F, F], "none") == drawn("""
        _...........
        .P..........
        .PP.........
        .PP1........
        .PP11.......
        .PP112......
        .PP1122.....
        .PP11222....
        .PP112223...
        .PP1122233..
        .PP1122233S.
        .PP1122233SS""")
    assert picture([0, E1, E2, EA, G1, G2, GA, 1, 2, F], "none") == drawn("""
        P.........
        P1........
        P12.......
        P12A......
        P12A1.....
        P12A12....
        P12A12A...
        P12A12A1..
        P12A12A12.
        P12A12A12S""")


def test_the_mask_mod_reads_queries_at_an_offset():
    """Decode steps ask for query rows past the prompt: query i of the call is token i + q_offset."""
    from torch.nn.attention.flex_attention import create_mask
    seg = torch.tensor([[0, 1, 2, F, F]])
    rows = create_mask(sm.segment_mask_mod(seg, torch.tensor(2)), 1, 1, 2, 5, device="cpu")[0, 0]
    assert rows.tolist() == [[True, False, True, False, False], [True, True, True, True, False]]


# ---------------------------------------------------------------- the pictures the tools print

README = [PAD, 0, 0, 1, 1, 2, 2, 2, 3, 3, F, F]


def test_draw_mask_is_the_documented_picture():
    assert draw_mask(README) == "\n".join([
        "  _PP1122233SS",
        "_ _...........",
        "P .P..........",
        "P .PP.........",
        "1 .PP1........",
        "1 .PP11.......",
        "2 .PP..2......",
        "2 .PP..22.....",
        "2 .PP..222....",
        "3 .PP.....3...",
        "3 .PP.....33..",
        "S .PP1122233S.",
        "S .PP1122233SS"])


def test_draw_mask_downsampled_shows_each_cells_first_visible_key():
    # 12 tokens in at most 6 columns: cells of 2 x 2 tokens
    assert draw_mask(README, max_columns=6) == "\n".join([
        "  _P123S",
        "_ _.....",
        "P PP....",
        "1 PP1...",
        "2 PP22..",
        "3 PP..3.",
        "S PP123S"])
    # 12 tokens in 5 columns: cells of 3 x 3, the last one past the end
    assert draw_mask(README, max_columns=5).split("\n")[0] == "  _123"  # keys 0, 3, 6, 9


def test_draw_mask_folds_the_prefix_into_one_column():
    assert draw_mask(README, fold_prefix=True) == "\n".join([
        "  (prefix: 2 tokens folded into the first column; its rows, plain causal, left out)",
        "  P_1122233SS",
        "_ ._.........",
        "1 P.1........",
        "1 P.11.......",
        "2 P...2......",
        "2 P...22.....",
        "2 P...222....",
        "3 P......3...",
        "3 P......33..",
        "S P.1122233S.",
        "S P.1122233SS"])
    assert draw_mask([0, 1, F], fold_prefix=True) == draw_mask([0, 1, F])  # one prefix token: nothing to fold


def test_draw_mask_of_the_ablation():
    assert draw_mask([0, 1, 2, F], isolation="none").split("\n")[3] == "2 P12."


def test_segment_characters_and_names():
    assert [sm.segment_char(s) for s in (PAD, 0, F, 1, 9, 10, 35, 36, E1, EA, G2)] == \
        ["_", "P", "S", "1", "9", "a", "z", "+", "1", "A", "2"]
    assert [sm.segment_name(s) for s in (PAD, 0, F, 3, E2, EA, GA)] == [
        "pad", "prefix", "suffix", "paraphrase 3", "example 1 paraphrase 2", "example 1 answer", "example 2 answer"]


def test_mask_legend():
    assert mask_legend(README) == (
        "legend: row = query, column = key; a cell shows the key's segment where attention is allowed, '.' masked. "
        "_ pad, P prefix, 1 paraphrase 1, 2 paraphrase 2, 3 paraphrase 3, S suffix (S also stands for the generated "
        "tokens). one cell per token")
    assert mask_legend([2, 0, 1, F], max_columns=2).endswith(
        "P prefix, 1 paraphrase 1, 2 paraphrase 2, S suffix (S also stands for the generated tokens). one cell = 2x2 "
        "tokens, showing its first visible key")


# ---------------------------------------------------------------- segment arithmetic

def test_paraphrase_tokens_and_blocks():
    seg = torch.tensor([PAD, 0, 1, 7, E1, EA, G2, GA, F])
    assert sm.paraphrase_tokens(seg).tolist() == [False, False, True, True, True, False, True, False, False]
    assert sm.segment_block(seg).tolist() == [-1, 0, 0, 0, 1, 1, 2, 2, 0]


def test_score_segments_merge_a_blocks_paraphrases_only_without_isolation():
    seg = torch.tensor([[PAD, 0, 1, 3, E1, E2, EA, F]])
    assert sm.score_segments(seg, "full").tolist() == seg.tolist()
    assert sm.score_segments(seg, "none").tolist() == [[PAD, 0, 1, 1, E1, E1, EA, F]]


def test_fused_key_score_changes_only_scores_on_another_segments_keys():
    score = torch.tensor([2.0, 2.0, 2.0])
    q, kv = torch.tensor([F, 1, F]), torch.tensor([1, 1, 0])
    scale, bias = torch.tensor([0.5, 0.5, 1.0]), torch.tensor([-1.0, -1.0, 0.0])
    assert sm.fused_key_score(score, q, kv, scale, bias).tolist() == [0.0, 2.0, 2.0]


def test_share_columns_and_question_paraphrases():
    seg = torch.tensor([[PAD, 0, 1, 2, E1, EA, F]])
    columns = sm.share_columns(seg, 2)
    assert columns.tolist() == [[[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0],
                                 [0, 0, 0, 1]]]
    assert sm.question_paraphrases(torch.tensor([[0, 1, 3, 2, F]])) == 3
    assert sm.question_paraphrases(torch.tensor([[0, E1, E2, 1, 2, F], [PAD, 0, 1, F, F, F]])) == 2
    assert sm.question_paraphrases(torch.tensor([[PAD, 0, F]])) == 0


# ---------------------------------------------------------------- the renderer: bias and 1/T, cell by cell

NEG = float("-inf")
B1, B2 = -0.5, -1.25


def dense(settings: FusionSettings, seg: list[int], biases=None, max_new: int = 2) -> SegmentMask:
    return SegmentMask(torch.tensor([seg]), max_new, settings,
                       None if biases is None else torch.tensor([biases]), torch.float32)


def test_the_whole_decodes_segment_ids_are_the_prompt_then_fused_then_padding():
    mask = dense(FusionSettings(), [0, 1, 2, F, F], max_new=3)  # 8 tokens: padded past a whole 128-token block
    assert mask.segment_ids.shape == (1, 256)
    assert mask.segment_ids[0, :8].tolist() == [0, 1, 2, F, F, F, F, F]
    assert set(mask.segment_ids[0, 8:].tolist()) == {PAD}
    assert mask.key_bias is None and mask.key_scale is None


def test_prefill_and_steps_with_a_bias_on_the_paraphrases_the_answer_reads():
    mask = dense(FusionSettings(bias="uniform"), [0, 1, 1, 2, F], [B1, B2])
    assert mask.prefill()["attention_mask"][0, 0].tolist() == [
        [0.0, NEG, NEG, NEG, NEG],
        [0.0, 0.0, NEG, NEG, NEG],
        [0.0, 0.0, 0.0, NEG, NEG],   # a paraphrase reading itself: no bias
        [0.0, NEG, NEG, 0.0, NEG],
        [0.0, B1, B1, B2, 0.0]]      # the suffix reading the paraphrases: their biases
    assert mask.prefill(cached=1)["attention_mask"][0, 0].tolist() == [  # queries after 1 cached token
        [0.0, 0.0, NEG, NEG, NEG], [0.0, 0.0, 0.0, NEG, NEG], [0.0, NEG, NEG, 0.0, NEG], [0.0, B1, B1, B2, 0.0]]
    assert mask.step()["attention_mask"].tolist() == [[[[0.0, B1, B1, B2, 0.0, 0.0]]]]  # the first generated token
    assert mask.step()["attention_mask"].tolist() == [[[[0.0, B1, B1, B2, 0.0, 0.0, 0.0]]]]


def test_few_shot_example_paraphrases_get_minus_log_n_and_the_question_its_own_biases():
    mask = dense(FusionSettings(bias="uniform", fewshot="fused"), [0, E1, E2, EA, 1, 2, F], [B1, B2])
    L = -math.log(2)
    assert mask.key_bias[0, :7].tolist() == pytest.approx([0.0, L, L, 0.0, B1, B2, 0.0])
    got = mask.prefill()["attention_mask"][0, 0]
    assert got[3].tolist() == pytest.approx([0.0, L, L, 0.0, NEG, NEG, NEG])  # the answer reads its example
    assert got[4].tolist() == pytest.approx([0.0, L, L, 0.0, 0.0, NEG, NEG])  # q1 reads example 1
    assert got[6].tolist() == pytest.approx([0.0, L, L, 0.0, B1, B2, 0.0])
    assert got[2].tolist() == pytest.approx([0.0, NEG, 0.0, NEG, NEG, NEG, NEG])


def test_under_the_sqrt_bias_few_shot_example_paraphrases_get_minus_half_log_n():
    """The default bias spreads to the examples as it does to the question; any other bias gives them -log N."""
    sqrt = dense(FusionSettings(bias="sqrt", fewshot="fused"), [0, E1, E2, EA, 1, 2, F], [B1, B2])
    half = -0.5 * math.log(2)
    assert sqrt.key_bias[0, :7].tolist() == pytest.approx([0.0, half, half, 0.0, B1, B2, 0.0])
    agreed = dense(FusionSettings(bias="agreement", fewshot="fused"), [0, E1, E2, EA, 1, 2, F], [B1, B2])
    assert agreed.key_bias[0, :7].tolist() == pytest.approx([0.0, -math.log(2), -math.log(2), 0.0, B1, B2, 0.0])


def test_without_isolation_paraphrases_reading_each_other_keep_plain_scores():
    mask = dense(FusionSettings(bias="uniform", isolation="none"), [0, 1, 2, F], [B1, B2])
    assert mask.prefill()["attention_mask"][0, 0].tolist() == [
        [0.0, NEG, NEG, NEG], [0.0, 0.0, NEG, NEG], [0.0, 0.0, 0.0, NEG], [0.0, B1, B2, 0.0]]


def test_a_temperature_divides_the_scores_on_other_segments_paraphrase_keys():
    mask = dense(FusionSettings(temperature=2.0), [0, 1, 1, 2, F])
    assert mask.key_scale[0, :5].tolist() == [1.0, 0.5, 0.5, 0.5, 1.0]
    out = mask.prefill()
    assert out["attention_mask"][0, 0].tolist() == [  # no bias: zeros where allowed
        [0.0, NEG, NEG, NEG, NEG], [0.0, 0.0, NEG, NEG, NEG], [0.0, 0.0, 0.0, NEG, NEG], [0.0, NEG, NEG, 0.0, NEG],
        [0.0, 0.0, 0.0, 0.0, 0.0]]
    assert out["fusion_scale"][0, 0].tolist() == [
        [1.0, 0.5, 0.5, 0.5, 1.0],
        [1.0, 1.0, 1.0, 0.5, 1.0],
        [1.0, 1.0, 1.0, 0.5, 1.0],
        [1.0, 0.5, 0.5, 1.0, 1.0],
        [1.0, 0.5, 0.5, 0.5, 1.0]]
    assert mask.step()["fusion_scale"].tolist() == [[[[1.0, 0.5, 0.5, 0.5, 1.0, 1.0]]]]


def test_select_keeps_the_live_rows_of_every_tensor():
    seg = torch.tensor([[0, 1, 2, F], [PAD, 0, 1, F]])
    mask = SegmentMask(seg, 2, FusionSettings(bias="uniform", temperature=2.0), torch.tensor([[B1, B2], [B2, B1]]))
    mask.step()
    mask.select(torch.tensor([1]))
    assert mask.segment_ids[0, :4].tolist() == [PAD, 0, 1, F]
    assert mask.key_bias[0, :4].tolist() == [0.0, 0.0, B2, 0.0] and mask.key_scale[0, :4].tolist() == [1, 1, 0.5, 1]
    row = mask.step()
    assert row["attention_mask"].tolist() == [[[[NEG, 0.0, B2, 0.0, 0.0, 0.0]]]]
    assert row["fusion_scale"].tolist() == [[[[1.0, 1.0, 0.5, 1.0, 1.0, 1.0]]]]


def test_the_attention_implementation_each_setting_needs():
    seg = [0, 1, F]

    class Model:
        def __init__(self):
            self.config = copy.deepcopy(cached_tiny("llama")[0].config)  # its layer types are read
            self.config._attn_implementation = "eager"
            self.set = []

        def set_attn_implementation(self, name):
            self.set.append(name)
            self.config._attn_implementation = name
    for settings, name in [(FusionSettings(), "sdpa"), (FusionSettings(temperature=0.5), DENSE_ATTENTION),
                           (FusionSettings(backend="flex"), FLEX_ATTENTION),
                           (FusionSettings(record_attention=True), "sdpa" + RECORDING),
                           (FusionSettings(backend="flex", record_attention=True), FLEX_ATTENTION + RECORDING)]:
        model = Model()
        with dense(settings, seg).attention(model):
            assert model.config._attn_implementation == name
        assert model.config._attn_implementation == "eager" and model.set == [name, "eager"]
    model = Model()
    model.config._attn_implementation = "sdpa"
    with dense(FusionSettings(), seg).attention(model):
        pass
    assert model.set == []  # already the one it needs: nothing switched


def test_attention_functions_by_name():
    assert sm.attention_function("sdpa") is None
    assert sm.attention_function(FLEX_ATTENTION) is sm.fused_flex_attention
    assert sm.attention_function(DENSE_ATTENTION) is sm.dense_fused_attention
    recorded = sm.attention_function("sdpa" + RECORDING)
    with pytest.raises(RuntimeError, match="needs `attention_shares` from SegmentMask"):
        recorded(None, None, None, None, None)


# ---------------------------------------------------------------- the attention functions, against attention by hand

def by_hand(q, k, v, mask, scaling, factor=None):
    """softmax(q k^T * scaling * factor + mask) v, keys and values repeated for the query heads (GQA)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scaling
    if factor is not None:
        scores = scores * factor
    return torch.einsum("bhqk,bhkd->bqhd", torch.softmax(scores + mask, -1), v)


def qkv(length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, length, 8, generator=g), torch.randn(1, 2, length, 8, generator=g),
            torch.randn(1, 2, length, 8, generator=g))


def hand_mask(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows)[None, None]


SEG = [0, 1, 1, 2, F]
HAND = [[0.0, NEG, NEG, NEG, NEG], [0.0, 0.0, NEG, NEG, NEG], [0.0, 0.0, 0.0, NEG, NEG], [0.0, NEG, NEG, 0.0, NEG],
        [0.0, B1, B1, B2, 0.0]]


def test_dense_fused_attention_scales_then_masks_then_softmaxes():
    q, k, v = qkv(5)
    mask = dense(FusionSettings(bias="uniform", temperature=2.0), SEG, [B1, B2])
    kwargs = mask.prefill()
    out, weights = sm.dense_fused_attention(None, q, k, v, kwargs["attention_mask"], scaling=0.3,
                                            fusion_scale=kwargs["fusion_scale"])
    assert weights is None
    expected = by_hand(q, k, v, hand_mask(HAND), 0.3, kwargs["fusion_scale"])
    assert torch.allclose(out, expected, atol=1e-5)
    default = sm.dense_fused_attention(None, q, k, v, kwargs["attention_mask"], fusion_scale=kwargs["fusion_scale"])[0]
    assert torch.allclose(default, by_hand(q, k, v, hand_mask(HAND), 8 ** -0.5, kwargs["fusion_scale"]), atol=1e-5)
    with pytest.raises(RuntimeError, match="needs the score scale from SegmentMask"):
        sm.dense_fused_attention(None, q, k, v, kwargs["attention_mask"])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_flex_renders_the_same_rule_bias_and_temperature(temperature):
    q, k, v = qkv(5, seed=1)
    mask = SegmentMask(torch.tensor([SEG]), 2, FusionSettings(bias="uniform", temperature=temperature,
                                                              backend="flex"), torch.tensor([[B1, B2]]))
    factor = None
    if temperature != 1.0:
        factor = torch.tensor([[1.0, 0.5, 0.5, 0.5, 1.0], [1.0, 1.0, 1.0, 0.5, 1.0], [1.0, 1.0, 1.0, 0.5, 1.0],
                               [1.0, 0.5, 0.5, 1.0, 1.0], [1.0, 0.5, 0.5, 0.5, 1.0]])[None, None]
    kwargs = mask.prefill()
    out, _ = sm.fused_flex_attention(None, q, k, v, scaling=0.25, **kwargs)
    assert torch.allclose(out, by_hand(q, k, v, hand_mask(HAND), 0.25, factor), atol=1e-5)
    # the first decode step: one query row over the 6 keys of prompt and generated token
    q6, k6, v6 = qkv(6, seed=2)
    step = mask.step()
    out6, _ = sm.fused_flex_attention(None, q6[:, :, 5:], k6, v6, scaling=0.25, **step)
    row = hand_mask([[0.0, B1, B1, B2, 0.0, 0.0]])
    f6 = None if factor is None else torch.tensor([[1.0, 0.5, 0.5, 0.5, 1.0, 1.0]])[None, None]
    assert torch.allclose(out6, by_hand(q6[:, :, 5:], k6, v6, row, 0.25, f6), atol=1e-5)


def test_flex_without_a_bias_has_no_score_mod_and_needs_a_block_mask():
    mask = SegmentMask(torch.tensor([SEG]), 1, FusionSettings(backend="flex"))
    kwargs = mask.prefill()
    assert kwargs["fusion_score_mod"] is None and kwargs["flex_fn"] is not None
    q, k, v = qkv(5, seed=3)
    out, _ = sm.fused_flex_attention(None, q, k, v, scaling=0.5, **kwargs)
    plain = [[0.0 if x == 0.0 or x in (B1, B2) else NEG for x in r] for r in HAND]
    assert torch.allclose(out, by_hand(q, k, v, hand_mask(plain), 0.5), atol=1e-5)


def test_flex_function_is_flex_attention_when_not_compiled():
    from torch.nn.attention.flex_attention import flex_attention
    assert sm.flex_function(False) is flex_attention
    assert sm.flex_available()


# ---------------------------------------------------------------- attention shares

def test_attention_shares_are_each_columns_attention_mass_per_layer():
    seg = torch.tensor([[0, 1, 2, F]])
    shares = AttentionShares(seg, 2)
    query = torch.zeros(1, 2, 3, 4)
    query[..., 0] = 1.0  # the last query row is (1, 0, 0, 0)
    key = torch.zeros(1, 1, 4, 4)
    key[0, 0, :, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0])  # scores 0, 1, 2, 3 times the scaling
    shares.next_query({"attention_mask": torch.zeros(1, 1, 1, 4)})
    shares.add(query, key, None)  # layer 1: scaling 4 ** -0.5 = 0.5
    shares.add(query, key, 1.0)   # layer 2
    shares.next_query({"attention_mask": torch.tensor([[[[0.0, NEG, 0.0, 0.0]]]]), "fusion_scale": torch.tensor(2.0)})
    shares.add(query, key, 0.5)   # the next token: key 1 masked, scores doubled, in both layers
    shares.add(query, key, 0.5)
    layers = shares.per_layer(0)
    half = torch.softmax(torch.tensor([0.0, 0.5, 1.0, 1.5]), 0)
    one = torch.softmax(torch.tensor([0.0, 1.0, 2.0, 3.0]), 0)
    masked = torch.softmax(torch.tensor([0.0, NEG, 2.0, 3.0]), 0)
    assert layers.shape == (2, 2, 4)
    assert torch.allclose(layers[0, 0], half) and torch.allclose(layers[0, 1], one)
    assert torch.allclose(layers[1, 0], masked) and torch.allclose(layers[1, 1], masked)
    assert shares.shares(0)[0] == pytest.approx(((half + one) / 2).tolist())
    assert shares.shares(0)[1] == pytest.approx(masked.tolist())


def test_attention_shares_follow_the_live_rows():
    seg = torch.tensor([[0, 1, 2, F], [0, 2, 1, F]])
    shares = AttentionShares(seg, 2)
    query, key = torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 4, 4)
    shares.next_query({"attention_mask": torch.zeros(2, 1, 1, 4)})
    shares.add(query, key, None)
    shares.select(torch.tensor([1]))  # row 0 finished
    shares.next_query({"attention_mask": torch.tensor([[[[0.0, 0.0, NEG, NEG]]]])})
    shares.add(query[:1], key[:1], None)
    assert shares.shares(0) == [[0.25, 0.25, 0.25, 0.25]]
    assert shares.shares(1) == [[0.25, 0.25, 0.25, 0.25], [0.5, 0.0, 0.5, 0.0]]  # its key 1 is paraphrase 2


def test_recording_hands_queries_and_keys_to_the_shares_and_changes_nothing():
    calls = []

    def attend(module, query, key, value, attention_mask, **kwargs):
        calls.append(kwargs)
        return "out", None

    class Shares:
        def add(self, query, key, scaling, kind):
            calls.append(("add", query, key, scaling, kind))
    module = SimpleNamespace(config=SimpleNamespace(layer_types=["full_attention", "sliding_attention"]), layer_idx=1)
    recorded = sm.recording(attend)
    assert recorded(module, "q", "k", "v", "mask", attention_shares=Shares(), scaling=0.5) == ("out", None)
    assert calls == [("add", "q", "k", 0.5, "sliding_attention"), {"scaling": 0.5}]  # the layer's own mask


# ---------------------------------------------------------------- the flex rendering, read without running flex
# (dynamo traces score_mod and mask_mod inside flex_attention, even eager; these read the rendering directly, so
# that they also run under mutation testing, where the functions are wrapped in a way dynamo cannot trace)

def test_flex_block_mask_is_the_rule_for_the_prompt_and_each_step():
    from torch.nn.attention.flex_attention import BlockMask, create_mask
    mask = SegmentMask(torch.tensor([SEG]), 2, FusionSettings(bias="uniform", backend="flex"), torch.tensor([[B1, B2]]))
    kwargs = mask.prefill()
    block = kwargs["attention_mask"]
    assert isinstance(block, BlockMask) and kwargs["flex_fn"] is sm.flex_function(False)
    allowed = [[x != NEG for x in r] for r in HAND]
    assert create_mask(block.mask_mod, 1, 1, 5, 5, device="cpu")[0, 0].tolist() == allowed
    assert block.seq_lengths == (5, 5)
    cached = mask.prefill(cached=2)["attention_mask"]  # queries 2..4 over keys 0..4
    assert create_mask(cached.mask_mod, 1, 1, 3, 5, device="cpu")[0, 0].tolist() == allowed[2:]
    step = mask.step()
    assert step["attention_mask"].seq_lengths == (1, 6)
    assert create_mask(step["attention_mask"].mask_mod, 1, 1, 1, 6, device="cpu")[0, 0].tolist() == [[True] * 6]
    assert step["flex_fn"] is kwargs["flex_fn"]
    assert step["attention_mask"].kv_num_blocks.is_contiguous()
    second = mask.step()
    assert second["attention_mask"].seq_lengths == (1, 7)


def grid(score_mod, length: int, q_offset: int = 0) -> list[list[float]]:
    q = torch.arange(length)[:, None]
    kv = torch.arange(length)[None, :]
    return score_mod(torch.ones(length, length), torch.tensor(0), torch.tensor(0), q, kv).tolist()


def test_flex_score_mod_is_the_bias_and_temperature_cell_by_cell():
    mask = SegmentMask(torch.tensor([SEG]), 2, FusionSettings(bias="uniform", temperature=2.0, backend="flex"),
                       torch.tensor([[B1, B2]]))
    score_mod = mask.prefill()["fusion_score_mod"]
    # a score of 1 becomes 1 * scale + bias on other segments' paraphrase keys, stays 1 elsewhere
    s1, s2 = 0.5 + B1, 0.5 + B2
    assert torch.allclose(torch.tensor(grid(score_mod, 5)), torch.tensor([
        [1.0, s1, s1, s2, 1.0],
        [1.0, 1.0, 1.0, s2, 1.0],
        [1.0, 1.0, 1.0, s2, 1.0],
        [1.0, s1, s1, 1.0, 1.0],
        [1.0, s1, s1, s2, 1.0]]))
    step_mod = mask.step()["fusion_score_mod"]  # query 5 (generated, fused) at offset 5
    q, kv = torch.tensor([[0]]), torch.arange(6)[None, :]
    assert step_mod(torch.ones(1, 6), torch.tensor(0), torch.tensor(0), q, kv)[0].tolist() == pytest.approx(
        [1.0, s1, s1, s2, 1.0, 1.0])
    only_bias = SegmentMask(torch.tensor([SEG]), 1, FusionSettings(bias="uniform", backend="flex"),
                            torch.tensor([[B1, B2]])).prefill()["fusion_score_mod"]
    assert grid(only_bias, 5)[4] == pytest.approx([1.0, 1.0 + B1, 1.0 + B1, 1.0 + B2, 1.0])
    only_temperature = SegmentMask(torch.tensor([SEG]), 1, FusionSettings(temperature=2.0, backend="flex"))
    assert grid(only_temperature.prefill()["fusion_score_mod"], 5)[4] == pytest.approx([1.0, 0.5, 0.5, 0.5, 1.0])


def test_fused_flex_attention_hands_flex_its_mask_and_score_mod():
    calls = []

    def fake_flex(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False):
        calls.append(dict(contiguous=all(t.is_contiguous() for t in (query, key, value)), score_mod=score_mod,
                          block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, shape=tuple(query.shape)))
        return query * 2
    block = SegmentMask(torch.tensor([SEG]), 1, FusionSettings(backend="flex")).prefill()["attention_mask"]
    q = torch.randn(1, 5, 4, 8).transpose(1, 2)  # [B, H, L, D] as a non-contiguous view
    k = v = torch.randn(1, 2, 5, 8)
    marker = object()
    out, weights = sm.fused_flex_attention(None, q, k, v, block, scaling=0.3, fusion_score_mod=marker,
                                           flex_fn=fake_flex)
    assert calls == [dict(contiguous=True, score_mod=marker, block_mask=block, scale=0.3, enable_gqa=True,
                          shape=(1, 4, 5, 8))]
    assert weights is None and out.shape == (1, 5, 4, 8) and out.is_contiguous()
    assert torch.equal(out, (q * 2).transpose(1, 2))
    sm.fused_flex_attention(None, q, q, q, block, flex_fn=fake_flex)
    assert calls[-1]["enable_gqa"] is False and calls[-1]["score_mod"] is None and calls[-1]["scale"] is None
    with pytest.raises(RuntimeError, match="needs a BlockMask and a flex function from SegmentMask, got Tensor"):
        sm.fused_flex_attention(None, q, k, v, torch.zeros(1, 1, 5, 5), flex_fn=fake_flex)
    with pytest.raises(RuntimeError, match="got BlockMask"):
        sm.fused_flex_attention(None, q, k, v, block)
    assert len(calls) == 2


def test_question_paraphrases_counts_the_questions_segments_only():
    """N is the largest question-paraphrase id: few-shot blocks (ids from SHOT_STRIDE on, their answers
    SHOT_STRIDE + SHOT_ANSWER included), the prefix, the suffix and padding are not paraphrases."""
    fused_fewshot = [PAD_SEGMENT, 0, SHOT_STRIDE + 1, SHOT_STRIDE + 2, SHOT_STRIDE + SHOT_ANSWER, 1, 2, 3,
                     FUSED_SEGMENT]
    assert sm.question_paraphrases(torch.tensor([fused_fewshot])) == 3
    assert sm.question_paraphrases(torch.tensor([[0, SHOT_STRIDE, 1, FUSED_SEGMENT]])) == 1
    assert sm.question_paraphrases(torch.tensor([[PAD_SEGMENT, 0, FUSED_SEGMENT]])) == 0
