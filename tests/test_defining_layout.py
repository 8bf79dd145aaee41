"""Defining behaviour of the row layout (decoding.layout_row / build_row and what reads a row back): each
position scheme's positions written out by hand for small rows, the segment ids of every part, the inverse
(row_parts), and the context check built on them. Expectations are worked out on paper from the schemes'
definitions (README, "The attention-level layout"), never taken from the code's output."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from constants import InputError
from decoding import (Row, build_row, check_context, growth, largest_fitting_n, layout_row, positions_needed,
                      positions_scheme, row_parts)
from segment_mask import FUSED_SEGMENT, PAD_SEGMENT, PREFIX_SEGMENT, SHOT_ANSWER, SHOT_STRIDE

F = FUSED_SEGMENT
# a 2-token prefix, paraphrases of 2, 3 and 1 tokens, a 2-token suffix
PREFIX, A, B, C, SUFFIX = [10, 11], [1, 2], [3, 4, 5], [6], [20, 21]
IDS = PREFIX + A + B + C + SUFFIX
SEGMENTS = [0, 0, 1, 1, 2, 2, 2, 3, F, F]


def test_left_positions_every_paraphrase_starts_where_the_block_starts():
    """left (Parallel Context Windows): each paraphrase starts right after the prefix (position 2); the suffix
    follows the longest paraphrase (3 tokens: positions 2, 3, 4), so it starts at 5."""
    row = build_row(PREFIX, [A, B, C], SUFFIX, "left")
    assert row.input_ids == IDS
    assert row.segment_ids == SEGMENTS
    #                          P  P  A  A  B  B  B  C  S  S
    assert row.position_ids == [0, 1, 2, 3, 2, 3, 4, 2, 5, 6]


def test_right_positions_every_paraphrase_ends_right_before_the_suffix():
    """right (Structured Prompting): each paraphrase ENDS at the last position before the suffix (4), i.e. starts
    at start + longest - len(tokens): A (2 tokens) at 3, B (3) at 2, C (1) at 4; the suffix at 5 as with left."""
    row = build_row(PREFIX, [A, B, C], SUFFIX, "right")
    assert row.input_ids == IDS
    assert row.segment_ids == SEGMENTS
    #                          P  P  A  A  B  B  B  C  S  S
    assert row.position_ids == [0, 1, 3, 4, 2, 3, 4, 4, 5, 6]
    ends = [row.position_ids[i] for i in (3, 6, 7)]  # the last token of A, B and C
    assert ends == [4, 4, 4] and row.position_ids[8] == 5


def test_right_differs_from_left_when_paraphrases_differ_in_length():
    assert build_row(PREFIX, [A, B, C], SUFFIX, "right").position_ids != build_row(
        PREFIX, [A, B, C], SUFFIX, "left").position_ids
    # with equal lengths the two schemes coincide
    assert build_row(PREFIX, [A, [7, 8]], SUFFIX, "right").position_ids == build_row(
        PREFIX, [A, [7, 8]], SUFFIX, "left").position_ids == [0, 1, 2, 3, 2, 3, 4, 5]


def test_continuous_positions_are_0_to_L_minus_1():
    """continuous (upstream's): the row read as one plain sequence."""
    row = build_row(PREFIX, [A, B, C], SUFFIX, "continuous")
    assert row.input_ids == IDS and row.segment_ids == SEGMENTS
    assert row.position_ids == list(range(10))


def test_the_default_scheme_is_left():
    assert build_row(PREFIX, [A, B, C], SUFFIX).position_ids == build_row(PREFIX, [A, B, C], SUFFIX, "left").position_ids
    assert layout_row([PREFIX, SUFFIX], [[A, B, C]]).position_ids == [0, 1, 2, 3, 2, 3, 4, 2, 5, 6]


def test_without_a_prefix_the_block_starts_at_position_0():
    assert build_row([], [A, B], [20], "left").position_ids == [0, 1, 0, 1, 2, 3]
    assert build_row([], [A, B], [20], "right").position_ids == [1, 2, 0, 1, 2, 3]
    assert build_row([], [A, B], [20], "left").segment_ids == [1, 1, 2, 2, 2, F]


def test_a_block_without_paraphrases_puts_the_suffix_right_after_the_prefix():
    for scheme in ("left", "right", "continuous"):
        row = layout_row([PREFIX, SUFFIX], [[]], scheme)
        assert row.position_ids == [0, 1, 2, 3] and row.segment_ids == [0, 0, F, F], scheme


def test_an_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="positions 'middle'"):
        build_row(PREFIX, [A], SUFFIX, "middle")


# fused few-shot: [instruction][example paraphrases][example answer][question paraphrases][answer cue]
SHARED = [[100], [50, 51], [60]]
BLOCKS = [[[1, 2], [3]], [[4], [5, 6, 7]]]
EX1, EX2, EXA = SHOT_STRIDE + 1, SHOT_STRIDE + 2, SHOT_STRIDE + SHOT_ANSWER
FUSED_SEGMENTS = [0, EX1, EX1, EX2, EXA, EXA, 1, 2, 2, 2, F]


@pytest.mark.parametrize(("scheme", "positions"), [
    #              I  e1 e1 e2 a  a  q1 q2 q2 q2 S
    ("left",       [0, 1, 2, 1, 3, 4, 5, 5, 6, 7, 8]),
    ("right",      [0, 1, 2, 2, 3, 4, 7, 5, 6, 7, 8]),
    ("continuous", list(range(11))),
])
def test_each_scheme_on_a_fused_few_shot_row(scheme, positions):
    """Example block j's paraphrase i is segment j*SHOT_STRIDE + i and its answer j*SHOT_STRIDE + SHOT_ANSWER;
    the question's block (the last) is 1..N and the answer cue FUSED; each block starts after the text before
    it, and positions follow the scheme within every block."""
    row = layout_row(SHARED, BLOCKS, scheme)
    assert row.input_ids == [100, 1, 2, 3, 50, 51, 4, 5, 6, 7, 60]
    assert row.segment_ids == FUSED_SEGMENTS
    assert row.position_ids == positions


