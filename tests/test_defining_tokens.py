"""Defining behaviour of cutting prompts into tokens (decoding.encode_parts and its pieces): every prompt is
tokenised whole, a token belongs to the piece it starts in unless it runs from a shared piece into a paraphrase,
a shared part keeps the longest run of tokens every prompt has, and what a prompt has beyond that run goes to the
paraphrase beside it. A hand-written tokenizer (greedy longest match over a tiny vocabulary with merges across
the cuts) makes every expected token list countable by hand."""
from __future__ import annotations

import pytest

from constants import InputError
from dataset import PromptParts
from decoding import common_run, encode_parts, encode_prompt, find_run, fused_row, piece_ends, single_rows, split_at

BOS = 1


class Greedy:
    """Longest match over MERGES and single characters; a character is its code point, a merge 1000 + its index.
    With bos, token 1 (offsets (0, 0)) comes first when special tokens are asked for."""
    name_or_path = "greedy-test"

    def __init__(self, merges=("?\n", ": "), bos=True):
        self.merges, self.bos = list(merges), bos

    def tokenize(self, text: str):
        i, out = 0, []
        while i < len(text):
            match = max((m for m in self.merges if text.startswith(m, i)), key=len, default=text[i])
            out.append((1000 + self.merges.index(match) if len(match) > 1 else ord(match), (i, i + len(match))))
            i += len(match)
        return out

    def __call__(self, texts, add_special_tokens=True, return_offsets_mapping=False):
        ids, offsets = [], []
        for text in texts:
            tokens = ([(BOS, (0, 0))] if self.bos and add_special_tokens else []) + self.tokenize(text)
            ids.append([t for t, _ in tokens])
            offsets.append([o for _, o in tokens])
        return {"input_ids": ids, "offset_mapping": offsets}

    def ids(self, text: str) -> list[int]:
        return [t for t, _ in self.tokenize(text)]


QN, CS = 1000, 1001  # the merges "?\n" and ": "


def c(text: str) -> list[int]:
    return [ord(ch) for ch in text]


def test_piece_ends_are_character_offsets_of_each_piece():
    parts = PromptParts(["ab", "-", "cde"], [["x", "yy"], ["z", "zz"]])
    assert piece_ends(parts, 0) == [2, 3, 4, 5, 8]
    assert piece_ends(parts, 1) == [2, 4, 5, 7, 10]


def test_split_at_gives_a_token_to_the_piece_it_starts_in():
    # pieces end at 2, 4, 6: shared, paraphrase, shared
    offsets = [(0, 0), (0, 1), (1, 2), (2, 3), (3, 4), (4, 6)]
    assert split_at(offsets, [2, 4, 6], [1, 10, 11, 12, 13, 14]) == [[1, 10, 11], [12, 13], [14]]


def test_split_at_gives_a_token_running_from_a_shared_piece_into_a_paraphrase_to_the_paraphrase():
    offsets = [(0, 1), (1, 3), (3, 5), (5, 6)]  # token 11 runs from shared (ends 2) into the paraphrase
    assert split_at(offsets, [2, 4, 6], [10, 11, 12, 13]) == [[10], [11, 12], [13]]
    # a token ending exactly at the cut stays in its shared piece
    assert split_at([(0, 2), (2, 3), (3, 4), (4, 6)], [2, 4, 6], [10, 11, 12, 13]) == [[10], [11, 12], [13]]
    # a token running from a paraphrase into the shared text after it stays with the paraphrase
    assert split_at([(0, 2), (2, 5), (5, 6)], [2, 4, 6], [10, 11, 12]) == [[10], [11], [12]]
    # the last piece keeps what runs past it
    assert split_at([(0, 2), (2, 4), (4, 7)], [2, 4, 6], [10, 11, 12]) == [[10], [11], [12]]


def test_common_run_at_the_start_at_the_end_and_anywhere():
    assert common_run([[1, 2, 3], [1, 2, 4]], first=True, last=False) == ([1, 2], [0, 0])
    assert common_run([[1, 2, 3], [2, 3]], first=True, last=False) == ([], [0, 0])
    assert common_run([[1, 2, 3], [9, 2, 3]], first=False, last=True) == ([2, 3], [1, 1])
    assert common_run([[5, 1, 2, 3], [1, 2]], first=False, last=True) == ([], [4, 2])
    assert common_run([[7, 1, 2, 3, 8], [1, 2, 3], [9, 9, 1, 2, 3]], first=False, last=False) == ([1, 2, 3], [1, 0, 2])
    assert common_run([[4, 5], [6]], first=False, last=False) == ([], [2, 1])
    assert common_run([[], [1]], first=True, last=False) == ([], [0, 0])


def test_find_run():
    assert find_run([1, 2, 3, 2, 3], [2, 3], first=False, last=False) == 1
    assert find_run([1, 2, 3, 2, 3], [2, 3], first=False, last=True) == 3
    assert find_run([1, 2, 3], [2, 3], first=True, last=False) is None
    assert find_run([1, 2], [1, 2, 3], first=False, last=True) is None
    assert find_run([1], [1], first=True, last=True) == 0