@pytest.mark.parametrize("scheme", ["left", "right", "continuous"])
def test_row_parts_is_the_inverse_of_layout_row(scheme):
    assert row_parts(layout_row(SHARED, BLOCKS, scheme)) == (SHARED, BLOCKS)
    assert row_parts(build_row(PREFIX, [A, B, C], SUFFIX, scheme)) == ([PREFIX, SUFFIX], [[A, B, C]])


def test_row_parts_ignores_padding():
    row = build_row(PREFIX, [A, B], SUFFIX)
    padded = Row([0, 0, *row.input_ids], [PAD_SEGMENT, PAD_SEGMENT, *row.segment_ids], [0, 0, *row.position_ids])
    assert row_parts(padded) == ([PREFIX, SUFFIX], [[A, B]])


def test_row_parts_of_a_row_without_prefix_or_without_a_paraphrase_in_between():
    assert row_parts(Row([1, 2, 9], [1, 3, F], [0, 0, 1])) == ([[], [9]], [[[1], [], [2]]])


def test_positions_scheme_reads_continuous_only_from_0_to_L_minus_1():
    assert positions_scheme(build_row(PREFIX, [A, B, C], SUFFIX, "continuous")) == "continuous"
    assert positions_scheme(build_row(PREFIX, [A, B, C], SUFFIX, "left")) == "left"
    assert positions_scheme(build_row(PREFIX, [A, B, C], SUFFIX, "right")) == "left"  # needs as many as left


def test_positions_needed_is_the_highest_position_plus_one_plus_the_answer():
    rows = [build_row(PREFIX, [A, B, C], SUFFIX, "left"), build_row(PREFIX, [A], SUFFIX, "continuous")]
    assert positions_needed(rows, 0) == 7  # the left row's last position is 6; the continuous one's 5
    assert positions_needed(rows, 4) == 11


def test_largest_fitting_n_for_one_row_per_paraphrase():
    rows = [Row([1] * k, [0] * k, list(range(k))) for k in (3, 5, 4, 9)]  # positions needed: 3+2, 5+2, 4+2, 9+2
    assert largest_fitting_n(rows, 2, 7) == 3  # rows 0, 1 and 2 fit 7 positions, row 3 (11) does not
    assert largest_fitting_n(rows, 2, 4) == 0
    assert largest_fitting_n(rows, 2, 11) == 4


def test_largest_fitting_n_for_a_fused_row_lays_out_the_first_n_paraphrases_again():
    # continuous: N=1 needs 2+2+2 = 6 positions, N=2 2+2+3+2 = 9, N=3 10; plus 2 answer tokens
    continuous = [build_row(PREFIX, [A, B, C], SUFFIX, "continuous")]
    assert largest_fitting_n(continuous, 2, 7) == 0
    assert largest_fitting_n(continuous, 2, 8) == 1
    assert largest_fitting_n(continuous, 2, 11) == 2
    assert largest_fitting_n(continuous, 2, 12) == 3
    # left: the prefix, the longest of the first N, the suffix: N=1 6, N=2 and N=3 7; plus 2
    left = [build_row(PREFIX, [A, B, C], SUFFIX, "left")]
    assert largest_fitting_n(left, 2, 8) == 1
    assert largest_fitting_n(left, 2, 9) == 3
    # a fused few-shot row: every block cut to its first N paraphrases (left: N=1 needs 1+2+2+1+1 = 7, N=2 9)
    fused = [layout_row(SHARED, BLOCKS, "left")]
    assert largest_fitting_n(fused, 0, 8) == 1
    assert largest_fitting_n(fused, 0, 9) == 2


def test_growth_says_how_positions_grow_with_n():
    one_per_paraphrase = [build_row(PREFIX, [A], SUFFIX), build_row(PREFIX, [B], SUFFIX)]
    assert growth(one_per_paraphrase, 1) == "one row per paraphrase: the positions are its longest prompt's, whatever N"
    assert growth([build_row(PREFIX, [A, B], SUFFIX, "continuous")], 1) == (
        "with --positions continuous the positions grow with every paraphrase")
    assert growth([build_row(PREFIX, [A, B], SUFFIX, "right")], 1) == (
        "with --positions left or right the positions grow with the longest paraphrase, not with N")
    for rows in (one_per_paraphrase, [build_row(PREFIX, [A, B], SUFFIX, "continuous")]):
        assert growth(rows, 0) == "even one paraphrase is too long"


def model_with_context(limit):
    return SimpleNamespace(config=SimpleNamespace(max_position_embeddings=limit))


def test_check_context_refuses_exactly_when_prompt_and_answer_exceed_the_context():
    rows = [build_row(PREFIX, [A, B, C], SUFFIX, "continuous")]  # 10 positions
    check_context(model_with_context(13), rows, 3, "q1")  # 13 needed: fits exactly
    check_context(SimpleNamespace(config=SimpleNamespace()), rows, 10 ** 6, "q1")  # no known limit: no check
    with pytest.raises(InputError) as err:
        check_context(model_with_context(12), rows, 3, "q1")
    assert str(err.value) == (
        "question q1: prompt and answer need 13 positions, more than the model's context of 12; the largest N "
        "that fits is 2 (with --positions continuous the positions grow with every paraphrase); or lower "
        "--max-new-tokens")