def test_a_merge_across_the_cut_before_the_suffix_goes_to_the_paraphrase():
    tok = Greedy()
    parts = PromptParts(["Q", "\nA:"], [["a?", "bc?"]])  # "?\n" is one token
    shared, blocks = encode_parts(tok, parts)
    assert shared == [[BOS] + c("Q"), c("A:")]
    assert blocks == [[c("a") + [QN], c("bc") + [QN]]]
    for i in range(2):  # joined, each prompt is exactly its tokenisation
        assert shared[0] + blocks[0][i] + shared[1] == [BOS] + tok.ids(parts.full(i))


def test_a_merge_across_the_cut_after_the_prefix_goes_to_the_paraphrase():
    tok = Greedy()
    parts = PromptParts(["Q:", "."], [[" x", "y"]])  # ": " is one token in prompt 0 only
    shared, blocks = encode_parts(tok, parts)
    assert shared == [[BOS] + c("Q"), c(".")]
    assert blocks == [[[CS] + c("x"), c(":y")]]  # prompt 1's ":" goes to its paraphrase too: the run is [BOS, Q]


def test_without_special_tokens_no_bos():
    parts = PromptParts(["Q", "\nA:"], [["a?", "b?"]], special_tokens=False)
    shared, blocks = encode_parts(Greedy(), parts)
    assert shared == [c("Q"), c("A:")] and blocks == [[c("a") + [QN], c("b") + [QN]]]


def test_a_middle_shared_part_keeps_the_longest_run_every_prompt_has():
    tok = Greedy()
    # fused few-shot: [I][e1 | e2][answer][q1 | q2][cue]; "?\n" merges the example's last "?" with the answer's "\n"
    parts = PromptParts(["I", "\nA: 4\n", "\nA:"], [["2+2?", "two+two"], ["x?", "y?"]])
    shared, blocks = encode_parts(tok, parts)
    # prompt 0's answer piece is A ": " 4 \n (its "\n" merged into "?\n"), prompt 1's \n A ": " 4 \n: the run is the former
    assert shared == [[BOS] + c("I"), c("A") + [CS] + c("4\n"), c("A:")]
    answer = shared[1]
    assert blocks[0] == [c("2+2") + [QN], c("two+two\n")]  # prompt 1 has "\n" beyond the run: its paraphrase's
    for i in range(2):
        assert shared[0] + blocks[0][i] + answer + blocks[1][i] + shared[2] == [BOS] + tok.ids(parts.full(i))


def test_a_shared_text_without_shared_tokens_is_refused_in_one_line():
    tok = Greedy(merges=("?\nA",))
    parts = PromptParts(["Q", "\nA"], [["x?", "y!"]])
    with pytest.raises(InputError) as err:
        encode_parts(tok, parts)
    assert str(err.value) == ("tokenizer greedy-test: the shared text '\\nA' is tokenised differently after each "
                              "paraphrase; no shared tokens to fuse on")


def test_a_blank_shared_text_may_have_no_tokens_of_its_own():
    tok = Greedy(merges=("?\n",))
    shared, blocks = encode_parts(tok, PromptParts(["Q", "\n"], [["x?", "y?"]]))
    assert shared == [[BOS] + c("Q"), []] and blocks == [[c("x") + [QN], c("y") + [QN]]]


def test_the_tokenizer_type_names_a_tokenizer_without_a_path():
    class Anonymous(Greedy):
        name_or_path = ""
    with pytest.raises(InputError, match="^tokenizer Anonymous: "):
        encode_parts(Anonymous(merges=("?\nA",)), PromptParts(["Q", "\nA"], [["x?", "y!"]]))


def test_encode_prompt_one_block_and_a_plain_prompt():
    tok = Greedy()
    assert encode_prompt(tok, "Q", ["a?", "b?"], "\nA:") == ([BOS] + c("Q"), [c("a") + [QN], c("b") + [QN]], c("A:"))
    # no paraphrases: what would straddle the cut belongs to the suffix
    assert encode_prompt(tok, "Q:", [], " x?\nA") == ([BOS] + c("Q"), [], [CS] + c("x") + [QN] + c("A"))
    assert encode_prompt(tok, "Q: ", [], "x?\nA") == ([BOS] + c("Q") + [CS], [], c("x") + [QN] + c("A"))


def test_single_rows_and_the_fused_row_are_cut_from_the_same_tokenisations():
    tok = Greedy()
    parts = PromptParts(["Q", "\nA:"], [["a?", "bc?"]])
    singles = single_rows(tok, parts, [1, 0])
    assert [r.input_ids for r in singles] == [[BOS] + tok.ids("Qbc?\nA:"), [BOS] + tok.ids("Qa?\nA:")]
    assert singles[0].segment_ids == [0, 0, 1, 1, 1, 1 << 20, 1 << 20]
    fused = fused_row(tok, parts, "right")
    assert fused.input_ids == [BOS] + c("Q") + c("a") + [QN] + c("bc") + [QN] + c("A:")
    assert fused.position_ids == [0, 1, 3, 4, 2, 3, 4, 5, 6]
